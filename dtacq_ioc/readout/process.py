"""`ReadoutProcess`: the IOC's end of a card's readout process (`readout.worker`).

It stands where a `Readout` would (the controller's `ReadoutLike`): calls go over the
pipe and wait for their answer; the display ring is mapped from shared memory; the
counters, the run's status and the stream's state arrive as notes and are kept here,
so reading them (the publisher does, at the display rate, on the event loop) never
waits on the other process. The process starts with the first stream and is started
again if it ends; when it ends under a run, the run reads FAULT with the reason.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.config import ArchiveConfig, CardConfig, IocConfig
from dtacq_ioc.readout import worker
from dtacq_ioc.readout.display import DisplayStage
from dtacq_ioc.readout.guarded import call_guarded
from dtacq_ioc.readout.peer import Peer, PeerGone
from dtacq_ioc.readout.pipeline import ReadoutStats
from dtacq_ioc.readout.run import RunSettings, StreamInfo
from dtacq_ioc.readout.transform import ChannelMap
from dtacq_ioc.readout.worker import Attrs, DisplayInfo, RunSnapshot

log = logging.getLogger(__name__)

EXIT_WAIT_S = 15.0  # for the process to exit once told to
CLOSE_WAIT_S = 45.0  # for its run to close: Readout.stop_run allows the run 30 s
STOPPED = ReadoutStats("stopped", "", 0, 0, 0, 0, 0.0, 0.0)


class RunView:
    """A run in the readout process, as its latest snapshot says."""

    def __init__(self, snap: RunSnapshot, stop: Callable[[], None]):
        self.run_id = snap.run_id
        self.directory = snap.directory
        self._stop = stop
        self._seq = 0
        self._status: dict[str, Any] = {}
        self.files: list[RunFile] = []
        self.record: RunRecord | None = None
        self._done = threading.Event()
        self.update(snap)

    def update(self, snap: RunSnapshot) -> None:
        if snap.seq <= self._seq or self._done.is_set():
            return  # older than what we have (sent from another thread), or final already
        self._seq = snap.seq
        self._status = snap.status
        if snap.done:
            self.files, self.record = snap.files, snap.record
            self._done.set()

    def lost(self, reason: str) -> None:
        """The process ended under the run: its files are what it closed; FAULT."""
        if not self._done.is_set():
            self._status = {**self._status, "state": "FAULT", "fault": reason}
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def stop(self) -> None:
        self._stop()


class ReadoutProcess:
    """A card's `Readout`, run in a process of its own (see `readout.worker`)."""

    def __init__(
        self,
        config: CardConfig,
        ioc: IocConfig,
        archive: ArchiveConfig,
        catalog: Catalog,
        on_state: Callable[[ReadoutStats], None] | None = None,
        on_run: Callable[[Any], None] | None = None,
        on_alarm: Callable[[str], None] | None = None,
        ext_clock_hz: Callable[[], float | None] = lambda: None,
    ):
        self.config = config
        # The front-panel clock's frequency the IOC set, which the card cannot tell the
        # process's own driver: sent with every call, for the sample rate it calibrates.
        self.ext_clock_hz = ext_clock_hz
        self.ioc = ioc
        self.archive = archive
        self.catalog = catalog
        self.on_state = on_state
        self.on_run = on_run
        self.on_alarm = on_alarm
        self.name = config.name
        self.run: RunView | None = None
        self.display: DisplayStage | None = None
        self.channel_map: ChannelMap | None = None
        self.sample_rate_hz = 0.0
        self._tap: Callable[[np.ndarray], None] | None = None
        self._stats = STOPPED
        self._stats_seq = 0
        self._context = multiprocessing.get_context("spawn")  # never fork a threaded IOC
        self._lock = self._context.Lock()  # the display ring's, shared by both processes
        self._peer: Peer | None = None
        self._process: Any = None
        self._closing = False
        self._spawn_lock = threading.Lock()

    # -- ReadoutLike --------------------------------------------------------------------

    @property
    def buffer_tap(self) -> Callable[[np.ndarray], None] | None:
        return self._tap

    @buffer_tap.setter
    def buffer_tap(self, tap: Callable[[np.ndarray], None] | None) -> None:
        changed = (tap is None) != (self._tap is None)
        self._tap = tap
        peer = self._peer
        if changed and peer is not None:
            peer.note("tap", tap is not None)

    def prepare(self) -> None:
        """Start the process now (it imports for a while) instead of at the first stream."""
        self._ensure()

    def start(
        self, sites: tuple[int, ...] | None = None, buffer_samples: int | None = None
    ) -> None:
        self._call("start", sites, buffer_samples)

    def stop(self, timeout: float = 10.0, reason: str = "") -> None:
        if self._live() is None:
            return
        self._call("stop", timeout, reason)

    def close(self) -> None:
        """Close run, stream and card in the process, then end it."""
        with self._spawn_lock:
            self._closing = True
            peer, process = self._peer, self._process
            self._peer = self._process = None
        if peer is None:
            return
        try:  # a run closes first (its files fsynced, the catalog told): give it time
            self._call_on(peer, "close", timeout=CLOSE_WAIT_S)
        except PeerGone:
            pass
        except TimeoutError as exc:
            log.error("%s", exc)
        peer.close()  # the process exits, and with it its end of the pipe
        process.join(EXIT_WAIT_S)
        if process.is_alive():
            log.error("%s: the readout process did not exit; terminating it", self.name)
            process.terminate()
            process.join(EXIT_WAIT_S)
        peer.join(EXIT_WAIT_S)
        with self._spawn_lock:
            self._closing = False

    def stats(self) -> ReadoutStats:
        return self._stats

    def start_run(self, settings: RunSettings) -> RunView:
        snap = self._call("start_run", settings)
        return self._adopt(snap)

    def stop_run(self, timeout: float | None = 30.0) -> RunView | None:
        if self._live() is None:
            return self.run
        snap = self._call("stop_run", timeout)
        if snap is not None:
            self._adopt(snap)
        return self.run

    def refresh_calibration(self) -> None:
        if self._live() is not None:
            self._call("refresh_calibration")

    def stream_info(self) -> StreamInfo:
        info: StreamInfo = self._call("stream_info")
        return info

    # -- the process --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The readout process's, while there is one."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def _live(self) -> Peer | None:
        peer = self._peer
        return peer if peer is not None and not peer.gone.is_set() else None

    def _call(self, method: str, *args: Any) -> Any:
        return self._call_on(self._ensure(), method, *args)

    def _call_on(self, peer: Peer, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Every call carries the IOC's front-panel clock first and is answered with the
        process's `Attrs`, which we keep."""
        value, attrs = peer.call(method, self.ext_clock_hz(), *args, timeout=timeout)
        assert isinstance(attrs, Attrs)
        self.channel_map, self.sample_rate_hz = attrs.channel_map, attrs.sample_rate_hz
        return value

    def _ensure(self) -> Peer:
        with self._spawn_lock:
            peer = self._live()
            if peer is not None:
                return peer
            if self._process is not None:
                self._process.join(EXIT_WAIT_S)  # an ended one: reap it
            ours, theirs = self._context.Pipe()
            self._stats_seq = 0  # a new process counts from 1 again
            process = self._context.Process(
                target=worker.main,
                args=(theirs, self._lock, self.config, self.ioc, self.archive,
                      logging.getLogger().getEffectiveLevel()),
                name=f"readout-{self.name}",
                daemon=True,
            )  # fmt: skip
            process.start()
            theirs.close()  # the child's end lives in the child: its exit ends our reads
            peer = Peer(ours, self.name, self._on_call, self._on_note, on_gone=self._gone)
            peer.start()
            if self._tap is not None:
                peer.note("tap", True)
            self._peer, self._process = peer, process
            log.info("%s: readout process %d started", self.name, process.pid)
            return peer

    def _gone(self) -> None:
        """The pipe ended: expected when closing, otherwise the process died."""
        if self._closing:
            return
        process = self._process
        code = process.exitcode if process is not None else None
        reason = f"{self.name}: the readout process ended" + (
            f" (exit code {code})" if code is not None else ""
        )
        log.error("%s", reason)
        run = self.run
        if run is not None and not run.done:
            run.lost(reason)
            self._close_record(run.run_id, reason)
            call_guarded(self.on_run, run, what=f"{self.name}: run state")
        was_streaming = self._stats.state == "streaming"
        self._stats = replace(STOPPED, state="ended" if was_streaming else "stopped",
                              reason=reason)  # fmt: skip
        if was_streaming:
            call_guarded(self.on_alarm, reason, what=f"{self.name}: alarm")
        call_guarded(self.on_state, self._stats, what=f"{self.name}: stream state")

    def _close_record(self, run_id: str, reason: str) -> None:
        """End the catalog's record of a run the process could not finish: interrupted,
        with its files as they are on disk (the one it was writing included)."""
        try:
            self.catalog.recover_interrupted(run_id, why=reason)
        except Exception as exc:
            log.error("%s: run %s: cannot close its record: %s", self.name, run_id, exc)

    def _adopt(self, snap: RunSnapshot) -> RunView:
        run = self.run
        if run is None or run.run_id != snap.run_id:
            run = self.run = RunView(snap, self._stop_run_now)
        else:
            run.update(snap)
        return run

    def _stop_run_now(self) -> None:
        peer = self._live()
        if peer is not None:
            self._call_on(peer, "run_stop")

    def _on_note(self, kind: str, payload: Any) -> None:
        if kind == "tick":
            seq, stats, snap = payload
            self._take_stats(seq, stats)
            if snap is not None:
                self._adopt(snap)
        elif kind == "state":
            seq, stats = payload
            self._take_stats(seq, stats)
            call_guarded(self.on_state, stats, what=f"{self.name}: stream state")
        elif kind == "run":
            call_guarded(self.on_run, self._adopt(payload), what=f"{self.name}: run state")
        elif kind == "alarm":
            call_guarded(self.on_alarm, payload, what=f"{self.name}: alarm")
        elif kind == "buffer":
            tap = self._tap
            if tap is not None:
                tap(payload)
        elif kind == "log":
            name, level, text = payload
            logging.getLogger(name).log(level, "%s", text)

    def _take_stats(self, seq: int, stats: ReadoutStats) -> None:
        if seq > self._stats_seq:
            self._stats_seq, self._stats = seq, stats

    def _on_call(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == "catalog":
            what, record = args
            if what not in worker.CATALOG_METHODS:
                raise ValueError(f"no catalog call {what!r}")
            getattr(self.catalog, what)(record)
            return None
        if method == "display":
            self.display = _attach(args[0], self._lock)
            return None
        raise ValueError(f"{self.name}: the IOC has no call {method!r}")


def _attach(info: DisplayInfo, lock: Any) -> DisplayStage:
    """Map the process's display ring; our stage only reads it (no calibration of its own)."""
    fd = os.open(info.path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, info.nbytes)
    finally:
        os.close(fd)
    return DisplayStage(
        info.channel_map, info.samples, None, memory=info.memory(mapping), lock=lock
    )
