"""One acquisition run: settings, the trigger, counters, its writer, and its record.

A Run taps the readout's stream from a buffer boundary. `feed` runs on the
socket thread and never waits on the disk; the writer thread closes the files
and delivers the RunRecord to the catalog at the end.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dtacq_ioc.archive.dig import (
    LEGACY_FIELDS,
    Opener,
    dig_name,
    file_date,
    header_date,
    safe_path,
)
from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.readout.guarded import call_guarded
from dtacq_ioc.readout.integrity import Gap
from dtacq_ioc.readout.output import RunOutput
from dtacq_ioc.readout.report import RunReport
from dtacq_ioc.readout.transform import ChannelMap
from dtacq_ioc.readout.triggers import (
    End,
    EndReadoutNow,
    Rotate,
    Trigger,
    TriggerContext,
    TriggerError,
    Write,
    check_args,
    normalise,
)
from dtacq_ioc.readout.writer import BufferPool, RunWriter

log = logging.getLogger(__name__)

# Header keys the system writes; logitems may not replace them.
HEADER_KEYS = frozenset(LEGACY_FIELDS) | {
    "card",
    "run_id",
    "file_index",
    "first_counter",
    "type",
    "logitems",
    # transient shots (readout/shot.py)
    "pre",
    "post",
    "shot",
    "trigger",
    "trigger_index",
}
MAX_LOGITEMS = 64
# Room a run needs beyond one writer buffer to start: its file header and catalog rows.
MIN_FREE_BYTES = 1 << 20


class SettingsError(ValueError):
    """Run settings that cannot be used; the message is one line naming what was wrong."""


class RunState(enum.Enum):
    IDLE = "IDLE"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    FAULT = "FAULT"


@dataclass(frozen=True)
class RunSettings:
    """What a client asks for. Channels are 0-based over the stream's AI channels."""

    sites: tuple[int, ...] = ()  # empty: the sites being streamed
    buffer_bytes: int = 0  # 0: the current stream's buffer
    channel_list: tuple[int, ...] = ()  # empty: all channels
    downsample: int = 1
    measurement_name: str = ""
    log: str = ""
    logitems: Mapping[str, Any] = field(default_factory=dict)
    trigger: str = "always"
    trigger_args: Mapping[str, Any] = field(default_factory=dict)
    save_files: bool = True
    upload: bool = False

    def check(self) -> None:
        """What can be checked without the card; SettingsError on the first problem."""
        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int):
            raise SettingsError(f"downsample must be an integer, not {self.downsample!r}")
        if self.downsample < 1:
            raise SettingsError(f"downsample must be >= 1, got {self.downsample}")
        if not isinstance(self.buffer_bytes, int) or self.buffer_bytes < 0:
            raise SettingsError(f"buffer size must be a number of bytes >= 0: {self.buffer_bytes}")
        for ch in self.channel_list:
            if isinstance(ch, bool) or not isinstance(ch, int):
                raise SettingsError(f"channel_list entries must be integers, not {ch!r}")
        dupes = sorted(c for c, k in Counter(self.channel_list).items() if k > 1)
        if dupes:
            raise SettingsError(f"channel_list repeats channels {dupes}")
        if not isinstance(self.trigger, str) or not self.trigger.isidentifier():
            raise SettingsError(f"trigger must be a trigger name, not {self.trigger!r}")
        try:
            check_args(dict(self.trigger_args))
        except TriggerError as exc:
            raise SettingsError(str(exc)) from None
        if len(self.logitems) > MAX_LOGITEMS:
            raise SettingsError(f"too many logitems ({len(self.logitems)} > {MAX_LOGITEMS})")
        for key in self.logitems:
            if not isinstance(key, str) or key in HEADER_KEYS or key.startswith("_"):
                raise SettingsError(f"logitem {key!r} clashes with a header field or is not text")
        try:
            json.dumps(dict(self.logitems))
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"logitems must be JSON values: {exc}") from None

    def channels(self, nchan: int) -> tuple[int, ...]:
        chosen = self.channel_list or tuple(range(nchan))
        bad = [c for c in chosen if not 0 <= c < nchan]
        if bad:
            raise SettingsError(f"unknown channel {bad[0]} (channels are 0..{nchan - 1})")
        return tuple(chosen)

    def buffer_samples(self, sample_bytes: int, default_samples: int, max_bytes: int) -> int:
        """The buffer in whole samples (bytes rounded down, as the old system did)."""
        if not self.buffer_bytes:
            return default_samples
        if self.buffer_bytes < sample_bytes:
            raise SettingsError(
                f"buffer size {self.buffer_bytes} bytes is below one sample ({sample_bytes} bytes)"
            )
        if max_bytes and self.buffer_bytes > max_bytes:
            raise SettingsError(
                f"buffer size {self.buffer_bytes} bytes is above the maximum {max_bytes}"
            )
        return self.buffer_bytes // sample_bytes

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSettings:
        """From a client's dict, with the old startReadout names accepted as well."""
        aliases = {
            "mod_list": "sites",
            "buffer_size": "buffer_bytes",
            "should_save": "save_files",
            "should_upload": "upload",
        }
        known = {f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(key, key)
            if name not in known:
                raise SettingsError(f"unknown run setting {key!r}")
            values[name] = value
        for name in ("sites", "channel_list"):
            if name in values:
                if not isinstance(values[name], list | tuple):
                    raise SettingsError(f"{name} must be a list, not {values[name]!r}")
                values[name] = tuple(values[name])
        for name in ("logitems", "trigger_args"):
            if name in values and not isinstance(values[name], dict):
                raise SettingsError(f"{name} must be a dict, not {type(values[name]).__name__}")
        settings = cls(**values)
        settings.check()
        return settings


@dataclass(frozen=True)
class StreamInfo:
    """What a run needs to know about the card and its stream when it starts."""

    card: str
    host: str
    sample_rate_hz: float
    channel_map: ChannelMap
    word_size: int
    gains: Mapping[int, list[int]]  # site -> code per channel
    gain_labels: Mapping[int, tuple[str, ...]]  # site -> label per code
    buffer_samples: int
    card_nchan: int = 0  # the card's NCHAN in words, spad included (0: AI channels only)


class ChannelView(Mapping[int, np.ndarray]):
    """The trigger's `v`: channel -> ADC codes, each shifted only when first asked for."""

    def __init__(self, ai: np.ndarray, channel_map: ChannelMap):
        self._ai = ai
        self._map = channel_map
        self._cache: dict[int, np.ndarray] = {}

    def __getitem__(self, channel: int) -> np.ndarray:
        got = self._cache.get(channel)
        if got is None:
            if not 0 <= channel < self._map.nchan:
                raise KeyError(channel)
            got = self._map.shift(self._ai[:, channel], [channel])
            self._cache[channel] = got
        return got

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._map.nchan))

    def __len__(self) -> int:
        return self._map.nchan


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def file_header(
    header: dict[str, Any], date: str, index: int, first_counter: int | None
) -> dict[str, Any]:
    """One file's header: the run's, with the file's name, index and first counter."""
    return {
        **header,
        "filename": dig_name(date, index),
        "file_index": index,
        "first_counter": first_counter,
    }


