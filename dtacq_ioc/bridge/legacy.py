"""The nEDM digitizer protocol of the old WebSocket server, mapped onto the IOC's PVs.

Requests are JSON text ``{"cmd": NAME, "args": {...}, "embed": bool, "ip": ...}``. Every
reply is a binary frame: the nEDM header framing (``dtacq_ioc.framing``), then an
optional payload. Success is ``{"cmd": C, "ok": true}`` with the result in ``"result"``
when the request had ``embed``, else as the payload; a refusal is ``{"cmd": C, "error":
"<one line>"}`` with no ``ok`` key (the old page tests for its presence). Unsolicited
``{"cmd": "announce", "msg": M, "ok": true}`` messages use the same framing. Nothing here
talks to a card: every command reads or writes PVs, and the end of a run is announced
from ``RUN:LAST_RESULT`` and, for uploads, from the database itself.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import math
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dtacq_ioc.bridge.session import BadRequest, Session
from dtacq_ioc.bridge.source import Delta, PvEntry, WriteRefused
from dtacq_ioc.config import CardConfig
from dtacq_ioc.contract import RUN_FAULT, RUN_RUNNING, RUN_STATES, SPAD_BYTES, SPAD_WORDS
from dtacq_ioc.framing import pack_header, unpack_header

log = logging.getLogger(__name__)

NO_RUN = 0xDEADBEEF
DEFAULT_TRIGGER = "always"  # the IOC's built-in "write every buffer"
COUNTER_FLAG = 0xFF00
START_TIMEOUT_S = 15.0
UPLOAD_WAIT_S = 600.0  # how long the end of a run waits for its files in the database
UPLOAD_POLL_S = 0.5
MIN_BUFFER_BYTES = 1 << 20  # the old server's smallest buffer: 1 MiB
RUNNING, FAULT = RUN_RUNNING, RUN_FAULT  # RUN:STATE_RBV's enum values
STARTING = RUN_STATES.index("STARTING")
BUFFER_PV = "RUN:BUFFER"  # the IOC's latest whole run buffer (AI words, sample-major)
GAIN_CMD = re.compile(
    r"^\s*(?:set\.site\s+(\d)\s+)?gain(\d{1,3})?\s*[= ]\s*(\d{1,3})\s*$", re.IGNORECASE
)
SOURCE_HINTS = ("\n", "class ", "def ", "import ", "(", ":")


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One reply: the framed JSON header, then the payload."""
    return pack_header(header) + payload


def parse_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The inverse of `frame` (used by clients and tests)."""
    header, offset = unpack_header(data)
    return header, data[offset:]


def text_of(value: Any) -> str:
    """A PV value as text (long strings may arrive as CHAR arrays)."""
    if isinstance(value, np.ndarray):
        return value.astype("u1").tobytes().split(b"\0", 1)[0].decode("utf-8", "replace")
    return "" if value is None else str(value)


@dataclass(frozen=True)
class SiteView:
    site: int
    nchan: int
    word_size: int


@dataclass
class Buffers:
    """What one session has seen of a card's run buffers: each is handed out once."""

    seen: int = 0  # buffers received since the session subscribed
    handed: int = 0  # the `seen` count of the last one handed out
    latest: np.ndarray | None = None
    frame_stamp: float = 0.0  # without RUN:BUFFER: the display frame handed out last
    run_id: str = ""  # the run this session saw running (for 0xdeadbeef at its end)


