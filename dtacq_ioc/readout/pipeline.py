"""`Readout`: one card's stream, read continuously, through integrity -> display -> run.

The stream runs while the card is connected so the display and statistics are
always live; a run taps it from a buffer boundary. Callbacks (`on_state`,
`on_run`, `on_alarm`) are called on the reader or writer threads: the IOC
hands them to its loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dtacq_ioc.archive.dig import Opener
from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.card.stream import StreamClient
from dtacq_ioc.config import ArchiveConfig, IocConfig
from dtacq_ioc.contract import StreamLayout
from dtacq_ioc.readout.display import DisplayStage
from dtacq_ioc.readout.guarded import call_guarded
from dtacq_ioc.readout.integrity import CounterCheck
from dtacq_ioc.readout.run import Run, RunSettings, SettingsError, StreamInfo
from dtacq_ioc.readout.streamcard import StreamCard
from dtacq_ioc.readout.transform import ChannelMap, SiteChannels
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)

RATE_WINDOW_S = 1.0


class RunBusy(SettingsError):
    """A run is already active on this card."""


@dataclass(frozen=True)
class ReadoutStats:
    state: str  # "stopped", "streaming", "ended"
    reason: str  # why the stream ended ("" otherwise)
    buffers: int
    samples: int
    bytes: int
    counter_errors: int
    mb_per_s: float  # over the last second or so
    uptime_s: float  # since the stream was opened


class StreamCounters:
    """Buffers, samples, bytes and rate of one opened stream (written by its reader thread)."""

    def __init__(self, errors_at_start: int):
        self.buffers = 0
        self.samples = 0
        self.bytes = 0
        self.errors_at_start = errors_at_start
        self.opened = self.last_buffer = time.monotonic()
        self._window = (self.opened, 0)
        self._rate = 0.0

    def count(self, samples: int, nbytes: int) -> None:
        self.buffers += 1
        self.samples += samples
        self.bytes += nbytes
        now = self.last_buffer = time.monotonic()
        t0, b0 = self._window
        if now - t0 >= RATE_WINDOW_S:
            self._rate = (self.bytes - b0) / (now - t0) / 1e6
            self._window = (now, self.bytes)

    def stats(self, state: str, reason: str, errors: int) -> ReadoutStats:
        now = time.monotonic()
        rate = self._rate if now - self.last_buffer < 2 * RATE_WINDOW_S else 0.0
        return ReadoutStats(
            state=state,
            reason=reason,
            buffers=self.buffers,
            samples=self.samples,
            bytes=self.bytes,
            counter_errors=errors - self.errors_at_start,
            mb_per_s=rate,
            uptime_s=now - self.opened,
        )


class Readout:
    """Reads one card's stream and feeds integrity check, display stage and active run."""

    def __init__(
        self,
        card: StreamCard,
        ioc: IocConfig,
        archive: ArchiveConfig,
        catalog: Catalog,
        triggers: TriggerRegistry | None = None,
        opener: Opener | None = None,
        on_state: Callable[[ReadoutStats], None] | None = None,
        on_run: Callable[[Run], None] | None = None,
        on_alarm: Callable[[str], None] | None = None,
        make_display: Callable[[ChannelMap, int, float], DisplayStage] = DisplayStage,
    ):
        self.card = card
        self.make_display = make_display  # a readout process puts the ring in shared memory
        self.ioc = ioc
        self.archive = archive
        self.catalog = catalog
        self.triggers = triggers or TriggerRegistry(ioc.trigger_dir)
        self.opener = opener
        self.on_state = on_state
        self.on_run = on_run
        self.on_alarm = on_alarm
        self.layout: StreamLayout | None = None
        self.buffer_samples = 0
        self.channel_map: ChannelMap | None = None
        self.display: DisplayStage | None = None
        self.sample_rate_hz = 0.0
        self.gains: dict[int, list[int]] = {}
        self.run: Run | None = None
        # Called on the stream thread with each run buffer's AI words (a view of a pool
        # buffer: copy to keep). Set by whoever shows run buffers, only while it does.
        self.buffer_tap: Callable[[np.ndarray], None] | None = None
        self._stream: StreamClient | None = None
        self._generation = 0
        self._check = CounterCheck(name=card.name)
        self._state = "stopped"
        self._reason = ""
        self._lock = threading.RLock()
        self._counters = StreamCounters(self._check.errors)

    # -- stream ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Nothing to make ready in this process (a `ReadoutProcess` starts its process)."""

    def start(
        self, sites: tuple[int, ...] | None = None, buffer_samples: int | None = None
    ) -> None:
        """Configure and open the stream (connecting the card if it is not yet)."""
        with self._lock:
            if self._stream is not None and self._stream.running:
                raise RuntimeError(f"{self.card.name}: stream already open")
            if self.card.info is None:
                self.card.connect()
            layout = self.card.configure_stream(sites or self.card.config.sites or None)
            self.layout = layout
            self.buffer_samples = buffer_samples or self.card.default_buffer_samples(layout)
            self._calibrate()
            assert self.channel_map is not None
            specs = [self.card.site_info(s).spec for s in layout.sites]
            self._check = CounterCheck(
                enabled=all(s.counter_check for s in specs), name=self.card.name
            )
            self.display = self.make_display(
                self.channel_map, self.ioc.display_samples, self.sample_rate_hz
            )
            self._counters = StreamCounters(self._check.errors)
            self._generation += 1
            generation = self._generation
            flush = min(1.0, max(0.05, 1.0 / self.ioc.display_rate_hz))
            # "streaming" first: a stream that ends at once (NOT READY) then reads "ended".
            self._set_state("streaming", "")
            try:
                self._stream = self.card.open_stream(
                    layout,
                    self.buffer_samples,
                    self._on_buffer,
                    lambda exc: self._on_end(generation, exc),
                    flush_s=flush,
                )
            except Exception as exc:
                self._set_state("stopped", str(exc))
                raise
            what = f"sites {layout.sites}, {self.buffer_samples} samples per buffer"
            log.info("%s: streaming %s", self.card.name, what)

    def stop(self, timeout: float = 10.0, reason: str = "") -> None:
        """Stop the stream; an active run ends with what it has (a fault when `reason`)."""
        with self._lock:
            stream, self._stream = self._stream, None
            self._generation += 1  # its end is ours to report, with our reason
        if stream is not None:
            stream.stop(timeout)
        run = self.run
        if run is not None:
            run.stream_ended(reason)
        self._set_state("stopped", "")

    def _calibrate(self) -> None:
        """Gains and sample rate from the card: volts for the display and the run headers."""
        assert self.layout is not None
        self.gains, self.channel_map = calibration(self.card, self.layout)
        self.sample_rate_hz = self.card.sample_rate_hz()

    def refresh_calibration(self) -> None:
        """Call after changing gains or the clock, so volts and spectra stay right."""
        with self._lock:
            self._calibrate()
            if self.display is not None and self.channel_map is not None:
                self.display.set_calibration(self.channel_map, self.sample_rate_hz)

    def _on_buffer(self, samples: np.ndarray) -> None:
        gaps = self._check.check(samples["spad"][:, 0])
        n = len(samples)
        self._counters.count(n, samples.nbytes)
        display = self.display
        if display is not None:
            display.update(samples["ai"], int(samples["spad"][-1, 0]) if n else 0)
        run = self.run
        if run is not None and run.active:
            run.feed(samples, gaps)
            tap = self.buffer_tap
            if tap is not None:
                tap(samples["ai"])
        elif gaps:
            self._alarm(f"{self.card.name}: {len(gaps)} counter jumps in the stream")

    def _on_end(self, generation: int, exc: Exception | None) -> None:
        if generation != self._generation:
            return  # a stream we replaced on purpose
        reason = str(exc) if exc is not None else ""
        run = self.run
        if run is not None:
            run.stream_ended(reason)
        if exc is not None:
            log.error("%s: stream ended: %s", self.card.name, reason)
            self._alarm(reason)
            self._set_state("ended", reason)

    def _set_state(self, state: str, reason: str) -> None:
        self._state, self._reason = state, reason
        call_guarded(self.on_state, self.stats(), what=f"{self.card.name}: stream state")

    def _alarm(self, message: str) -> None:
        call_guarded(self.on_alarm, message, what=f"{self.card.name}: alarm")

    def stats(self) -> ReadoutStats:
        return self._counters.stats(self._state, self._reason, self._check.errors)

    @property
    def streaming(self) -> bool:
        stream = self._stream
        return stream is not None and stream.running

    # -- runs -----------------------------------------------------------------------------

    def start_run(self, settings: RunSettings) -> Run:
        """Start a run from the next buffer; SettingsError (one line) when refused."""
        settings.check()
        with self._lock:
            if self.run is not None and not self.run.done:
                raise RunBusy(f"{self.card.name}: a run is already active ({self.run.run_id})")
            if not self.streaming:
                raise SettingsError(f"{self.card.name}: the stream is not running")
            assert self.layout is not None and self.card.info is not None  # streaming: connected
            # The card aggregates in site order whatever order a client lists them in.
            sites = tuple(sorted(set(settings.sites))) or self.layout.sites
            unknown = [s for s in sites if s not in self.card.info.sites]
            if unknown:
                raise SettingsError(f"unknown site {unknown[0]} on {self.card.name}")
            max_bytes = min(self.card.site_info(s).spec.max_buffer_bytes for s in sites)
            sample_bytes = (
                self.layout.sample_bytes
                if sites == self.layout.sites
                else _layout_bytes(self.card, sites)
            )
            nbuf = settings.buffer_samples(sample_bytes, self.buffer_samples, max_bytes)
            # Refuse bad channels or triggers before touching the stream: a refusal changes nothing.
            settings.channels(sum(self.card.site_info(s).nchan for s in sites))
            trigger = self.triggers.create(settings.trigger, dict(settings.trigger_args))
            if sites != self.layout.sites or nbuf != self.buffer_samples:
                self._restart(sites, nbuf)
            else:
                self._calibrate()
                assert self.display is not None and self.channel_map is not None
                self.display.set_calibration(self.channel_map, self.sample_rate_hz)
            info = self.stream_info()
            run = Run(
                settings,
                info,
                self.archive.data_dir,
                self.catalog,
                trigger,
                on_counter_error=self.archive.on_counter_error,
                queue_buffers=self.archive.writer_queue_buffers,
                opener=self.opener,
                on_state=self._run_state,
                on_alarm=self._alarm,
            )
            self.run = run
            log.info("%s: run %s started (%s)", self.card.name, run.run_id, run.directory)
            self._run_state(run)
            if self._state == "ended":  # a reopened stream may end (NOT READY) before the run
                run.stream_ended(self._reason)
            return run

    def stream_info(self) -> StreamInfo:
        """What a run's header says of the stream it taps."""
        assert self.layout is not None and self.channel_map is not None
        return StreamInfo(
            card=self.card.name,
            host=self.card.config.host,
            sample_rate_hz=self.sample_rate_hz,
            channel_map=self.channel_map,
            word_size=self.layout.word_size,
            gains=dict(self.gains),
            gain_labels=gain_labels(self.card, self.layout.sites),
            buffer_samples=self.buffer_samples,
            card_nchan=self.layout.card_nchan,
        )

    def _restart(self, sites: tuple[int, ...], buffer_samples: int) -> None:
        stream, self._stream = self._stream, None
        self._generation += 1  # the old stream's end is expected: ignore it
        if stream is not None:
            stream.stop()
        self.start(sites, buffer_samples)

    def stop_run(self, timeout: float | None = 30.0) -> Run | None:
        """End the active run; returns it once its files and record are done."""
        run = self.run
        if run is None:
            return None
        run.stop()
        if not run.wait(timeout):
            log.warning("%s: run %s still closing after %s s", self.card.name, run.run_id, timeout)
        return run

    def _run_state(self, run: Run) -> None:
        call_guarded(self.on_run, run, what=f"{self.card.name}: run state")

    def close(self) -> None:
        self.stop_run()
        self.stop()


def gain_labels(card: StreamCard, sites: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    """The config's gain labels of each site's module, for the sites that have them."""
    labels = card.config.gain_labels
    names = {s: card.site_info(s).spec.name for s in sites}
    return {s: labels[name] for s, name in names.items() if name in labels}


def _layout_bytes(card: StreamCard, sites: tuple[int, ...]) -> int:
    infos = [card.site_info(s) for s in sites]
    return StreamLayout(sites, tuple(i.nchan for i in infos), infos[0].word_size).sample_bytes


def calibration(card: StreamCard, layout: StreamLayout) -> tuple[dict[int, list[int]], ChannelMap]:
    """The card's gains per site and the channel map they give (shifts, volts per code)."""
    sites = []
    gains: dict[int, list[int]] = {}
    for site, nchan in zip(layout.sites, layout.nchan, strict=True):
        info = card.site_info(site)
        codes = card.gains(site) if info.spec.gain_codes else []
        gains[site] = codes
        sites.append(SiteChannels(site, info.spec, nchan, layout.word_size, tuple(codes)))
    return gains, ChannelMap(sites)