def run_header(
    settings: RunSettings,
    stream: StreamInfo,
    channels: tuple[int, ...],
    byte_depth: int,
    started: float,
    run_id: str,
) -> dict[str, Any]:
    """The .dig header of a run, with the old server's fields as it wrote them (the
    measurement document is this header); logitems at top level, as it had them."""
    s, st, cmap = settings, stream, stream.channel_map
    first_site = cmap.sites[0]
    is_float = s.downsample > 1
    # Downsampled files hold means of ADC codes: the shift is already applied.
    shift = 0 if is_float else cmap.channel_shift(channels[0])
    labels = st.gain_labels.get(first_site.site, first_site.spec.gain_labels)
    header: dict[str, Any] = dict(s.logitems)
    header.update(
        type="measurement",
        channels=st.card_nchan or cmap.nchan,
        channel_list=list(channels),
        byte_depth=byte_depth,
        bit_shift=shift,
        is_float=is_float,
        ip=st.host,
        downsample=s.downsample,
        freq_hz=float(st.sample_rate_hz),
        date=header_date(started),
        measurement_name=s.measurement_name or f"Digitizer {st.host}",
        log=s.log,
        current_gains={
            str(site): {str(i): code for i, code in enumerate(codes)}
            for site, codes in st.gains.items()
        },
        gain_conversion={str(i): label for i, label in enumerate(labels)},
        card=st.card,
        run_id=run_id,
    )
    return header


OnRunState = Callable[["Run"], None]