class LegacySession(Session):
    kind = "nEDM"

    def __init__(self) -> None:
        super().__init__()
        # Set here, not at open: a socket may close before its handshake is done.
        self.card: CardConfig | None = None
        self.control = False
        self.watched: set[str] = set()
        self.buffers = Buffers()
        self.run_sites: list[int] | None = None  # sites of the run this session started
        self.watcher: asyncio.Task | None = None

    def onConnect(self, request: Any) -> None:
        super().onConnect(request)
        if not self.can_write and self._write_host():
            self.can_write = True

    def _write_host(self) -> bool:
        """Whether the client's address is in ``[bridge] legacy_write_hosts``."""
        allowed = self.services.config.bridge.legacy_write_hosts
        if not allowed:
            return False
        try:
            address = ipaddress.ip_address(self.transport.getPeer().host)  # type: ignore[union-attr,misc]  # twisted's ITransport
        except (AttributeError, ValueError):
            return False
        return any(address in ipaddress.ip_network(n, strict=False) for n in allowed)

    def closed(self) -> None:
        self._release("connection closed")
        if self.watcher is not None:
            self.watcher.cancel()
        for name in self.watched:
            self.services.source.unsubscribe(name, self)
        self.watched = set()

    # PV listener: values are read on demand from the shared entries; run buffers are
    # counted here, so a buffer is new to this session exactly once.
    def pv_update(self, entry: PvEntry, delta: Delta) -> None:
        if self.card is None or "seconds" not in delta.fields:
            return  # not a new value (metadata, connection state)
        value = entry.value
        # An empty buffer marks a new run's start: nothing to hand out.
        if entry.name == self.pv(BUFFER_PV) and isinstance(value, np.ndarray) and value.size:
            self.buffers.seen += 1
            self.buffers.latest = value

    def follow_buffers(self) -> None:
        """Count the card's run buffers from now on (subscribing does not wait)."""
        name = self.pv(BUFFER_PV)
        if name not in self.watched:
            self.watched.add(name)
            self.services.source.subscribe(name, self)

    def pv_missing(self, entry: PvEntry) -> None:
        pass

    # -- framing --

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.outbox.reply(frame(header, payload), binary=True)

    def error(self, text: str, request: Any) -> None:
        cmd = request if isinstance(request, str) else None
        # No "ok" key: the old page tells a refusal by its absence.
        self.send({"cmd": cmd, "error": " ".join(text.split()) or "refused"})

    def result(self, cmd: str, result: Any, embed: bool) -> None:
        header: dict[str, Any] = {"cmd": cmd, "ok": True}
        payload = b""
        if embed and result is not None:
            if isinstance(result, bytes):
                result = base64.b64encode(result).decode("ascii")
            header["result"] = result
        elif isinstance(result, bytes):
            payload = result
        elif result is not None:
            payload = json.dumps(result, separators=(",", ":")).encode()
        self.send(header, payload)

    def announce(self, msg: Any) -> None:
        """Tell this client; a list is announced item by item, as the old server did."""
        for item in msg if isinstance(msg, list) else [msg]:
            self.send({"cmd": "announce", "msg": item, "ok": True})

    def announce_others(self, msg: str) -> None:
        for session in list(self.services.sessions):
            if isinstance(session, LegacySession) and session is not self:
                session.announce(msg)

    def ack_auth(self) -> None:
        self.send({"cmd": "auth", "ok": True})

    # -- dispatch --

    def handle(self, message: dict[str, Any]) -> None:
        cmd = message.get("cmd")
        if not isinstance(cmd, str):
            raise BadRequest('a request needs a string "cmd"')
        handler = COMMANDS.get(cmd)
        if handler is None:
            self.error(f"unknown command {cmd[:64]!r}", cmd[:64])
            return
        args = message.get("args") or {}
        if not isinstance(args, dict):
            self.error(f"{cmd}: args must be a JSON object", cmd)
            return
        # The old server embedded whenever the key was there; `false` is honoured too.
        embed = "embed" in message and message["embed"] is not False

        async def serve() -> None:
            self.result(cmd, await handler(self, args), embed)

        self.run(serve(), cmd)

    # -- PV access --

    def pv(self, suffix: str) -> str:
        assert self.card is not None
        return self.card.prefix + suffix

    async def entry(self, suffix: str) -> PvEntry:
        name = self.pv(suffix)
        self.watched.add(name)
        try:
            return await self.services.source.entry(name, self)
        except WriteRefused as exc:
            assert self.card is not None
            raise BadRequest(f"{exc} (is the IOC for {self.card.host} running?)") from None

    async def read(self, suffix: str) -> Any:
        return (await self.entry(suffix)).value

    async def write(self, suffix: str, value: Any, confirm: bool = True) -> None:
        """Write a PV; with confirm, wait (briefly) until its monitor shows the new value,
        so a following read in the same page sequence sees it."""
        await self.read(suffix)  # connects the PV (and tells a missing IOC apart)
        try:
            await self.services.source.write(self.pv(suffix), value)
        except WriteRefused as exc:
            # A refusing putter leaves its reason in LAST_ERROR; CA itself says little.
            why = text_of(await self.read("LAST_ERROR")) if suffix != "LAST_ERROR" else ""
            raise BadRequest(f"{exc}: {why}" if why else str(exc)) from None
        if confirm:
            await self.wait_for(suffix, lambda v: v == value, 1.0)

    async def wait_for(self, suffix: str, ok: Callable[[Any], bool], timeout: float | None) -> Any:
        """Wait until the PV's value satisfies ok (None: no time limit); return the last
        value seen either way."""
        name = self.pv(suffix)
        value = await self.read(suffix)
        deadline = None if timeout is None else time.monotonic() + timeout
        entry = self.services.source.entries[name]
        while not ok(value):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                await asyncio.wait_for(entry.updated.wait(), left)
            except TimeoutError:
                break
            entry = self.services.source.entries.get(name, entry)
            value = entry.value
        return value

    async def sites(self) -> list[SiteView]:
        """The sites the IOC can read (SITELIST); startReadout's mod_list picks SITES."""
        text = text_of(await self.read("SITELIST"))
        sites = [int(s) for s in text.replace(" ", "").split(",") if s.isdigit()]
        counts = await asyncio.gather(*(self.read(f"{s}:NCHAN") for s in sites))
        sizes = await asyncio.gather(*(self.read(f"{s}:WORD_SIZE") for s in sites))
        return [SiteView(s, int(n), int(w)) for s, n, w in zip(sites, counts, sizes, strict=True)]

    # -- access to a card --

    def _card_for(self, args: dict[str, Any]) -> CardConfig:
        host = args.get("ip_addr")
        for card in self.services.config.cards:
            if host in (card.host, card.name):
                return card
        raise BadRequest(f"{host!r} is not one of the digitizers {self._hosts()}")

    def _hosts(self) -> list[str]:
        return [c.host for c in self.services.config.cards]

    def need_card(self) -> CardConfig:
        if self.card is None:
            raise BadRequest(
                "no digitizer selected: requestDigitizerControl or requestBufferStream"
            )
        return self.card

    def need_control(self, what: str) -> CardConfig:
        card = self.need_card()
        if not self.control or self.services.owners.get(card.host) is not self:
            raise BadRequest(f"{what} needs control of {card.host} (requestDigitizerControl)")
        return card

    def _release(self, why: str) -> None:
        if self.card is not None and self.services.owners.get(self.card.host) is self:
            del self.services.owners[self.card.host]
            self.announce_others(f"'{self.card.host}' digitizer released ({why})")
            log.info("%s: released %s (%s)", self.peer_name, self.card.host, why)
        self.control = False

    def _select(self, card: CardConfig) -> None:
        if self.card is not None and self.card.host != card.host:
            for name in self.watched:
                self.services.source.unsubscribe(name, self)
            self.watched = set()
            self.buffers = Buffers()
        self.card = card


