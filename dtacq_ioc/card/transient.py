"""Transient shots on one card: configure, arm, trigger, abort, follow the state, read the data.

The card keeps PRE samples before its trigger and POST after it in its own memory;
the host arms it, triggers it (or lets a front-panel line do it) and reads the shot
afterwards. Knobs on site 0 and the aggregator's master site set it up (D-TACQ's host
API does the same: with PRE = 0 the master site's `trg` is the trigger; with PRE > 0
`trg` is the soft trigger, fired by the card itself once armed, and `event0` is the
trigger). One thread follows the state lines of the 2235 console, reconnecting when
the card goes away. A finished shot is read with `recv_into` straight into
preallocated numpy arrays: from 53000+ch per channel after a demuxed shot, else from
53000 (whole samples, spad included) and demultiplexed here.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dtacq_ioc.card.errors import CardError, SettingRefused
from dtacq_ioc.card.knobs import KnobClient
from dtacq_ioc.config import CardConfig
from dtacq_ioc.contract import StreamLayout

log = logging.getLogger(__name__)

STATUS_PORT = 2235
DATA_PORT = 53000  # raw; 53000 + ch is channel ch (1-based over the aggregated AI channels)
SYSTEM_SITE = 0
MAX_PRE = 4_000_000  # the card may clamp lower (its PREMAX); configure() checks the read-back
MAX_POST = 4_000_000
MAX_OSAM = 256
SOFT_LINE = 1  # d1 is the soft trigger
SOFT_TRIPLET = "1,1,1"
OFF_TRIPLET = "0,0,0"
RECONNECT_S = 0.5  # first wait before reconnecting the console; doubles up to the next
RECONNECT_MAX_S = 5.0
_COUNTER_MODULUS = 1 << 32


class ShotState(enum.IntEnum):
    """The card's transient state codes (TRANS_ACT:STATE)."""

    IDLE = 0
    ARM = 1
    RUN_PRE = 2
    RUN_POST = 3
    POST_PROCESS = 4
    CLEANUP = 5


class ShotError(CardError):
    """A shot did not give its data: never armed, never finished, card lost, data short."""


class ShotIncomplete(ShotError):
    """Fewer bytes came than the shot holds; `shot` has what did come."""

    def __init__(self, card: str, message: str, shot: ShotData):
        self.shot = shot
        super().__init__(card, message)


@dataclass(frozen=True)
class TriggerSource:
    """The soft trigger (line None), or front-panel line dN with its edge."""

    line: int | None = None
    rising: bool = True

    @classmethod
    def parse(cls, text: str) -> TriggerSource:
        """'soft', 'd0', 'd3 falling', 'd3:rising' (case and separators are free)."""
        words = text.strip().lower().replace(":", " ").replace(",", " ").split()
        if words == ["soft"]:
            return cls()
        if not words or len(words) > 2 or words[-1] not in ("rising", "falling", words[0]):
            raise ValueError(f"trigger {text!r} is not soft or dN [rising|falling]")
        name = words[0]
        if len(name) != 2 or name[0] != "d" or not name[1].isdigit():
            raise ValueError(f"trigger {text!r} is not soft or dN [rising|falling]")
        return cls(int(name[1]), words[-1] != "falling")

    @property
    def soft(self) -> bool:
        return self.line is None

    def triplet(self) -> str:
        """The knob value 'EN,dX,edge' that listens to this source."""
        if self.line is None:
            return SOFT_TRIPLET
        return f"1,{self.line},{1 if self.rising else 0}"

    def check(self) -> str:
        """Why the card cannot use this source, or ''."""
        if self.line is None:
            return ""
        if not 0 <= self.line <= 7:
            return f"line d{self.line} is not one of d0..d7"
        if self.line == SOFT_LINE:
            return "d1 is the soft trigger; choose soft"
        return ""

    def __str__(self) -> str:
        if self.line is None:
            return "soft"
        return f"d{self.line} {'rising' if self.rising else 'falling'}"


