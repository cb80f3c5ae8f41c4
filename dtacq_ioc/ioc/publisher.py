"""Publishing a card's PVs at the display rate: state, readbacks, stream and run figures,
display frames; and the derived waveforms (volts, spectra) made when watched or read.

PVs are written only here and by put handlers, from the asyncio loop, so a slow card
never stalls Channel Access.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from caproto import AlarmSeverity, AlarmStatus

from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.contract import NO_YES
from dtacq_ioc.ioc.cadence import Cadence
from dtacq_ioc.ioc.cardgroup import CardPVs, SiteLayout, Update
from dtacq_ioc.ioc.context import CardContext
from dtacq_ioc.ioc.link import CardLink
from dtacq_ioc.readout.display import Axes, DisplayStage, Snapshot
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)
timing = logging.getLogger("dtacq_ioc.timing")  # see the CLI's --debug

RECENT_RUNS = 20

_MAJOR = (AlarmStatus.STATE, AlarmSeverity.MAJOR_ALARM)
_MINOR = (AlarmStatus.STATE, AlarmSeverity.MINOR_ALARM)
_OK = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
_LOST = (AlarmStatus.COMM, AlarmSeverity.INVALID_ALARM)
_DOWN = (AlarmStatus.COMM, AlarmSeverity.MAJOR_ALARM)  # a true value that needs attention


@dataclass(frozen=True)
class DerivedPV:
    """A PV of a frame, written only while watched, or made when a client reads it."""

    suffix: str
    channel: int  # among the card's AI channels
    kind: str  # raw, volts, spectrum, or a statistic: mean, min, max, rms
    narrow: bool = False  # raw codes of a 16-bit module in a 32-bit stream: sent as int16

    _STATISTIC = {"mean": "mean", "min": "minimum", "max": "maximum", "rms": "rms"}

    def value(self, snap: Snapshot) -> Any:
        kind, channel = self.kind, self.channel
        if kind == "raw":
            raw = snap.raw[channel]  # each snapshot's arrays are new: PVs may keep views
            return raw.astype(np.int16, copy=False) if self.narrow else raw
        if kind == "volts":
            return snap.volts(channel)
        if kind == "spectrum":
            return snap.spectrum(channel)
        return float(getattr(snap, self._STATISTIC[kind])[channel])


def derived_pvs(sites: list[SiteLayout]) -> list[DerivedPV]:
    """Every per-channel PV of a frame: raw codes, volts, spectrum and statistics."""
    out = []
    for layout in sites:
        narrow = layout.spec.word_size == 2
        for i, col in enumerate(layout.channels):
            ch = f"{i + 1:02d}"
            wf, mean = f"{layout.site}:AI:WF:{ch}", f"{layout.site}:AI:CH:{ch}"
            out += [
                DerivedPV(wf, col, "raw", narrow),
                DerivedPV(f"{wf}:V", col, "volts"),
                DerivedPV(f"{layout.site}:AI:SPEC:{ch}", col, "spectrum"),
                DerivedPV(mean, col, "mean"),
                *(DerivedPV(f"{mean}:{s.upper()}", col, s) for s in ("min", "max", "rms")),
            ]
    return out


@dataclass(frozen=True)
class _Frame:
    """The latest published snapshot: derived PVs older than `seq` are refreshed from it."""

    seq: int
    snap: Snapshot
    timestamp: float
    derived: dict[str, DerivedPV]  # the derived PVs of the sites in it, by suffix


class Publisher:
    def __init__(
        self,
        ctx: CardContext,
        pvs: CardPVs,
        link: CardLink,
        catalog: Catalog,
        triggers: TriggerRegistry,
        data_dir: Path,
    ):
        self.ctx = ctx
        self.pvs = pvs
        self.link = link
        self.catalog = catalog
        self.triggers = triggers
        self.data_dir = data_dir
        self._started = time.monotonic()
        # (display stage, its buffer count) of the last frame published: a new stage after a
        # reconnect counts from 0 again, so the count alone could match by chance.
        self._last_frame: tuple[DisplayStage | None, int] = (None, -1)
        self._run_reported: str | None = None
        self._frame: _Frame | None = None
        self._published_axes: Axes | None = None  # what the TB and FREQ PVs show
        # Per site set streamed (SITES): the derived PVs and the stream column each reads.
        self._derived: dict[tuple[int, ...], dict[str, DerivedPV]] = {}
        self._holds: dict[str, int] = {}  # derived PV suffix -> seq of the frame it shows
        self._refreshing = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_buffer: np.ndarray | None = None  # the newest run buffer not yet published
        for item in derived_pvs(ctx.sites):
            pvs.pv(item.suffix).refresher = partial(self._refresh, item.suffix)

    def _derived_of(self, layouts: list[SiteLayout]) -> dict[str, DerivedPV]:
        key = tuple(s.site for s in layouts)
        got = self._derived.get(key)
        if got is None:
            got = self._derived[key] = {d.suffix: d for d in derived_pvs(layouts)}
        return got

    async def publish_triggers(self) -> None:
        names = await asyncio.to_thread(self.triggers.names)
        await self.pvs.publish(Update(values={"TRIGGERS": json.dumps(sorted(names))}))

    async def run(self) -> None:
        period = 1.0 / self.ctx.ioc.display_rate_hz
        try:
            await self._publish_recent()
        except Exception:
            log.exception("%s: publishing recent runs failed", self.ctx.name)
        cadence = Cadence(period)
        while True:
            try:
                await self.publish_once()
            except Exception:
                log.exception("%s: publishing PVs failed", self.ctx.name)
            await cadence.wait()

    def _tap_run_buffers(self) -> None:
        """Copy run buffers for RUN:BUFFER only while a client watches it."""
        self._loop = asyncio.get_running_loop()
        watched = self.pvs.pv("RUN:BUFFER").watched
        self.ctx.readout.buffer_tap = self._take_buffer if watched else None

    def _take_buffer(self, ai: np.ndarray) -> None:
        """On the stream thread: keep a copy of the newest buffer; the loop publishes it."""
        copy = np.ascontiguousarray(ai).reshape(-1)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._buffer_arrived, copy)

    def _buffer_arrived(self, words: np.ndarray) -> None:
        pending, self._run_buffer = self._run_buffer, words
        if pending is None:  # a publish is not yet scheduled: one for the newest
            asyncio.get_running_loop().create_task(self._publish_run_buffer())

    async def _publish_run_buffer(self) -> None:
        words, self._run_buffer = self._run_buffer, None
        if words is not None:
            await self.pvs.publish(Update(values={"RUN:BUFFER": words}))

    async def publish_once(self) -> None:
        self._tap_run_buffers()
        ctx = self.ctx
        upd = Update()
        frame = None
        if self._connected() and ctx.readout.display is not None:
            frame = await self._frame_values(upd)
        # The rest is read after the frame's wait and written first: a refusal's LAST_ERROR
        # or a put's readback published meanwhile is never undone by an older reading.
        connected = upd.link_ok = self._connected()
        state = "RUNNING" if ctx.run_active() and connected else self.link.state
        frame_values, upd.values = upd.values, {}
        values = upd.values
        values.update(
            STATE=state,
            CONNECTED=NO_YES[connected],
            HEARTBEAT=int(time.monotonic() - self._started),
            LAST_ERROR=ctx.last_error[-4000:],
        )
        upd.alarms["STATE"] = _DOWN if not connected else _MAJOR if state == "FAULT" else _OK
        upd.alarms["CONNECTED"] = _OK if connected else _DOWN
        if connected:
            values.update(ctx.readbacks)
        self._stream_values(upd, connected)
        self._run_values(upd)
        values.update(frame_values)
        upd.timestamp = time.time()  # when the values are published, after the arithmetic
        if frame is not None:
            self._new_frame(*frame, upd)
        await self.pvs.publish(upd)
        if frame is not None and timing.isEnabledFor(logging.DEBUG):
            # The frame's messages are built; the fan-out sends them when the loop next turns.
            timing.debug("frame %s stamped %.6f built %.6f", self.ctx.config.name,
                         upd.timestamp, time.time())  # fmt: skip
        await self._report_finished_run()

    def _connected(self) -> bool:
        return self.ctx.connected and self.link.state != "DISCONNECTED"

    def _stream_values(self, upd: Update, connected: bool) -> None:
        stats = self.ctx.readout.stats()
        values = upd.values
        values["STREAM:MBPS"] = stats.mb_per_s
        values["STREAM:BUFFERS"] = int(stats.buffers)
        values["STREAM:SAMPLES"] = float(stats.samples)
        values["STREAM:COUNTER_ERRORS"] = stats.counter_errors
        upd.alarms["STREAM:COUNTER_ERRORS"] = (
            _LOST if not connected else _MINOR if stats.counter_errors else _OK
        )

    def _run_values(self, upd: Update) -> None:
        run = self.ctx.readout.run
        if run is None:
            return
        st = run.status()
        values = upd.values
        values["RUN:STATE_RBV"] = st["state"]
        values["RUN:ID_RBV"] = st["run_id"]
        values["RUN:SAMPLES_RBV"] = float(st["samples"])
        values["RUN:BYTES_RBV"] = float(st["bytes_written"])
        values["RUN:FILE_RBV"] = st["current_file"]
        values["RUN:ERRORS_RBV"] = st["counter_errors"]
        values["RUN:OVERRUNS_RBV"] = st["overruns"]
        values["RUN:ELAPSED_RBV"] = float(st["elapsed_s"])
        values["RUN:FAULT_RBV"] = st["fault"] or ""
        upd.alarms["RUN:ERRORS_RBV"] = _MAJOR if st["counter_errors"] else _OK
        upd.alarms["RUN:OVERRUNS_RBV"] = _MAJOR if st["overruns"] else _OK
        upd.alarms["RUN:STATE_RBV"] = _MAJOR if st["state"] == "FAULT" else _OK

    async def _frame_values(self, upd: Update) -> tuple[Snapshot, dict[str, DerivedPV]] | None:
        """A new frame's values into `upd`: the per-channel PVs that are watched (the others
        are made when read, see `DerivedPV`), the counter, and the axes when changed."""
        display = self.ctx.readout.display
        assert display is not None
        # The stage's own map: its frames hold the columns of the sites it was made for.
        layouts = self.ctx.stream_layouts(display.channel_map)
        of_frame = self._derived_of(layouts)
        wanted = [d for d in of_frame.values() if self.pvs.pv(d.suffix).watched]
        snap, derived = await asyncio.to_thread(_take_frame, display, wanted, self._last_frame)
        if (display, snap.updates) == self._last_frame or snap.samples == 0:
            return None
        self._last_frame = (display, snap.updates)
        values = upd.values
        values["AI:COUNTER"] = float(snap.counter)
        if snap.axes is not self._published_axes:  # snapshots share them until n or rate change
            self._published_axes = snap.axes
            for layout in layouts:
                values[f"{layout.site}:AI:WF:TB"] = snap.timebase_s
                if len(snap.freq_hz):
                    values[f"{layout.site}:AI:SPEC:FREQ"] = snap.freq_hz
        values.update(zip((d.suffix for d in wanted), derived, strict=True))
        return snap, of_frame

    def _new_frame(self, snap: Snapshot, derived: dict[str, DerivedPV], upd: Update) -> None:
        """Remember the frame being published and which derived PVs it brings up to date."""
        assert upd.timestamp is not None
        seq = self._frame.seq + 1 if self._frame is not None else 1
        self._frame = _Frame(seq, snap, upd.timestamp, derived)
        for suffix in derived:
            if suffix in upd.values:
                self._holds[suffix] = seq

    async def _refresh(self, suffix: str) -> None:
        """Bring a derived PV up to the latest frame; awaited before a client reads it."""
        async with self._refreshing:  # one at a time: a second reader finds the work done
            frame = self._frame
            if frame is None or self._holds.get(suffix, 0) >= frame.seq:
                return
            item = frame.derived.get(suffix)
            if item is None:
                return  # a site the stream does not read (SITES): nothing newer to show
            value = await asyncio.to_thread(item.value, frame.snap)
            if self._holds.get(item.suffix, 0) >= frame.seq:
                return  # a newer frame published it meanwhile (it became watched)
            self._holds[item.suffix] = frame.seq
            await self.pvs.publish(Update(values={item.suffix: value}, timestamp=frame.timestamp))

    async def _report_finished_run(self) -> None:
        run = self.ctx.readout.run
        if run is None or not run.done or self._run_reported == run.run_id:
            return
        st = run.status()
        result = {
            "run_id": st["run_id"],
            "state": st["state"],
            "fault": st["fault"],
            "samples": st["samples"],
            "counter_errors": st["counter_errors"],
            "overruns": st["overruns"],
            "files": [_relative(f.path, self.data_dir) for f in run.files],
        }
        await self.pvs.publish(Update(values={"RUN:LAST_RESULT": json.dumps(result)}))
        self._run_reported = run.run_id
        await self._publish_recent()

    async def _publish_recent(self) -> None:
        try:
            records = await asyncio.to_thread(self.catalog.list_runs, RECENT_RUNS, self.ctx.name)
        except Exception as exc:
            log.warning("%s: cannot list recent runs: %s", self.ctx.name, exc)
            return
        recent = [_run_summary(r, self.data_dir) for r in records]
        text = json.dumps(recent)
        while len(text) > 60000 and recent:
            recent.pop()
            text = json.dumps(recent)
        await self.pvs.publish(Update(values={"RUN:RECENT": text}))


def _take_frame(
    display: DisplayStage, wanted: list[DerivedPV], last_frame: tuple[DisplayStage | None, int]
) -> tuple[Snapshot, list[np.ndarray]]:
    """On a worker thread: a snapshot and, when it is new, the watched derived values."""
    snap = display.snapshot()
    if (display, snap.updates) == last_frame or snap.samples == 0:
        return snap, []
    return snap, [d.value(snap) for d in wanted]


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _relative(path: str | Path, data_dir: Path) -> str:
    """File paths as the bridge serves them under /data/."""
    try:
        return str(Path(path).relative_to(data_dir))
    except ValueError:
        return Path(path).name


def _run_summary(record: Any, data_dir: Path) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "name": record.measurement_name,
        "state": record.state,
        "started": _iso(record.started),
        "stopped": _iso(record.stopped),
        "samples": record.samples,
        "files": [_relative(f.path, data_dir) for f in record.files],
        "fault": record.fault,
    }