def _check_room(data_dir: Path, needed: int) -> None:
    """OSError, in words, when the disk under data_dir cannot take the start of a run."""
    existing = Path(data_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OSError(f"no room for a run in {data_dir}: {free} bytes free, {needed} needed")


class Run:
    """One run, from STARTING to IDLE (done) or FAULT (done, with `fault`)."""

    def __init__(
        self,
        settings: RunSettings,
        stream: StreamInfo,
        data_dir: Path,
        catalog: Catalog,
        trigger: Trigger,
        on_counter_error: str = "stop",
        queue_buffers: int = 64,
        opener: Opener | None = None,
        on_state: OnRunState | None = None,
        on_alarm: Callable[[str], None] | None = None,
    ):
        self.settings = settings  # checked by the caller (Readout.start_run)
        self.stream = stream
        self.catalog = catalog
        self.policy = on_counter_error
        self.on_state = on_state
        self.on_alarm = on_alarm
        self.channels = settings.channels(stream.channel_map.nchan)
        self.trigger = trigger  # built once, from settings.trigger and its arguments
        cmap = stream.channel_map
        self.downsample = settings.downsample
        self.output = RunOutput(
            self.channels, cmap, self.downsample, stream.word_size, self._overrun
        )
        trigger.setup(trigger_context(stream, self.channels, self.downsample, self.output))
        self.run_id = new_run_id()
        self.started = time.time()
        self.stopped: float | None = None
        self.date = file_date(self.started)
        self.directory = safe_path(data_dir, stream.card, self.run_id)
        self.header = run_header(
            settings, stream, self.channels, self.output.byte_depth, self.started, self.run_id
        )
        self.state = RunState.STARTING
        self.fault = ""
        self.record_state = "complete"
        self.samples_received = 0  # samples the stream brought while running
        self.counter_errors = 0
        self.files: list[RunFile] = []
        self.report = RunReport(catalog, partial(run_record, self))
        # Re-entrant: a state callback on the socket thread may stop the run.
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._start(data_dir, queue_buffers, opener)

    def _start(self, data_dir: Path, queue_buffers: int, opener: Opener | None) -> None:
        """Room checked, directory made, the catalog told, the writer opened; a run that
        cannot start leaves nothing behind (OSError in words)."""
        save = self.settings.save_files
        pool_bytes = max(
            1, (self.stream.buffer_samples // self.downsample + 1) * self.output.row_bytes
        )
        if save:
            _check_room(data_dir, pool_bytes + MIN_FREE_BYTES)
            self.directory.mkdir(parents=True, exist_ok=False)
        try:
            self.report.started()
        except OSError:
            if save:
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
            raise
        if save:
            pool = BufferPool(queue_buffers, pool_bytes)
            headers = partial(file_header, self.header, self.date)
            self.output.writer = RunWriter(
                self.directory, self.date, headers, pool, opener,
                self._writer_failed, self.report.file_closed,
            )  # fmt: skip

    # -- state --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state in (RunState.STARTING, RunState.RUNNING)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def samples(self) -> int:
        """Samples in the run's files, as reading them gives (see RunOutput.samples)."""
        return self.output.samples

    @property
    def record(self) -> RunRecord | None:
        """The final record, once the run is done."""
        return self.report.record

    @property
    def overruns(self) -> int:
        return self.output.overruns

    @property
    def bytes_written(self) -> int:
        return self.output.bytes_written

    @property
    def current_file(self) -> str:
        return self.output.current_file

    @property
    def elapsed_s(self) -> float:
        end = self.stopped if self.stopped is not None else time.time()
        return end - self.started

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the files are closed and the record delivered."""
        return self._done.wait(timeout)

    def _set_state(self, state: RunState) -> None:
        self.state = state
        call_guarded(self.on_state, self, what=f"run {self.run_id}: state")

    def _alarm(self, message: str) -> None:
        call_guarded(self.on_alarm, message, what=f"run {self.run_id}: alarm")

    # -- the socket thread --------------------------------------------------------------

    def feed(self, samples: np.ndarray, gaps: list[Gap]) -> None:
        """One buffer (structured, fields 'ai' and 'spad') and its counter jumps."""
        with self._lock:
            if not self.active:
                return
            if self.state is RunState.STARTING:
                self._set_state(RunState.RUNNING)
                if not self.active:  # the callback stopped the run
                    return
            n = len(samples)
            self.samples_received += n
            ai = samples["ai"]
            counter = samples["spad"][:, 0]
            end_reason = self._counter_jumps(gaps, n) if gaps else ""
            if end_reason:  # the old behaviour: keep the good samples before the jump, then end
                n = gaps[0].position
                ai, counter = ai[:n], counter[:n]
            actions = self._actions(ai, n) if n else []
            ending = False
            for action in actions:
                if isinstance(action, Write):
                    self._write(ai[action.start : action.end], int(counter[action.start]))
                elif isinstance(action, Rotate):
                    self.output.new_file = True
                elif isinstance(action, End):
                    ending = True
                    break
            if end_reason:
                self._end_locked(end_reason, "fault")
            elif ending:
                self._end_locked("", "complete")

    def _counter_jumps(self, gaps: list[Gap], n: int) -> str:
        """Count and report the buffer's jumps; the reason to end the run, if it must."""
        self.counter_errors += len(gaps)
        first = gaps[0]
        at = self.samples_received - n + first.position
        message = (
            f"counter jump at sample {at} of the run: expected {first.expected}, got {first.got}"
        )
        self._alarm(f"run {self.run_id}: {message}")
        return message if self.policy == "stop" else ""

    def _actions(self, ai: np.ndarray, n: int) -> list[Any]:
        try:
            return normalise(self.trigger.trigger(ChannelView(ai, self.stream.channel_map)), n)
        except EndReadoutNow:
            return [End()]
        except Exception as exc:
            log.exception("run %s: trigger %s failed", self.run_id, self.settings.trigger)
            reason = f"trigger {self.settings.trigger} failed: {type(exc).__name__}: {exc}"
            self._end_locked(reason.splitlines()[0], "fault")
            return []

    def _write(self, block: np.ndarray, first_counter: int) -> None:
        if self.active:  # a callback may have stopped the run during this buffer
            self.output.write(block, first_counter)

    def _overrun(self, rows: int, overruns: int) -> None:
        log.warning(
            "run %s: writer behind, %d rows dropped (overruns: %d)", self.run_id, rows, overruns
        )
        self._alarm(f"run {self.run_id}: writer overrun ({overruns})")

    # -- ending ---------------------------------------------------------------------------

    def stop(self) -> None:
        """End the run cleanly from any thread; wait() for the files and record."""
        with self._lock:
            if self.active:
                self._end_locked("", "complete")

    def stream_ended(self, reason: str) -> None:
        """The stream stopped under the run: keep what arrived, record why."""
        with self._lock:
            if self.active:
                self._end_locked(reason, "interrupted" if reason else "complete")

    def _writer_failed(self, reason: str) -> None:
        with self._lock:
            if self.active:
                self._end_locked(reason, "fault")

    def _end_locked(self, fault: str, record_state: str) -> None:
        if not self.active:
            return
        self.fault = fault
        self.record_state = record_state
        self.stopped = time.time()
        if fault:
            log.error("run %s ends: %s", self.run_id, fault)
            self._alarm(f"run {self.run_id}: {fault}")
        self._set_state(RunState.STOPPING)
        if self.output.writer is not None:
            self.output.writer.finish(self._finished)
        else:
            # Nothing to write: finish on a thread of its own, the catalog may be slow.
            threading.Thread(
                target=self._finished, args=([], ""), name=f"run-end-{self.run_id}", daemon=True
            ).start()

    def _finished(self, files: list[RunFile], error: str) -> None:
        self.files = files
        if not files and self.output.writer is not None:
            # Nothing was written (stopped at once, or the disk was full): no empty directory.
            with contextlib.suppress(OSError):
                self.directory.rmdir()
        if error and not self.fault:
            self.fault, self.record_state = error, "fault"
        record = self.report.finished(self.record_state)
        log.info(
            "run %s %s: %d samples, %d bytes in %d files%s",
            self.run_id,
            self.record_state,
            record.samples,
            record.bytes_written,
            len(files),
            f" ({self.fault})" if self.fault else "",
        )
        self._set_state(RunState.FAULT if self.fault else RunState.IDLE)
        self._done.set()

    def status(self) -> dict[str, Any]:
        """Counters for PVs and clients."""
        return run_status(self)


def trigger_context(
    stream: StreamInfo, channels: tuple[int, ...], downsample: int, output: RunOutput
) -> TriggerContext:
    """What a run's trigger is told of the stream at setup."""
    cmap = stream.channel_map
    return TriggerContext(
        sample_rate_hz=stream.sample_rate_hz,
        channels=tuple(range(cmap.nchan)),
        channel_list=channels,
        downsample=downsample,
        bytes_per_output_sample=output.row_bytes,
        volts_per_code={c: float(v) for c, v in enumerate(cmap.volts_per_code)},
    )


def run_record(run: Run, state: str) -> RunRecord:
    """The catalog's record of a run as it is now."""
    return RunRecord(
        run_id=run.run_id,
        card=run.stream.card,
        host=run.stream.host,
        measurement_name=run.header["measurement_name"],
        log=run.settings.log,
        # The file header has logitems at top level (the old layout); the catalog
        # also wants them by name, to put them at the top of the measurement document.
        header={**run.header, "logitems": dict(run.settings.logitems)},
        files=list(run.files),
        started=run.started,
        stopped=run.stopped,
        samples=run.samples,
        bytes_written=run.bytes_written,
        state=state,
        counter_errors=run.counter_errors,
        overruns=run.overruns,
        fault=run.fault,
        upload=run.settings.upload,
    )


def run_status(run: Run) -> dict[str, Any]:
    """A run's counters for PVs and clients."""
    return {
        "run_id": run.run_id,
        "state": run.state.value,
        "fault": run.fault,
        "samples": run.samples,  # in the files, so readbacks agree with them and the catalog
        "samples_received": run.samples_received,
        "samples_written": run.output.samples_written,
        "bytes_written": run.bytes_written,
        "current_file": run.current_file,
        "files": len(run.files),
        "counter_errors": run.counter_errors,
        "overruns": run.overruns,
        "elapsed_s": run.elapsed_s,
    }
