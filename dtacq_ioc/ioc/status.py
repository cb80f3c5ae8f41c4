"""The IOC's own health: a status PV group, and `dtacq-ioc status` that reads it over CA.

PVs under the config's `ioc.prefix` (default `DTACQ:<name>:`), updated at 1 Hz:
UPTIME, VERSION, CARDS, CARDS_CONNECTED, RUNS_SPOOLED, LAST_ERROR, HEARTBEAT, and
CA:ARRAY_UPDATES / CA:ARRAY_DROPS (big-array monitor updates sent, and dropped
because a client was too slow to take them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from caproto import AlarmSeverity, AlarmStatus, ChannelType

from dtacq_ioc import __version__
from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.config import Config
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.cadence import Cadence

if TYPE_CHECKING:
    from dtacq_ioc.ioc.controller import CardController
    from dtacq_ioc.ioc.fanout import Fanout


class StatusSink(Protocol):
    """Where the one-line status goes (systemd's STATUS=, see dtacq_ioc/notify.py)."""

    def status(self, text: str) -> None: ...


log = logging.getLogger(__name__)

PERIOD_S = 1.0
# Per-card PVs `dtacq-ioc status` shows, as (column title, PV suffix).
CARD_COLUMNS = (
    ("state", "STATE"),
    ("connected", "CONNECTED"),
    ("rate (Hz)", "SAMPLE_RATE_RBV"),
    ("run", "RUN:STATE_RBV"),
    ("MB/s", "STREAM:MBPS"),
    ("counter errors", "STREAM:COUNTER_ERRORS"),
)
IOC_FIELDS = ("UPTIME", "VERSION", "CARDS", "CARDS_CONNECTED", "RUNS_SPOOLED", "HEARTBEAT",
              "CA:ARRAY_UPDATES", "CA:ARRAY_DROPS",
              "LAST_ERROR")  # fmt: skip

_OK = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
_MINOR = (AlarmStatus.STATE, AlarmSeverity.MINOR_ALARM)
_MAJOR = (AlarmStatus.STATE, AlarmSeverity.MAJOR_ALARM)


class StatusGroup(pvs.CheckedGroup):
    """Read-only PVs; names relative to the IOC prefix."""

    uptime = pvs.number("UPTIME", "IOC uptime", units="s", precision=0, alarm_group=None)
    version = pvs.string("VERSION", "dtacq-ioc version", value=__version__, alarm_group=None)
    cards = pvs.integer("CARDS", "Cards configured", alarm_group=None)
    cards_connected = pvs.integer("CARDS_CONNECTED", "Cards connected", alarm_group=None)
    runs_spooled = pvs.integer("RUNS_SPOOLED", "Runs waiting for the database",
                               alarm_group=None)  # fmt: skip
    last_error = pvs.long_string("LAST_ERROR", "Latest error of IOC or a card", alarm_group=None)
    heartbeat = pvs.integer("HEARTBEAT", "IOC heartbeat, +1 per second", alarm_group=None)
    array_updates = pvs.number("CA:ARRAY_UPDATES", "Big-array monitor updates sent",
                               precision=0, alarm_group=None)  # fmt: skip
    array_drops = pvs.number("CA:ARRAY_DROPS", "Array updates dropped, client slow",
                             precision=0, alarm_group=None)  # fmt: skip


class _LatestError(logging.Handler):
    """Keeps the newest ERROR record logged by the IOC's own code: when (monotonic), what."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.latest: tuple[float, str] = (0.0, "")

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.latest = (time.monotonic(), record.getMessage())


class IocStatus:
    """Publishes the status group from the controllers, the catalog and the error log."""

    def __init__(
        self,
        config: Config,
        controllers: Sequence[CardController],
        catalog: Catalog,
        notifier: StatusSink | None = None,
        fanout: Fanout | None = None,
        shot_arm: pvs.Handler | None = None,
    ):
        self.config = config
        self.fanout = fanout
        self.controllers = list(controllers)
        self.catalog = catalog
        self.notifier = notifier
        actions: dict[str, Any] = {}
        if shot_arm is not None:  # every card in TRANSIENT mode armed at once (shotgroup.py)
            actions["shots_arm"] = pvs.action("SHOTS:ARM", "Arm every transient card", shot_arm)
        cls = type("IocStatusGroup", (StatusGroup,), actions)
        self.group = cls(prefix=config.ioc.prefix)
        self.group.refusal_sink = self._refused
        self.pvdb = self.group.pvdb
        self._started = time.monotonic()
        self._errors = _LatestError()
        self._refusal: tuple[float, str] = (0.0, "")  # the newest refused put to our PVs
        self._last_status = ""
        self._alarm: tuple[AlarmStatus, AlarmSeverity] | None = None
        self._delivery = ""

    def pv(self, suffix: str) -> Any:
        return self.pvdb[self.config.ioc.prefix + suffix]

    async def run(self) -> None:
        """Update every PERIOD_S until cancelled; watches the `dtacq_ioc` log for errors."""
        root = logging.getLogger("dtacq_ioc")
        root.addHandler(self._errors)
        try:
            await self.pv("CARDS").write(len(self.controllers), verify_value=False)
            cadence = Cadence(PERIOD_S)
            while True:
                try:
                    await self.update()
                except Exception:
                    log.exception("updating the status PVs failed")
                await cadence.wait()
        finally:
            root.removeHandler(self._errors)

    def connected(self) -> int:
        return sum(c.pvs.value("CONNECTED") == "Yes" for c in self.controllers)

    def spooled(self) -> int:
        spool = getattr(self.catalog, "spool", None)
        return len(spool.pending()) if spool is not None else 0

    async def _refused(self, message: str) -> None:
        """A refused put to one of the IOC's own PVs: in LAST_ERROR before the client hears."""
        self._refusal = (time.monotonic(), message)
        await self.pv("LAST_ERROR").write(message[-(pvs.LONG_STRING - 1) :], verify_value=False)

    def _newest_error(self) -> str:
        """The newest of the IOC's errors (a refused put, an error logged) and the cards'
        (a card error not logged still counts), by when each happened: this loop sees them
        up to a second late, and then a card's older error must not hide a newer refusal."""
        errors = [self._refusal, self._errors.latest,
                  *((c.last_error_at, c.last_error) for c in self.controllers)]  # fmt: skip
        return max((e for e in errors if e[1]), default=(0.0, ""))[1]

    async def update(self) -> None:
        now = time.time()
        uptime = time.monotonic() - self._started
        connected = self.connected()
        spooled = await asyncio.to_thread(self.spooled)
        values = {
            "UPTIME": float(int(uptime)),
            "HEARTBEAT": int(uptime),
            "CARDS_CONNECTED": connected,
            "RUNS_SPOOLED": spooled,
            "LAST_ERROR": self._newest_error()[-(pvs.LONG_STRING - 1) :],
        }
        if self.fanout is not None:
            values["CA:ARRAY_UPDATES"] = float(self.fanout.sent)
            values["CA:ARRAY_DROPS"] = float(self.fanout.dropped)
        for suffix, value in values.items():
            pv = self.pv(suffix)
            if suffix in ("UPTIME", "HEARTBEAT") or pv.value != value:
                await pv.write(value, verify_value=False, timestamp=now)
        alarm = _OK if connected == len(self.controllers) else _MINOR
        if alarm != self._alarm:
            self._alarm = alarm
            await self.pv("CARDS_CONNECTED").alarm.write(status=alarm[0], severity=alarm[1])
        await self._delivery_alarm()
        self._notify_status(connected, spooled)

    async def _delivery_alarm(self) -> None:
        """RUNS_SPOOLED goes MAJOR, LAST_ERROR names run, file and the database's answer,
        while the database keeps refusing a file."""
        text = str(getattr(self.catalog, "delivery_alarm", "") or "")
        if text == self._delivery:
            return
        self._delivery = text
        alarm = _MAJOR if text else _OK
        await self.pv("RUNS_SPOOLED").alarm.write(status=alarm[0], severity=alarm[1])
        if text:
            log.error("%s", text)  # the newest error: LAST_ERROR shows it

    def _notify_status(self, connected: int, spooled: int) -> None:
        text = f"{connected}/{len(self.controllers)} cards connected, {spooled} runs spooled"
        if self.notifier is not None and text != self._last_status:
            self._last_status = text
            self.notifier.status(text)


# --- `dtacq-ioc status CONFIG`: a Channel Access client ---------------------------------


class StatusUnavailable(Exception):
    """The IOC did not answer; str is the one-line reason."""


@dataclass(frozen=True)
class StatusReport:
    ioc: dict[str, str]  # status suffix -> text
    cards: dict[str, dict[str, str]]  # card name -> PV suffix -> text ("" when unanswered)


def _text(pv: Any, timeout: float) -> str:
    """One PV's value as text: enums by label, long strings decoded, numbers compact."""
    native = pv.channel.native_data_type
    if native == ChannelType.ENUM:
        reading = pv.read(data_type=ChannelType.STRING, timeout=timeout)
    else:
        reading = pv.read(timeout=timeout)
    data = reading.data
    if native == ChannelType.CHAR:
        return bytes(data).rstrip(b"\0").decode("utf-8", "replace")
    value = data[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if native in (ChannelType.DOUBLE, ChannelType.FLOAT):
        return f"{float(value):.6g}"
    return str(value)


def read_status(config: Config, timeout: float) -> StatusReport:
    """Read the IOC's status and each card's summary PVs; StatusUnavailable if no answer."""
    from caproto.threading.client import Context

    prefix = config.ioc.prefix
    ioc_names = [prefix + s for s in IOC_FIELDS]
    card_names = [c.prefix + s for c in config.cards for _, s in CARD_COLUMNS]
    deadline = time.monotonic() + timeout
    with Context(timeout=timeout) as ctx:
        found = ctx.get_pvs(*ioc_names, *card_names, timeout=timeout)
        by_name = dict(zip([*ioc_names, *card_names], found, strict=True))

        def read(name: str) -> str | None:
            left = max(0.05, deadline - time.monotonic())
            try:
                by_name[name].wait_for_connection(timeout=left)
                return _text(by_name[name], left)
            except (TimeoutError, OSError) as exc:
                log.debug("%s: %r", name, exc)
                return None

        heartbeat = read(prefix + "HEARTBEAT")
        if heartbeat is None:
            raise StatusUnavailable(
                f"IOC {config.ioc.name!r} did not answer {prefix}HEARTBEAT within {timeout:g} s "
                "(not running, or not reachable through EPICS_CA_ADDR_LIST)"
            )
        ioc = {s: read(prefix + s) or "" for s in IOC_FIELDS}
        cards = {
            c.name: {s: read(c.prefix + s) or "" for _, s in CARD_COLUMNS} for c in config.cards
        }
    return StatusReport(ioc=ioc, cards=cards)


def render(config: Config, report: StatusReport) -> list[Any]:
    """The report as rich tables: the IOC's fields, then one row per card."""
    from rich.table import Table

    ioc = Table(title=f"IOC {config.ioc.name} ({config.ioc.prefix})", show_header=False)
    ioc.add_column("field", style="bold")
    ioc.add_column("value", overflow="fold")
    for field in IOC_FIELDS:
        ioc.add_row(field, report.ioc.get(field, ""))
    cards = Table(title="Cards")
    cards.add_column("card", style="bold")
    cards.add_column("prefix")
    for title, _ in CARD_COLUMNS:
        cards.add_column(title, justify="right" if title != "state" else "left")
    for c in config.cards:
        values = report.cards.get(c.name, {})
        cards.add_row(c.name, c.prefix, *(values.get(s, "") or "?" for _, s in CARD_COLUMNS))
    return [ioc, cards]


def print_status(config: Config, timeout: float = 3.0) -> int:
    """`dtacq-ioc status`: 0 and tables on stdout, or 1 and a one-line error on stderr."""
    from rich.console import Console

    # The CA client logs search retries at WARNING; they would bury the table.
    logging.getLogger("caproto").setLevel(logging.ERROR)
    try:
        report = read_status(config, timeout)
    except StatusUnavailable as exc:
        sys.stderr.write(f"dtacq-ioc status: {exc}\n")
        return 1
    # PV names are data: no ":UP:" emoji, no [markup] from error texts.
    console = Console(file=sys.stdout, emoji=False, markup=False, highlight=False)
    for table in render(config, report):
        console.print(table)
    return 0