# -- commands --


async def initialize_web_page(s: LegacySession, args: dict[str, Any]) -> Any:
    return {"urls": s._hosts()}


async def request_control(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s._card_for(args)
    s.require_write(f"control of {card.host}")
    owner = s.services.owners.get(card.host)
    if owner is not None and owner is not s:
        raise BadRequest(f"{card.host} is controlled by another client ({owner.peer_name})")
    if s.card is not None and s.card.host != card.host:
        s._release("control moved to another card")
    s._select(card)
    s.control = True
    s.services.owners[card.host] = s
    s.announce_others(f"{card.host} is now controlled by {s.peer_name}")
    log.info("%s: controls %s", s.peer_name, card.host)
    return None


async def request_stream(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s._card_for(args)
    if s.card is not None and s.card.host != card.host:
        s._release("switched to a buffer stream")
    s._select(card)
    s.control = s.services.owners.get(card.host) is s
    return None


async def release_control(s: LegacySession, args: dict[str, Any]) -> Any:
    s._release("released by its owner")  # as before: a no-op without control
    return None


async def get_channels(s: LegacySession, args: dict[str, Any]) -> Any:
    """The old server's answer, key by key (the page builds its controls from it)."""
    s.need_card()
    sites = await s.sites()
    if not sites:
        raise BadRequest(f"getChannels: {s.need_card().host} reports no AI sites yet")
    first = sites[0]
    divider, clkdiv, ext, ext_freq, sysclk = await asyncio.gather(
        s.read(f"{first.site}:DIVIDER_RBV"), s.read("CLKDIV_RBV"), s.read("EXT_CLOCK"),
        s.read("EXT_CLOCK_FREQ"), s.read("SYSCLK_RBV"),
    )  # fmt: skip
    max_bytes = await asyncio.gather(*(s.read(f"{x.site}:BUFFER_MAX") for x in sites))
    gains = {}
    labels: tuple[str, ...] = ()
    for site in sites:
        codes, labels_here = await _gains(s, site)
        gains[str(site.site)] = {str(ch): code for ch, code in enumerate(codes)}
        labels = labels or labels_here
    word = first.word_size
    return {
        "mods": {str(x.site): x.nchan for x in sites},
        "divide": int(divider),
        "current_clk_div": int(clkdiv),
        "readout_size": word,
        # In words, as the old page counts: what the IOC's BUFFER_SIZE accepts.
        "max_buffer": min(int(b) for b in max_bytes) // word,
        "min_buffer": MIN_BUFFER_BYTES // word,
        "gain_settings": {str(i): label for i, label in enumerate(labels)},
        "ext_frequency": float(ext_freq) if ext else 0,
        "current_gains": gains,
        "sysclk": int(sysclk),
    }


async def _gains(s: LegacySession, site: SiteView) -> tuple[list[int], tuple[str, ...]]:
    names = [f"{site.site}:GAIN:{ch:02d}" for ch in range(1, site.nchan + 1)]
    entries = await asyncio.gather(*(s.entry(n) for n in names))
    labels = entries[0].shape.labels if entries and entries[0].shape is not None else ()
    return [int(e.value) for e in entries], labels


async def read_current_gains(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_card()
    result = {}
    for site in await s.sites():
        gains, _ = await _gains(s, site)
        result[str(site.site)] = {str(ch): g for ch, g in enumerate(gains)}
    return result


def _number(value: Any, what: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadRequest(f"{what} must be a number, not {value[:40]!r}") from None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a number, not {json.dumps(value)[:40]}")
    return float(value)


async def set_clkdiv(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("setClkDiv")
    # The page sends sysclk / divide / rate, a float: truncated, as the old server did.
    clkdiv = int(_number(args.get("clkdiv"), "setClkDiv: clkdiv"))
    sites = await s.sites()
    minimum = max([int(await s.read(f"{x.site}:CLKDIV_MIN")) for x in sites] or [1])
    if clkdiv < minimum:
        raise BadRequest(f"setClkDiv: clkdiv {clkdiv} is below the module minimum {minimum}")
    await s.write("CLKDIV", clkdiv)
    return int(await s.wait_for("CLKDIV_RBV", lambda v: v == clkdiv, 5.0))


async def use_external_clock(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("useExternalClock")
    freq = args.get("freq_in_hz")
    if freq is None:
        await s.write("EXT_CLOCK", 0)
        return 0
    hz = _number(freq, "useExternalClock: freq_in_hz")
    if hz <= 0:
        raise BadRequest("useExternalClock: freq_in_hz must be above 0 (or null: internal)")
    await s.write("EXT_CLOCK_FREQ", hz)
    await s.write("EXT_CLOCK", 1)
    return freq


async def perform_cmd(s: LegacySession, args: dict[str, Any]) -> Any:
    """Raw knob commands: only gain settings, which become gain PV writes."""
    s.need_control("performCmd")
    given = args.get("cmd")
    cmds = [given] if isinstance(given, str) else given
    if not isinstance(cmds, list) or not all(isinstance(c, str) for c in cmds):
        raise BadRequest("performCmd: cmd must be a string or a list of strings")
    sites = [x.site for x in await s.sites()]
    writes: list[tuple[str, str, int]] = []
    for cmd in cmds:  # parse all first: a bad one refuses the lot
        m = GAIN_CMD.match(cmd)
        if m is None:
            raise BadRequest(
                "performCmd accepts only gain settings (set.site N gainC code, gainC=code, "
                f"gain=code); refused {cmd[:80]!r}"
            )
        site_text, channel, code = m.groups()
        targets = [int(site_text)] if site_text else sites[:1] if channel else sites
        for site in targets:
            if site not in sites:
                raise BadRequest(f"performCmd: site {site} is not one of {sites}")
            knob = f"GAIN:{int(channel):02d}" if channel else "GAIN:ALL"
            writes.append((cmd, f"{site}:{knob}", int(code)))
    for _, suffix, code in writes:
        await s.write(suffix, code)
    # A knob set answers nothing: the old server's reply per command was empty.
    replies = {cmd: "" for cmd, _, _ in writes}
    return replies if isinstance(given, list) else ""


def _trigger_dir(s: LegacySession) -> str:
    d = s.services.config.ioc.trigger_dir
    return str(d) if d else "(none configured: [ioc] trigger_dir)"


async def _trigger_names(s: LegacySession) -> list[str]:
    try:
        names = json.loads(text_of(await s.read("TRIGGERS")) or "[]")
    except ValueError:
        names = []
    return [n for n in names if isinstance(n, str)]


async def _check_trigger(s: LegacySession, trigger: Any) -> str:
    if trigger in (None, ""):
        return DEFAULT_TRIGGER
    if not isinstance(trigger, str):
        raise BadRequest("trigger must be the name of a trigger")
    names = await _trigger_names(s)
    if trigger in names:
        return trigger
    if any(h in trigger for h in SOURCE_HINTS):
        raise BadRequest(
            "trigger source code is not run by this server: put the trigger class in a "
            f"Python file in {_trigger_dir(s)} and send its name; available: {names}"
        )
    raise BadRequest(f"unknown trigger {trigger[:64]!r}; available: {names} (in {_trigger_dir(s)})")


async def check_trigger(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_card()
    await _check_trigger(s, args.get("trigger"))
    return True


def _arg(args: dict[str, Any], key: str, kinds: Any, default: Any, what: str) -> Any:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"startReadout: {key} must be {what}")
    if not isinstance(value, kinds):
        raise BadRequest(f"startReadout: {key} must be {what}, not {type(value).__name__}")
    return value


def buffer_bytes(words: int, sites: list[SiteView], most: int = 0) -> int:
    """``buffer_size`` (a count of words) in bytes, rounded up to whole samples; with
    `most`, no more whole samples than fit in it (the page's largest choice is exactly
    getChannels' max_buffer, which rounding up would carry past the IOC's limit)."""
    word = sites[0].word_size
    sample = (sum(x.nchan for x in sites) + SPAD_WORDS * SPAD_BYTES // word) * word
    samples = max(1, -(-words * word // sample))
    if most:
        samples = max(1, min(samples, most // sample))
    return samples * sample


async def start_readout(s: LegacySession, args: dict[str, Any]) -> Any:
    """Start a run and answer at once; its end is announced (see `watch_run`)."""
    card = s.need_control("startReadout")
    if await s.read("RUN:STATE_RBV") in (STARTING, RUNNING):
        raise BadRequest(f"startReadout: a readout of {card.host} is already running")
    sites = await s.sites()
    numbers = [x.site for x in sites]
    mod_list = _arg(args, "mod_list", list, numbers, "a list of sites")
    mod_list = [int(m) if isinstance(m, str) and m.isdigit() else m for m in mod_list]
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in mod_list):
        raise BadRequest(f"startReadout: mod_list must hold site numbers among {numbers}")
    if not mod_list or not set(mod_list) <= set(numbers):
        raise BadRequest(f"startReadout: mod_list {mod_list} must name sites among {numbers}")
    channels = _arg(args, "channel_list", list, [], "a list of channel indices")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels):
        raise BadRequest("startReadout: channel_list must hold channel indices (0-based)")
    downsample = _arg(args, "downsample", int, 1, "an integer >= 1")
    if downsample < 1:
        raise BadRequest("startReadout: downsample must be >= 1")
    logitems = _arg(args, "logitems", dict, {}, "a JSON object")
    trigger_args = _arg(args, "trigger_args", dict, {}, "a JSON object")
    upload = bool(_arg(args, "should_upload", (bool, int), False, "a boolean"))
    # The old page greys out "save" without "upload": saving alone is the IOC's extra.
    save = bool(_arg(args, "should_save", (bool, int), False, "a boolean"))
    writes: list[tuple[str, Any]] = [
        ("RUN:TRIGGER", await _check_trigger(s, args.get("trigger"))),
        ("RUN:TRIGGER_ARGS", json.dumps(trigger_args)),
        ("RUN:NAME", _arg(args, "measurement_name", str, "", "a string")),
        ("RUN:LOG", _arg(args, "log", str, "", "a string")),
        ("RUN:SAVE", int(save)),
        ("RUN:UPLOAD", int(upload)),
        ("RUN:DOWNSAMPLE", downsample),
        ("RUN:CHANNELS", ",".join(str(c) for c in channels)),
        ("RUN:LOGITEMS", json.dumps(logitems)),
    ]
    words = _number(args.get("buffer_size") or 0, "startReadout: buffer_size (words)")
    if words < 0:
        raise BadRequest("startReadout: buffer_size must be a count of words, not negative")
    run_sites = [x for x in sites if x.site in mod_list]
    if words:
        limits = (await s.entry("BUFFER_SIZE")).limits
        most = int(limits[1]) if limits else 0
        writes.insert(0, ("BUFFER_SIZE", buffer_bytes(math.ceil(words), run_sites, most)))
    chosen = ",".join(str(x.site) for x in run_sites)
    if text_of(await s.read("SITES")).replace(" ", "") != chosen:
        writes.insert(0, ("SITES", chosen))  # restarts the stream: before the run's settings
    for suffix, value in writes:
        await s.write(suffix, value)
    before = text_of(await s.read("RUN:ID_RBV"))
    s.follow_buffers()
    await s.write("RUN:START", 1, confirm=False)
    s.run_sites = [x.site for x in run_sites]
    s.buffers.handed, s.buffers.run_id = s.buffers.seen, ""  # nothing earlier is new
    if s.watcher is not None:
        s.watcher.cancel()
    s.watcher = s.services.spawn(watch_run(s, before, upload))
    # Answered once the IOC shows the run (quick), so the page's first poll finds it.
    await s.wait_for("RUN:STATE_RBV", lambda v: v != 0, 2.0)
    return None


async def stop_readout(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("stopReadout")
    await s.write("RUN:STOP", 1, confirm=False)
    return None  # answered at once; the run's end is announced


async def watch_run(s: LegacySession, before: str, upload: bool) -> None:
    """Announce a run's results when it ends: DocUpload, FileUpload per file, JobFinished."""
    try:
        run_id = text_of(await s.wait_for("RUN:ID_RBV", lambda v: text_of(v) not in ("", before),
                                          START_TIMEOUT_S))  # fmt: skip
        if run_id in ("", before):
            why = text_of(await s.read("LAST_ERROR")) or "the run did not start"
            s.announce({"type": "JobFinished", "error": why})
            return
        s.buffers.run_id = run_id
        text = await s.wait_for(
            "RUN:LAST_RESULT", lambda v: _result_of(v, run_id) is not None, None
        )
        result = _result_of(text, run_id) or {}
        if upload and s.services.config.archive.backend == "couchdb":
            missing = await announce_uploads(s, run_id, result)
            if missing:
                s.announce({"type": "JobFinished", "error": missing})
                return
        fault = result.get("fault") or ""
        if fault or result.get("state") == "fault":
            s.announce({"type": "JobFinished", "error": fault or "readout failed"})
        else:
            s.announce({"type": "JobFinished", "msg": "Readout job completed"})
    except asyncio.CancelledError:
        raise
    except BadRequest as exc:
        s.announce({"type": "JobFinished", "error": str(exc)})
    except Exception as exc:
        log.exception("%s: watching the run failed", s.peer_name)
        s.announce({"type": "JobFinished", "error": f"watching the run failed: {exc}"})


def _result_of(text: Any, run_id: str) -> dict[str, Any] | None:
    try:
        result = json.loads(text_of(text) or "{}")
    except ValueError:
        return None
    return result if isinstance(result, dict) and result.get("run_id") == run_id else None


async def announce_uploads(s: LegacySession, run_id: str, result: dict[str, Any]) -> str:
    """Follow the run's document in the database; announce it and each file as they are in.

    Returns "" when all are in, else why not (the IOC's spool keeps trying)."""
    from dtacq_ioc.archive.couchdb import CouchClient, CouchError, CouchSettings, run_doc_id

    config = s.services.config
    try:
        client = CouchClient(CouchSettings.from_config(config.archive.couchdb))
    except CouchError as exc:
        return str(exc)
    doc_id = run_doc_id(run_id)
    files = [PurePosixPath(str(p)) for p in result.get("files") or []]
    announced: set[str] = set()
    posted = False
    deadline = time.monotonic() + UPLOAD_WAIT_S
    last_error = ""
    with client:
        while time.monotonic() < deadline:
            try:
                doc = await asyncio.to_thread(client.get_document, doc_id)
            except CouchError as exc:
                doc, last_error = None, str(exc)
            if doc is not None:
                if not posted:
                    posted = True
                    s.announce({"type": "DocUpload", "ok": True, "id": doc_id, "msg": "inserted"})
                for rel in files:
                    if rel.name not in announced and _file_in(client, doc, config, rel):
                        announced.add(rel.name)
                        s.announce({
                            "type": "FileUpload", "ok": True, "id": doc_id, "file_name": rel.name,
                            "url": client.file_link(doc_id, rel.name),
                        })  # fmt: skip
                if len(announced) == len(files):
                    return ""
            await asyncio.sleep(UPLOAD_POLL_S)
    left = [p.name for p in files if p.name not in announced]
    what = f"files {', '.join(left)}" if posted else "the measurement document"
    detail = f" ({last_error})" if last_error else ""
    return (
        f"{what} not in the database after {UPLOAD_WAIT_S:g} s{detail}; "
        "the IOC's spool keeps trying (dtacq-ioc runs show)"
    )


def _file_in(client: Any, doc: dict[str, Any], config: Any, rel: PurePosixPath) -> bool:
    from dtacq_ioc.archive.records import RunFile

    local = Path(config.archive.data_dir) / rel
    try:
        size = local.stat().st_size
    except OSError:  # a bridge on another host: the entry alone must do
        key = "external_docs" if client.settings.file_server else "_attachments"
        return rel.name in (doc.get(key) or {})
    return client.file_confirmed(doc, RunFile(rel.name, str(local), size, ""))


async def read_buffer(s: LegacySession, args: dict[str, Any]) -> Any:
    """The newest run buffer not yet handed to this client, channel-major; the header
    alone while none is new; 0xdeadbeef once the run it saw has ended."""
    s.need_card()
    channels = args.get("channels")
    include_counter = bool(args.get("include_counter", False))
    if not isinstance(channels, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels
    ):
        raise BadRequest("readBuffer: channels must be a list of channel indices (0-based)")
    s.follow_buffers()
    state = await s.read("RUN:STATE_RBV")
    starting = state == 1 or (
        s.watcher is not None and not s.watcher.done() and not s.buffers.run_id
    )
    if state != RUNNING and not starting:
        if s.buffers.run_id:
            return struct.pack("<I", NO_RUN)
        raise BadRequest("measurement is not running")
    if state == RUNNING and not s.buffers.run_id:
        s.buffers.run_id = text_of(await s.read("RUN:ID_RBV"))
    sites = await s.sites()
    owner = s.services.owners.get(s.need_card().host)
    run_sites = getattr(owner, "run_sites", None) or [x.site for x in sites]
    columns = [x for x in sites if x.site in run_sites]
    total = sum(x.nchan for x in columns)
    if any(c >= total for c in channels):
        raise BadRequest(f"readBuffer: channels must be indices in 0..{total - 1}")
    if state != RUNNING:
        data, count = None, s.buffers.seen
    elif _has_buffer_pv(s):
        data, count = _new_buffer(s, channels, columns, await _shifts(s, columns))
    else:
        data, count = await _new_frame(s, channels, columns)
    n = len(channels) | (COUNTER_FLAG if include_counter else 0)
    header = [n, *channels] + ([count & 0xFFFFFFFF] if include_counter else [])
    head = np.asarray(header, dtype="<u4").tobytes()
    return head if data is None else head + data


def _has_buffer_pv(s: LegacySession) -> bool:
    """Whether the IOC serves RUN:BUFFER (until its search has failed, assume it does)."""
    entry = s.services.source.entries.get(s.pv(BUFFER_PV))
    return entry is None or not entry.missing


def _dtype(columns: list[SiteView]) -> np.dtype:
    return np.dtype("<i2" if columns[0].word_size == 2 else "<i4")


async def _shifts(s: LegacySession, columns: list[SiteView]) -> np.ndarray:
    shifts = await asyncio.gather(*(s.read(f"{x.site}:BIT_SHIFT") for x in columns))
    return np.repeat(np.asarray(shifts, dtype=np.int64), [x.nchan for x in columns])


def _new_buffer(
    s: LegacySession, channels: list[int], columns: list[SiteView], shift_of: np.ndarray
) -> tuple[bytes | None, int]:
    """The channels of the newest run buffer not handed out yet, channel-major, shifted to
    ADC codes (None: none is new), and its count."""
    b = s.buffers
    seen, latest = b.seen, b.latest  # taken together, with no await in between
    if seen <= b.handed or latest is None:
        return None, seen
    words = np.asarray(latest)
    total = len(shift_of)
    if words.size % total:
        raise BadRequest(
            f"readBuffer: {BUFFER_PV} holds {words.size} words, not whole samples of "
            f"{total} channels"
        )
    rows = words.reshape(-1, total)[:, channels]
    out = np.right_shift(rows.astype(np.int64), shift_of[channels]).T
    b.handed = seen
    return np.ascontiguousarray(out.astype(_dtype(columns))).tobytes(), seen


async def _new_frame(
    s: LegacySession, channels: list[int], columns: list[SiteView]
) -> tuple[bytes | None, int]:
    """An IOC without RUN:BUFFER: its display frame stands in for the buffer, each handed
    out once (told apart by the waveforms' own timestamps)."""
    names = []
    for c in channels:
        for site in columns:
            if c < site.nchan:
                names.append(f"{site.site}:AI:WF:{c + 1:02d}")
                break
            c -= site.nchan
    entries = await asyncio.gather(*(s.entry(n) for n in names))
    b = s.buffers
    stamp = max((e.timestamp for e in entries), default=0.0)
    if not entries or stamp == b.frame_stamp:
        return None, b.seen
    arrays = [np.asarray(e.value) for e in entries]
    length = min(len(a) for a in arrays)
    b.frame_stamp, b.seen = stamp, b.seen + 1
    b.handed = b.seen
    return b"".join(a[:length].astype(_dtype(columns)).tobytes() for a in arrays), b.seen


async def reset_readout(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("resetReadout")
    await s.write("RESET", 1, confirm=False)
    return None


async def reboot_card(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s.need_control("rebootCard")
    await s.write("REBOOT", 1, confirm=False)
    s._release(f"{card.host} rebooting")
    return None


Handler = Callable[[LegacySession, dict[str, Any]], Awaitable[Any]]

COMMANDS: dict[str, Handler] = {
    "initializeWebPage": initialize_web_page,
    "requestDigitizerControl": request_control,
    "requestBufferStream": request_stream,
    "releaseDigitizerControl": release_control,
    "getChannels": get_channels,
    "setClkDiv": set_clkdiv,
    "useExternalClock": use_external_clock,
    "readCurrentGains": read_current_gains,
    "performCmd": perform_cmd,
    "startReadout": start_readout,
    "stopReadout": stop_readout,
    "readBuffer": read_buffer,
    "resetReadout": reset_readout,
    "rebootCard": reboot_card,
    "checkTrigger": check_trigger,
}
