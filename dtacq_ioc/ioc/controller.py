"""One card's life in the IOC: connect with backoff, apply settings, stream, run, publish.

Everything here runs on the asyncio loop; blocking card calls go to threads
(`asyncio.to_thread`) and the readout's callbacks come back through
`call_soon_threadsafe`. PVs are written only by `CardPVs.publish`, from a
snapshot taken at the display rate, so a slow card never stalls Channel Access.
Volts and spectra are computed for the PVs someone watches; the others are brought
up to the latest snapshot when a client reads them (`pvs._Derived`).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from dtacq_ioc.card.card import Card
from dtacq_ioc.card.errors import CardError
from dtacq_ioc.card.models import SPAD_WORDS
from dtacq_ioc.config import ArchiveConfig, CardConfig, IocConfig
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.autosave import Autosave
from dtacq_ioc.ioc.cardgroup import CLOCKS, NO_YES, SAVED, CardPVs, SiteLayout, Update
from dtacq_ioc.readout.display import Axes, DisplayStage, Snapshot
from dtacq_ioc.readout.pipeline import Readout, ReadoutStats
from dtacq_ioc.readout.run import RunSettings, SettingsError
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
LINK_CHECK_S = 2.0  # how often an idle link is probed with a knob query
RECENT_RUNS = 20

_MAJOR = (AlarmStatus.STATE, AlarmSeverity.MAJOR_ALARM)
_MINOR = (AlarmStatus.STATE, AlarmSeverity.MINOR_ALARM)
_OK = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)


class ConfigMismatch(CardError):
    """The card is not what the config says (another module in a site)."""


class PutRefused(Exception):
    """A put the IOC will not carry out; caproto reports it to the client as a failed put."""


def parse_channels(text: str) -> tuple[int, ...]:
    """RUN:CHANNELS: "" or "all" for every channel, else "0,1,4-7" (0-based, as channel_list)."""
    text = text.strip()
    if text.lower() in ("", "all"):
        return ()
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise PutRefused(f"RUN:CHANNELS: {part!r} is not a channel number or range a-b")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return tuple(out)


def parse_json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise PutRefused(f"{name}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PutRefused(f"{name}: must be a JSON object")
    return value


@dataclass(frozen=True)
class _DerivedPV:
    """A waveform computed from a frame only while watched, or when a client reads it."""

    suffix: str
    channel: int  # among the card's AI channels
    spectrum: bool  # else the channel's volts

    def value(self, snap: Snapshot) -> np.ndarray:
        return snap.spectrum(self.channel) if self.spectrum else snap.volts(self.channel)


def _derived_pvs(sites: list[SiteLayout]) -> list[_DerivedPV]:
    out = []
    for layout in sites:
        for i, col in enumerate(layout.channels):
            ch = f"{i + 1:02d}"
            out.append(_DerivedPV(f"{layout.site}:AI:WF:{ch}:V", col, spectrum=False))
            out.append(_DerivedPV(f"{layout.site}:AI:SPEC:{ch}", col, spectrum=True))
    return out


@dataclass(frozen=True)
class _Frame:
    """The latest published snapshot: derived PVs older than `seq` are refreshed from it."""

    seq: int
    snap: Snapshot
    timestamp: float


class CardController:
    def __init__(
        self,
        config: CardConfig,
        ioc: IocConfig,
        archive: ArchiveConfig,
        catalog: Any,
        autosave: Autosave,
        triggers: TriggerRegistry,
        access: pvs.AccessRules | None = None,
    ):
        self.config = config
        self.name = config.name
        self.ioc = ioc
        self.data_dir = archive.data_dir
        self.catalog = catalog
        self.autosave = autosave
        self.triggers = triggers
        self.card = Card(config, ioc.min_sample_rate_hz)
        self.readout = Readout(
            self.card, ioc, archive, catalog, triggers=triggers,
            on_state=self._on_stream_state, on_alarm=self._on_alarm,
        )  # fmt: skip
        self.pvs = CardPVs(config, ioc, self, access)
        self.state = "DISCONNECTED"
        self.last_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link_lost = asyncio.Event()
        self._stopping = asyncio.Event()
        self._busy = asyncio.Lock()  # one card operation at a time (settings, runs, actions)
        self._started = time.monotonic()
        # (display stage, its buffer count) of the last frame published: a new stage after a
        # reconnect counts from 0 again, so the count alone could match by chance.
        self._last_frame: tuple[DisplayStage | None, int] = (None, -1)
        self._run_reported: str | None = None
        self._readbacks: dict[str, Any] = {}
        self._frame: _Frame | None = None
        self._published_axes: Axes | None = None  # what the TB and FREQ PVs show
        self._derived = _derived_pvs(self.pvs.sites)
        self._holds: dict[str, int] = {}  # derived PV suffix -> seq of the frame it shows
        self._refreshing = asyncio.Lock()
        for item in self._derived:
            self.pvs.pv(item.suffix).refresher = partial(self._refresh, item)

    # -- lifecycle --------------------------------------------------------------------

    async def restore(self) -> None:
        """Put the autosaved settings into the setpoint PVs (applied to the card at connect)."""
        saved = self.autosave.card(self.name)
        for suffix, value in saved.items():
            if suffix in SAVED or suffix.split(":")[1:2] == ["GAIN"]:
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    await self.pvs.pv(suffix).write(value, verify_value=False)
        await self._publish_triggers()

    async def run(self) -> None:
        """Keep the card connected and streaming until stop(); reconnect with backoff."""
        self._loop = asyncio.get_running_loop()
        backoff = BACKOFF_START_S
        while not self._stopping.is_set():
            self.state = "CONNECTING"
            self._link_lost.clear()  # before the stream opens: its end must not be missed
            try:
                async with self._busy:
                    await asyncio.to_thread(self._connect_and_stream)
                self.state = "IDLE"
                backoff = BACKOFF_START_S
                await self._watch_link()
            except ConfigMismatch as exc:
                self.state = "FAULT"  # a human must fix the card or the config
                self._error(str(exc))
            except (CardError, OSError, SettingsError) as exc:
                if not self._stopping.is_set():
                    self._error(str(exc) if self.name in str(exc) else f"{self.name}: {exc}")
            finally:
                if not self._stopping.is_set():
                    await asyncio.to_thread(self._disconnect, self.last_error)
                    if self.state != "FAULT":
                        self.state = "DISCONNECTED"
            if self._stopping.is_set():
                break
            log.info("%s: reconnecting in %.0f s", self.name, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _watch_link(self) -> None:
        """Return when the stream ends or the knob service stops answering."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._link_lost.wait(), LINK_CHECK_S)
            if self._link_lost.is_set():
                raise CardError(self.name, self.readout.stats().reason or "stream ended")
            if not self._busy.locked():
                await asyncio.to_thread(self.card.knob(0).query, "state")

    def _connect_and_stream(self) -> None:
        info = self.card.connect()
        for site, module in self.config.modules.items():
            got = info.sites.get(site)
            if got is None or got.spec.name != module:
                found = got.spec.name if got else "nothing"
                raise ConfigMismatch(
                    self.name,
                    f"{self.name}: site {site} has {found}, the config says {module} "
                    f"(cards.modules)",
                )
        self._apply_saved_settings()
        self._start_stream()
        self._read_back()

    def _apply_saved_settings(self) -> None:
        saved = self.autosave.card(self.name)
        if saved.get("EXT_CLOCK") in CLOCKS:
            external = saved["EXT_CLOCK"] == "External"
            self.card.set_external_clock(
                float(saved.get("EXT_CLOCK_FREQ", 10e6)) if external else None
            )
        if "CLKDIV" in saved and not self.card.fixed_clkdiv:
            self.card.set_clkdiv(int(saved["CLKDIV"]))
        for key, label in saved.items():
            parts = key.split(":")
            if len(parts) == 3 and parts[1] == "GAIN" and parts[2].isdigit():
                layout = self._site(int(parts[0]))
                if label in layout.labels:
                    code = layout.spec.gain_codes[layout.labels.index(label)]
                    self.card.set_gain(layout.site, int(parts[2]), code)

    def _start_stream(self, buffer_bytes: int | None = None) -> None:
        """Stream with BUFFER_SIZE rounded down to whole samples (the config knows the layout)."""
        sample_bytes = sum(s.spec.nchan * s.spec.word_size for s in self.pvs.sites)
        sample_bytes += 4 * SPAD_WORDS
        size = buffer_bytes or int(self.pvs.value("BUFFER_SIZE"))
        self.readout.start(self.config.sites, max(1, size // sample_bytes))

    def _read_back(self) -> None:
        """Read the card's settings into readback values (called on a thread)."""
        info = self.card.info
        assert info is not None
        ext = self.card.external_clock()
        rb: dict[str, Any] = {
            "MODEL": info.model[:39],
            "HOSTNAME": info.hostname[:39],
            "SERIAL": info.serial[:39],
            "FW:SW": info.software_version[:39],
            "FW:FPGA": info.fpga_version,
            "CLKDIV_RBV": self.card.clkdiv(),
            "EXT_CLOCK_RBV": CLOCKS[ext is not None],
            "SYSCLK_RBV": float(ext or self.card.sysclk_hz()),
            "SAMPLE_RATE_RBV": self.card.sample_rate_hz(),
        }
        for layout in self.pvs.sites:
            site = info.sites[layout.site]
            pre = f"{layout.site}:"
            rb[pre + "MODEL"] = site.model[:39]
            rb[pre + "PART_NUM"] = site.part_num[:39]
            rb[pre + "SERIAL"] = site.serial[:39]
            rb[pre + "NCHAN"] = site.nchan
            if layout.spec.gain_codes:
                codes = self.card.gains(layout.site)
                for i, code in enumerate(codes):
                    rb[f"{pre}GAIN:{i + 1:02d}"] = layout.labels[layout.spec.gain_codes.index(code)]
                if codes and all(c == codes[0] for c in codes):
                    rb[pre + "GAIN:ALL"] = layout.labels[layout.spec.gain_codes.index(codes[0])]
        self._readbacks = rb

    def _disconnect(self, reason: str) -> None:
        """Close stream and card; a run still open ends as a fault naming the lost link."""
        with contextlib.suppress(Exception):
            self.readout.stop(timeout=5.0, reason=reason or f"{self.name}: link lost")
        self.card.close()
        self.card.info = None

    async def stop(self) -> None:
        """Close the run (files complete, catalog told) and the card."""
        self._stopping.set()
        self._link_lost.set()
        async with self._busy:
            await asyncio.to_thread(self.readout.close)
            await asyncio.to_thread(self.card.close)
        self.state = "DISCONNECTED"

    # -- callbacks from the readout's threads -------------------------------------------

    def _on_stream_state(self, stats: ReadoutStats) -> None:
        if stats.state == "ended" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._link_lost.set)

    def _on_alarm(self, message: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._error, message)

    def _error(self, message: str) -> None:
        self.last_error = message
        log.error("%s", message)

    # -- puts -------------------------------------------------------------------------

    def _site(self, site: int):
        for layout in self.pvs.sites:
            if layout.site == site:
                return layout
        raise PutRefused(f"{self.name}: no site {site}")

    def _suffix(self, pvname: str) -> str:
        return (
            pvname[len(self.config.prefix) :] if pvname.startswith(self.config.prefix) else pvname
        )

    def _run_active(self) -> bool:
        run = self.readout.run
        return run is not None and not run.done

    async def _refuse(self, message: str) -> None:
        self._error(message)
        raise PutRefused(message)

    async def put_setting(self, pvname: str, value: Any) -> Any:
        suffix = self._suffix(pvname)
        if hasattr(value, "item"):
            value = value.item()  # numpy scalars from caproto: keep autosave plain JSON
        if suffix.startswith("RUN:"):
            value = await self._check_run_setting(suffix, value)
        elif self._run_active():
            await self._refuse(f"{self.name}: {suffix}: stop the run before changing settings")
        elif self.card.info is not None and suffix in ("CLKDIV", "EXT_CLOCK", "EXT_CLOCK_FREQ"):
            async with self._busy:
                try:
                    await asyncio.to_thread(self._apply_clock, suffix, value)
                except (CardError, OSError) as exc:
                    await self._refuse(str(exc))
        elif suffix == "BUFFER_SIZE" and self.card.info is not None:
            async with self._busy:
                await asyncio.to_thread(self._restart_stream, int(value))
        self.autosave.set(self.name, suffix, value)
        return value

    async def _check_run_setting(self, suffix: str, value: Any) -> Any:
        if suffix in ("RUN:NAME", "RUN:LOG", "RUN:CHANNELS", "RUN:LOGITEMS", "RUN:TRIGGER_ARGS"):
            value = pvs.text_value(value)
        try:
            if suffix == "RUN:CHANNELS":
                parse_channels(value)
            elif suffix in ("RUN:LOGITEMS", "RUN:TRIGGER_ARGS"):
                parse_json_object(suffix, value)
            elif suffix == "RUN:TRIGGER":
                self.triggers.lookup(str(value))
        except PutRefused as exc:
            await self._refuse(f"{self.name}: {exc}")
        except Exception as exc:  # the registry's own one-line error
            await self._refuse(f"{self.name}: RUN:TRIGGER: {exc}")
        return value

    def _apply_clock(self, suffix: str, value: Any) -> None:
        """Set a clock setting; refuse rates below the minimum; restart the stream."""
        if suffix == "CLKDIV":
            self.card.set_clkdiv(int(value))
        else:
            external = value if suffix == "EXT_CLOCK" else self.pvs.value("EXT_CLOCK")
            freq = float(value if suffix == "EXT_CLOCK_FREQ" else self.pvs.value("EXT_CLOCK_FREQ"))
            if external in ("External", 1):
                self.card.set_external_clock(freq)
            elif suffix == "EXT_CLOCK":
                self.card.set_external_clock(None)
        self._restart_stream()

    def _restart_stream(self, buffer_bytes: int | None = None) -> None:
        self.readout.stop()
        self._start_stream(buffer_bytes)
        self._read_back()

    async def put_gain(self, pvname: str, value: Any) -> Any:
        suffix = self._suffix(pvname)
        site_text, _, channel = suffix.split(":")  # "<S>:GAIN:<NN>" or "<S>:GAIN:ALL"
        layout = self._site(int(site_text))
        label = value if isinstance(value, str) else layout.labels[int(value)]
        if label not in layout.labels:
            await self._refuse(f"{self.name}: {suffix}: {label!r} is not one of {layout.labels}")
        if self._run_active():
            await self._refuse(f"{self.name}: {suffix}: stop the run before changing gains")
        code = layout.spec.gain_codes[layout.labels.index(label)]
        if self.card.info is not None:
            async with self._busy:
                try:
                    await asyncio.to_thread(self._apply_gain, layout.site, channel, code)
                except (CardError, OSError) as exc:
                    await self._refuse(str(exc))
        if channel == "ALL":
            for i in range(layout.spec.nchan):
                key = f"{layout.site}:GAIN:{i + 1:02d}"
                self.autosave.set(self.name, key, label)
                await self.pvs.pv(key).write(label, verify_value=False)
        else:
            self.autosave.set(self.name, suffix, label)
        return label

    def _apply_gain(self, site: int, channel: str, code: int) -> None:
        if channel == "ALL":
            self.card.set_all_gains(site, code)
        else:
            self.card.set_gain(site, int(channel), code)
        self.readout.refresh_calibration()
        self._read_back()

    # -- runs and actions -------------------------------------------------------------

    def run_settings(self) -> RunSettings:
        v = self.pvs.value
        name = pvs.text_value(v("RUN:NAME")) or f"Digitizer {self.config.host}"
        return RunSettings(
            buffer_bytes=int(v("BUFFER_SIZE")),
            channel_list=parse_channels(pvs.text_value(v("RUN:CHANNELS"))),
            downsample=int(v("RUN:DOWNSAMPLE")),
            measurement_name=name,
            log=pvs.text_value(v("RUN:LOG")),
            logitems=parse_json_object("RUN:LOGITEMS", pvs.text_value(v("RUN:LOGITEMS"))),
            trigger=str(v("RUN:TRIGGER")).strip() or "always",
            trigger_args=parse_json_object(
                "RUN:TRIGGER_ARGS", pvs.text_value(v("RUN:TRIGGER_ARGS"))
            ),
            save_files=v("RUN:SAVE") == NO_YES[1],
            upload=v("RUN:UPLOAD") == NO_YES[1],
        )

    async def start_run(self, pvname: str, value: Any) -> str:
        if value not in ("Go", 1):
            return "Idle"
        if self.card.info is None:
            await self._refuse(f"{self.name}: cannot start a run: the card is not connected")
        try:
            settings = self.run_settings()
            async with self._busy:
                await asyncio.to_thread(self.card.check_sample_rate)
                await asyncio.to_thread(self.readout.start_run, settings)
        except (PutRefused, SettingsError, CardError, OSError) as exc:
            await self._refuse(f"{self.name}: run not started: {exc}")
        self._run_reported = None
        return "Idle"

    async def stop_run(self, pvname: str, value: Any) -> str:
        if value in ("Go", 1) and self.readout.run is not None:
            await asyncio.to_thread(self.readout.stop_run)
        return "Idle"

    async def reset(self, pvname: str, value: Any) -> str:
        if value not in ("Go", 1):
            return "Idle"
        if self._run_active():
            await self._refuse(f"{self.name}: RESET: stop the run first")
        if self.card.info is None:
            await self._refuse(f"{self.name}: RESET: the card is not connected")
        async with self._busy:
            try:
                await asyncio.to_thread(self._reset_readout)
            except (CardError, OSError) as exc:
                await self._refuse(f"{self.name}: RESET failed: {exc}")
        return "Idle"

    def _reset_readout(self) -> None:
        self.readout.stop()
        self.card.reset_readout()
        self._start_stream()

    async def reboot(self, pvname: str, value: Any) -> str:
        if value not in ("Go", 1):
            return "Idle"
        async with self._busy:
            if self._run_active():
                await asyncio.to_thread(self.readout.stop_run)
            try:
                await asyncio.to_thread(self.card.reboot)
            except (CardError, OSError) as exc:
                await self._refuse(f"{self.name}: REBOOT failed: {exc}")
        log.warning("%s: rebooted over SSH", self.name)
        self._link_lost.set()
        return "Idle"

    # -- publishing -------------------------------------------------------------------

    async def _publish_triggers(self) -> None:
        names = await asyncio.to_thread(self.triggers.names)
        await self.pvs.publish(Update(values={"TRIGGERS": json.dumps(sorted(names))}))

    async def publish_loop(self) -> None:
        period = 1.0 / self.ioc.display_rate_hz
        try:
            await self._publish_recent()
        except Exception:
            log.exception("%s: publishing recent runs failed", self.name)
        while True:
            started = time.monotonic()
            try:
                await self.publish_once()
            except Exception:
                log.exception("%s: publishing PVs failed", self.name)
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    async def publish_once(self) -> None:
        connected = self.card.info is not None and self.state != "DISCONNECTED"
        run = self.readout.run
        running = run is not None and not run.done
        state = "RUNNING" if running and connected else self.state
        stats = self.readout.stats()
        upd = Update(link_ok=connected)
        values = upd.values
        values.update(
            STATE=state,
            CONNECTED=NO_YES[connected],
            HEARTBEAT=int(time.monotonic() - self._started),
            LAST_ERROR=self.last_error[-4000:],
        )
        upd.alarms["STATE"] = (
            (AlarmStatus.COMM, AlarmSeverity.MAJOR_ALARM) if not connected
            else _MAJOR if state == "FAULT" else _OK
        )  # fmt: skip
        if connected:
            values.update(self._readbacks)
        values["STREAM:MBPS"] = stats.mb_per_s
        values["STREAM:BUFFERS"] = float(stats.buffers)
        values["STREAM:SAMPLES"] = float(stats.samples)
        values["STREAM:COUNTER_ERRORS"] = stats.counter_errors
        upd.alarms["STREAM:COUNTER_ERRORS"] = _MINOR if stats.counter_errors else _OK
        self._run_values(upd)
        snap = None
        if connected and self.readout.display is not None:
            snap = await self._frame_values(upd)
        upd.timestamp = time.time()  # when the values are published, after the arithmetic
        if snap is not None:
            self._new_frame(snap, upd)
        await self.pvs.publish(upd)
        await self._report_finished_run()

    def _run_values(self, upd: Update) -> None:
        run = self.readout.run
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

    async def _frame_values(self, upd: Update) -> Snapshot | None:
        """A new frame's values into `upd`: raw waveforms and statistics always, volts and
        spectra of watched PVs only (the others are made when read), axes when changed."""
        display = self.readout.display
        assert display is not None
        wanted = [d for d in self._derived if self.pvs.pv(d.suffix).watched]
        snap, derived = await asyncio.to_thread(_take_frame, display, wanted, self._last_frame)
        if (display, snap.updates) == self._last_frame or snap.samples == 0:
            return None
        self._last_frame = (display, snap.updates)
        values = upd.values
        values["AI:COUNTER"] = float(snap.counter)
        if snap.axes is not self._published_axes:  # snapshots share them until n or rate change
            self._published_axes = snap.axes
            for layout in self.pvs.sites:
                values[f"{layout.site}:AI:WF:TB"] = snap.timebase_s
                if len(snap.freq_hz):
                    values[f"{layout.site}:AI:SPEC:FREQ"] = snap.freq_hz
        for layout in self.pvs.sites:
            _site_values(layout, snap, values)
        values.update(zip((d.suffix for d in wanted), derived, strict=True))
        return snap

    def _new_frame(self, snap: Snapshot, upd: Update) -> None:
        """Remember the frame being published and which derived PVs it brings up to date."""
        assert upd.timestamp is not None
        seq = self._frame.seq + 1 if self._frame is not None else 1
        self._frame = _Frame(seq, snap, upd.timestamp)
        for item in self._derived:
            if item.suffix in upd.values:
                self._holds[item.suffix] = seq

    async def _refresh(self, item: _DerivedPV) -> None:
        """Bring a derived PV up to the latest frame; awaited before a client reads it."""
        async with self._refreshing:  # one at a time: a second reader finds the work done
            frame = self._frame
            if frame is None or self._holds.get(item.suffix, 0) >= frame.seq:
                return
            value = await asyncio.to_thread(item.value, frame.snap)
            if self._holds.get(item.suffix, 0) >= frame.seq:
                return  # a newer frame published it meanwhile (it became watched)
            self._holds[item.suffix] = frame.seq
            await self.pvs.publish(Update(values={item.suffix: value}, timestamp=frame.timestamp))

    async def _report_finished_run(self) -> None:
        run = self.readout.run
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
            records = await asyncio.to_thread(self.catalog.list_runs, RECENT_RUNS, self.name)
        except Exception as exc:
            log.warning("%s: cannot list recent runs: %s", self.name, exc)
            return
        recent = [_run_summary(r, self.data_dir) for r in records]
        text = json.dumps(recent)
        while len(text) > 60000 and recent:
            recent.pop()
            text = json.dumps(recent)
        await self.pvs.publish(Update(values={"RUN:RECENT": text}))


def _take_frame(
    display: DisplayStage, wanted: list[_DerivedPV], last_frame: tuple[DisplayStage | None, int]
) -> tuple[Snapshot, list[np.ndarray]]:
    """On a worker thread: a snapshot and, when it is new, the watched derived values."""
    snap = display.snapshot()
    if (display, snap.updates) == last_frame or snap.samples == 0:
        return snap, []
    return snap, [d.value(snap) for d in wanted]


def _site_values(layout: SiteLayout, snap: Snapshot, values: dict[str, Any]) -> None:
    """A site's raw waveforms and statistics from a snapshot."""
    pre = f"{layout.site}:"
    # Each snapshot's arrays are new, so PVs may keep views of their rows.
    raw = snap.raw[layout.channels.start : layout.channels.stop]
    if layout.spec.word_size == 2:
        raw = raw.astype(np.int16, copy=False)  # 16-bit codes of a data32 stream
    for i, col in enumerate(layout.channels):
        ch = f"{i + 1:02d}"
        values[f"{pre}AI:WF:{ch}"] = raw[i]
        values[f"{pre}AI:CH:{ch}"] = float(snap.mean[col])
        values[f"{pre}AI:CH:{ch}:MIN"] = float(snap.minimum[col])
        values[f"{pre}AI:CH:{ch}:MAX"] = float(snap.maximum[col])
        values[f"{pre}AI:CH:{ch}:RMS"] = float(snap.rms[col])


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


def _run_summary(record: Any, data_dir: Any) -> dict[str, Any]:
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