@dataclass(frozen=True)
class TransientSettings:
    """One shot's setup: PRE samples kept before the trigger, POST after it."""

    pre: int = 0
    post: int = 100_000
    trigger: TriggerSource = field(default_factory=TriggerSource)
    demux: bool = True  # the card demultiplexes: read 53000+ch; else 53000 raw
    osam: int = 1

    def problem(self) -> tuple[str, str]:
        """(setting, reason) of the first thing the card can't take, or ('', '')."""
        for name, value, lo, hi in (
            ("pre", self.pre, 0, MAX_PRE),
            ("post", self.post, 1, MAX_POST),
            ("osam", self.osam, 0, MAX_OSAM),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                return name, f"{value!r} is not an integer in {lo}..{hi}"
        reason = self.trigger.check()
        return ("trigger", reason) if reason else ("", "")

    @property
    def samples(self) -> int:
        return self.pre + self.post


@dataclass(frozen=True)
class TransientStatus:
    """One 2235 line: state, pre, post, elapsed samples, demux."""

    state: ShotState
    pre: int
    post: int
    elapsed: int
    demux: int

    @classmethod
    def parse(cls, line: str) -> TransientStatus | None:
        """'state pre post elapsed demux', optionally after 'STX'; None for other lines."""
        fields = line.split()
        if fields[:1] == ["STX"]:
            fields = fields[1:]
        if len(fields) < 5 or not all(f.isdigit() for f in fields[:5]):
            return None
        state, pre, post, elapsed, demux = (int(f) for f in fields[:5])
        if state not in ShotState._value2member_map_:
            return None
        return cls(ShotState(state), pre, post, elapsed, demux)

    @property
    def samples(self) -> int:
        return self.pre + self.post


OnStatus = Callable[[TransientStatus], None]
OnLink = Callable[[bool], None]


class StatusMonitor:
    """Follows the 2235 console on one thread, reconnecting with backoff when it drops."""

    def __init__(
        self,
        card: str,
        host: str,
        port: int = STATUS_PORT,
        timeout: float = 5.0,
        on_status: OnStatus | None = None,
        on_link: OnLink | None = None,
    ):
        self.card = card
        self.host = host
        self.port = port
        self.timeout = timeout
        self.on_status = on_status
        self.on_link = on_link
        self.status: TransientStatus | None = None
        self.connected = False  # a state line has come on the current connection
        self.arms = 0  # lines entering ARM
        self.ends = 0  # lines entering IDLE from another state
        self.drops = 0  # connections lost after they were up
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"tstat-{self.card}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            sock = self._sock
            self._cond.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def counts(self) -> tuple[int, int, int]:
        """(arms, ends, drops) so far, read together."""
        with self._cond:
            return self.arms, self.ends, self.drops

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Block until ready() (evaluated under the monitor's lock) or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return False
                self._cond.wait(left)
            return True

    def wait_state(self, state: ShotState, timeout: float) -> bool:
        """Block until the card reports `state`, or timeout."""
        return self.wait_for(lambda: self.status is not None and self.status.state == state,
                             timeout)  # fmt: skip

    def _run(self) -> None:
        backoff = RECONNECT_S
        while not self._stopping.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                log.debug("%s: status console %s:%d: %s", self.card, self.host, self.port, exc)
                self._stopping.wait(backoff)
                backoff = min(2 * backoff, RECONNECT_MAX_S)
                continue
            backoff = RECONNECT_S
            with self._cond:
                self._sock = sock
            if self._stopping.is_set():
                sock.close()
                break
            try:
                self._read(sock)
            except OSError as exc:
                log.debug("%s: status console lost: %s", self.card, exc)
            finally:
                with self._cond:
                    self._sock = None
                sock.close()
                if not self._stopping.is_set() and self.connected:
                    with self._cond:
                        self.drops += 1
                    log.info("%s: status console lost, reconnecting", self.card)
                self._set_link(False)

    def _read(self, sock: socket.socket) -> None:
        sock.settimeout(None)  # the console is silent between changes; stop() shuts it
        buf = b""
        while True:
            data = sock.recv(4096)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")  # CRLF lines; a bare LF is taken as well
            for raw in lines:
                status = TransientStatus.parse(raw.decode("latin-1"))
                if status is not None:
                    self._update(status)

    def _update(self, status: TransientStatus) -> None:
        with self._cond:
            previous = self.status
            self.status = status
            if status.state == ShotState.ARM and (
                previous is None or previous.state != ShotState.ARM
            ):
                self.arms += 1
            if status.state == ShotState.IDLE and previous is not None and previous.state != 0:
                self.ends += 1
            self._cond.notify_all()
        if not self.connected:
            self._set_link(True)  # up once a fresh state has come
        if self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                log.exception("%s: on_status failed", self.card)

    def _set_link(self, up: bool) -> None:
        with self._cond:
            changed = self.connected != up
            self.connected = up
            self._cond.notify_all()
        if changed and self.on_link is not None:
            try:
                self.on_link(up)
            except Exception:
                log.exception("%s: on_link failed", self.card)


@dataclass
class ShotData:
    """A read shot: `channels[c]` holds AI channel c's words (0-based, site order)."""

    layout: StreamLayout
    channels: npt.NDArray[np.signedinteger]  # (ai_channels, samples), raw words as sent
    received: npt.NDArray[np.int64]  # whole samples that came, per channel
    pre: int  # samples before the trigger: the trigger is sample `pre`
    post: int
    shot: int  # the card's shot counter
    source: str  # "channels" (53000+ch) or "raw" (53000)
    first_counter: int | None = None  # spad counter of the first sample (raw reads only)
    counter_errors: int = 0  # spad counter jumps inside the shot (raw reads only)

    @property
    def samples(self) -> int:
        return self.pre + self.post

    @property
    def trigger_index(self) -> int:
        return self.pre

    @property
    def complete(self) -> bool:
        return bool(np.all(self.received == self.samples))


def allocate_shot(layout: StreamLayout, samples: int) -> npt.NDArray[np.signedinteger]:
    """An array for a shot's channels, (ai_channels, samples) of the layout's word type."""
    dtype = np.dtype("<i2" if layout.word_size == 2 else "<i4")
    return np.empty((layout.ai_channels, samples), dtype=dtype)


def recv_exactly(sock: socket.socket, view: memoryview) -> int:
    """recv_into until the view is full or the peer closes; the bytes received."""
    got = 0
    size = len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            break
        got += n
    return got


def counter_jumps(counter: npt.NDArray[np.uint32]) -> int:
    """Places where the spad sample counter does not go up by one (it wraps at 2**32)."""
    steps = np.mod(np.diff(counter.astype(np.int64)), _COUNTER_MODULUS)
    return int(np.count_nonzero(steps != 1))


class TransientCard(Protocol):
    """What a shot uses of `card.Card` (a Protocol, so this module never imports card.py)."""

    name: str
    config: CardConfig
    layout: StreamLayout | None

    def knob(self, site: int) -> KnobClient: ...
    def ai_sites(self) -> tuple[int, ...]: ...
    def configure_stream(
        self, sites: tuple[int, ...] | list[int] | None = None
    ) -> StreamLayout: ...


class Transient:
    """The transient side of one card (`Card.transient()` keeps one per card)."""

    def __init__(
        self,
        card: TransientCard,
        on_status: OnStatus | None = None,
        on_link: OnLink | None = None,
    ):
        self.card = card
        self.name = card.name
        self.settings: TransientSettings | None = None
        self.layout: StreamLayout | None = None
        self.monitor = StatusMonitor(
            card.name,
            card.config.host,
            STATUS_PORT,
            card.config.timeout_s,
            on_status=on_status,
            on_link=on_link,
        )
        self._marks = (0, 0)  # (ends, drops) of the monitor when the shot was armed
        self._buffer: npt.NDArray[np.signedinteger] | None = None
        self._raw: npt.NDArray[np.uint8] | None = None

    def __repr__(self) -> str:
        return f"Transient({self.name!r})"

    # -- setup ------------------------------------------------------------------------

    def configure(
        self, settings: TransientSettings, layout: StreamLayout | None = None
    ) -> TransientSettings:
        """Set the shot up on the card; return what the card reports it took.

        Refused before anything is sent when a value is out of range; refused after
        when the card clamped PRE or POST (a card's own PRE limit may be lower).
        """
        setting, reason = settings.problem()
        if setting:
            raise SettingRefused(self.name, f"transient {setting}", reason)
        layout = layout or self.card.layout or self.card.configure_stream()
        master = self.card.knob(layout.sites[0])
        if settings.pre > 0:
            # The card starts itself (trg soft, SOFT_TRIGGER=1) and fills PRE; event0 triggers.
            master.set("trg", SOFT_TRIPLET)
            master.set("event0", settings.trigger.triplet())
            auto = 1
        else:
            master.set("event0", OFF_TRIPLET)
            master.set("trg", settings.trigger.triplet())
            auto = 0
        k0 = self.card.knob(SYSTEM_SITE)
        k0.set(
            "transient",
            f"PRE={settings.pre} POST={settings.post} OSAM={settings.osam} "
            f"DEMUX={int(settings.demux)} SOFT_TRIGGER={auto}",
        )
        took = parse_transient(k0.query("transient"))
        for key, wanted in (("PRE", settings.pre), ("POST", settings.post)):
            if took.get(key) != wanted:
                raise SettingRefused(
                    self.name,
                    f"transient {key.lower()}",
                    f"the card took {took.get(key)} for {wanted}",
                )
        self.settings = replace(settings, osam=took.get("OSAM", settings.osam))
        self.layout = layout
        return self.settings

    # -- the shot ---------------------------------------------------------------------

    def start_monitor(self, timeout: float | None = None) -> None:
        """Start following the state (once); wait up to `timeout` for the console."""
        self.monitor.start()
        if timeout is not None and not self.monitor.wait_for(
            lambda: self.monitor.connected and self.monitor.status is not None, timeout
        ):
            raise ShotError(
                self.name,
                f"{self.name}: no status console at {self.card.config.host}:{STATUS_PORT} "
                f"within {timeout:g} s",
            )

    @property
    def status(self) -> TransientStatus | None:
        return self.monitor.status

    def arm(self, timeout: float = 10.0) -> None:
        """set_arm, then wait until the card reports ARM. Stop the card's stream first:
        arming ends it on the card."""
        mon = self.monitor
        self.start_monitor(timeout)
        if mon.status is not None and mon.status.state != ShotState.IDLE:
            # A state left over (a stream just closed, an old shot): from IDLE, the next
            # ARM line is surely this shot's.
            self.abort()
            if not mon.wait_state(ShotState.IDLE, timeout):
                raise ShotError(self.name, f"{self.name}: not IDLE within {timeout:g} s to arm")
        arms, ends, drops = mon.counts()
        self._marks = (ends, drops)
        self.card.knob(SYSTEM_SITE).set("set_arm", 1)
        if not mon.wait_for(lambda: mon.arms > arms, timeout):
            raise ShotError(
                self.name, f"{self.name}: set_arm sent, but no ARM within {timeout:g} s"
            )

    def soft_trigger(self) -> None:
        self.card.knob(SYSTEM_SITE).set("soft_trigger", 1)

    def trigger_when_listening(self, pre: int, timeout: float) -> None:
        """The soft trigger of an armed shot, sent once the card listens for it. With PRE
        samples the card takes its start trigger first and hears the event only in RUN_PRE:
        a trigger sent between ARM and RUN_PRE is lost and the shot never ends."""
        if pre > 0 and not self.monitor.wait_state(ShotState.RUN_PRE, timeout):
            raise ShotError(self.name, f"{self.name}: armed, but no RUN_PRE within {timeout:g} s")
        self.soft_trigger()

    def set_shot(self, number: int) -> None:
        """Set the card's shot counter (the next shot is number + 1), as HAPI does on
        site 1 before a shot, so that cards armed together count alike."""
        layout = self.layout or self.card.layout
        site = layout.sites[0] if layout is not None else self.card.ai_sites()[0]
        self.card.knob(site).set("shot", number)

    def abort(self) -> None:
        self.card.knob(SYSTEM_SITE).set("set_abort", 1)

    def wait_done(self, timeout: float) -> TransientStatus:
        """Wait for the armed shot to end (back to IDLE); its final state line.

        ShotError when it does not end in time (a trigger that never came) or when the
        console dropped meanwhile (the card went away: its memory is gone).
        """
        mon = self.monitor
        ends, drops = self._marks
        done = mon.wait_for(lambda: mon.ends > ends or mon.drops > drops, timeout)
        status, dropped = mon.status, mon.counts()[2] > drops
        if dropped:
            raise ShotError(self.name, f"{self.name}: the card went away during the shot")
        if not done or status is None:
            state = status.state.name if status is not None else "unknown"
            raise ShotError(
                self.name, f"{self.name}: shot not done within {timeout:g} s (state {state})"
            )
        return status

    # -- the data ---------------------------------------------------------------------

    def read_shot(self, out: npt.NDArray[np.signedinteger] | None = None) -> ShotData:
        """Read the finished shot into `out` (else this object's buffer, reused by the
        next read). ShotIncomplete, holding what came, when fewer bytes arrive."""
        layout = self.layout or self.card.layout
        if layout is None:
            raise ShotError(self.name, f"{self.name}: no aggregation known (configure first)")
        k0 = self.card.knob(SYSTEM_SITE)
        status = TransientStatus.parse(k0.query("state"))
        if status is None or status.state != ShotState.IDLE:
            raise ShotError(self.name, f"{self.name}: no finished shot (state {status})")
        shot = int(k0.query("shot").strip() or 0)
        samples = status.samples
        demux = self.settings.demux if self.settings is not None else bool(status.demux)
        if out is None:
            out = self._buffer
            if out is None or out.shape != (layout.ai_channels, samples):
                out = self._buffer = allocate_shot(layout, samples)
        elif out.shape != (layout.ai_channels, samples) or out.dtype.itemsize != layout.word_size:
            raise ValueError(
                f"out is {out.shape} {out.dtype}; the shot needs "
                f"({layout.ai_channels}, {samples}) of {layout.word_size}-byte words"
            )
        data = ShotData(
            layout=layout,
            channels=out,
            received=np.zeros(layout.ai_channels, dtype=np.int64),
            pre=status.pre,
            post=status.post,
            shot=shot,
            source="channels" if demux else "raw",
        )
        if demux:
            self._read_channels(data)
        else:
            self._read_raw(data)
        if not data.complete:
            short = [c + 1 for c in np.flatnonzero(data.received != samples)]
            raise ShotIncomplete(
                self.name,
                f"{self.name}: shot {shot} short: channel {short[0]} gave "
                f"{int(data.received[short[0] - 1])} of {samples} samples"
                + (f" ({len(short)} channels short)" if len(short) > 1 else ""),
                data,
            )
        return data

    def _connect(self, port: int) -> socket.socket:
        host, timeout = self.card.config.host, self.card.config.timeout_s
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ShotError(
                self.name,
                f"{self.name}: cannot connect to shot data {host}:{port}: {exc.strerror or exc}",
            ) from None

    def _receive(self, port: int, view: memoryview) -> int:
        with self._connect(port) as sock:
            try:
                return recv_exactly(sock, view)
            except TimeoutError:
                raise ShotError(
                    self.name,
                    f"{self.name}: shot data port {port} silent for "
                    f"{self.card.config.timeout_s:g} s",
                ) from None
            except OSError as exc:
                raise ShotError(
                    self.name, f"{self.name}: shot data port {port}: {exc.strerror or exc}"
                ) from None

    def _read_channels(self, data: ShotData) -> None:
        size = data.channels.itemsize
        for c in range(data.layout.ai_channels):
            view = data.channels[c].data.cast("B")
            data.received[c] = self._receive(DATA_PORT + c + 1, view) // size

    def _read_raw(self, data: ShotData) -> None:
        layout = data.layout
        nbytes = data.samples * layout.sample_bytes
        if self._raw is None or len(self._raw) != nbytes:
            self._raw = np.empty(nbytes, dtype=np.uint8)
        got = self._receive(DATA_PORT, self._raw.data)
        whole = got // layout.sample_bytes
        samples = self._raw[: whole * layout.sample_bytes].view(layout.sample_dtype)
        np.copyto(data.channels[:, :whole], samples["ai"].T)
        data.received[:] = whole
        if layout.spad_words and whole:
            counter = samples["spad"][:, 0]
            data.first_counter = int(counter[0])
            data.counter_errors = counter_jumps(counter)

    def close(self) -> None:
        self.monitor.stop()


def arm_together(followers: Sequence[Transient], trigger: Transient, timeout: float) -> None:
    """Arm cards that share one trigger: every follower armed (ARM seen) before the card
    that holds the trigger, as D-TACQ's host API orders it, so none misses the edge."""
    for t in (*followers, trigger):
        t.arm(timeout)


def parse_transient(text: str) -> dict[str, int]:
    """'PRE=0 POST=2000 OSAM=1 DEMUX=1 SOFT_TRIGGER=1' -> {'PRE': 0, ...}."""
    out: dict[str, int] = {}
    for token in text.split():
        key, _, value = token.partition("=")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out
