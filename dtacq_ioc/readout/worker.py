"""The readout process of one card: its `Readout` (stream, counter check, display ring,
run writer and hasher) with an interpreter of its own.

Why a process: in one interpreter the readouts of many cards, their writers and hashers
and the IOC's event loop all queue for one lock (the GIL); with eight cards the loop got
a third of the time it needed and the display fell to 5 Hz while the cores were not
busy (bench/RESULTS.md). Here the bytes never enter the IOC's process: the IOC reads the
display ring from shared memory, is sent the counters at the display rate, and answers
the run's catalog calls, so the catalog stays one (the IOC's).

`main` is the process's entry; `readout.process.ReadoutProcess` is the IOC's end.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.card.card import Card
from dtacq_ioc.config import ArchiveConfig, CardConfig, IocConfig
from dtacq_ioc.readout.display import DisplayMemory, DisplayStage, code_dtype
from dtacq_ioc.readout.peer import Peer
from dtacq_ioc.readout.pipeline import Readout
from dtacq_ioc.readout.run import Run, RunState
from dtacq_ioc.readout.transform import ChannelMap
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)

# Shared memory is a file both processes map; /dev/shm keeps it off the disk.
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else None

CATALOG_METHODS = frozenset({"run_started", "run_updated", "run_finished"})
FINAL_STATES = (RunState.IDLE, RunState.FAULT)


@dataclass(frozen=True)
class DisplayInfo:
    """A new display ring in shared memory: the IOC maps `path` (and removes the name)."""

    path: str
    channel_map: ChannelMap
    samples: int

    @property
    def nbytes(self) -> int:
        cmap = self.channel_map
        return DisplayMemory.nbytes(cmap.nchan, self.samples, code_dtype(cmap))

    def memory(self, buffer: Any) -> DisplayMemory:
        cmap = self.channel_map
        return DisplayMemory.over(buffer, cmap.nchan, self.samples, code_dtype(cmap))


@dataclass(frozen=True)
class RunSnapshot:
    """A run as the IOC sees it: its status, and its files and record once done.
    `seq` orders snapshots sent from different threads (the older one is dropped)."""

    seq: int
    run_id: str
    directory: str
    status: dict[str, Any]
    done: bool
    files: list[RunFile] = field(default_factory=list)
    record: RunRecord | None = None


@dataclass(frozen=True)
class Attrs:
    """What the IOC reads of the readout directly, sent back with every answer."""

    channel_map: ChannelMap | None
    sample_rate_hz: float


def main(
    conn: Connection,
    lock: Any,
    card: CardConfig,
    ioc: IocConfig,
    archive: ArchiveConfig,
    log_level: int,
) -> None:
    """The readout process: serve the IOC until it closes the pipe (or its process ends);
    a run still open then ends with the files complete."""
    worker = Worker(conn, lock, card, ioc, archive)
    root = logging.getLogger()
    root.handlers[:] = [NoteHandler(worker.peer)]
    root.setLevel(log_level)
    # A Ctrl-C reaches the whole terminal's group: the IOC decides when we end (by
    # closing the pipe) and closes the runs first. SIGTERM sent to us alone ends us cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: worker.end_soon("SIGTERM"))
    worker.serve()


class NoteHandler(logging.Handler):
    """Log records to the IOC's log (as text: a record's arguments may not pickle)."""

    def __init__(self, peer: Peer):
        super().__init__()
        self.peer = peer
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.peer.note("log", (record.name, record.levelno, self.format(record)))


class CatalogCalls:
    """The run's catalog: the IOC's, over the pipe (a refusal comes back as the IOC's)."""

    def __init__(self, peer: Peer):
        self.peer = peer

    def run_started(self, record: RunRecord) -> None:
        self.peer.call("catalog", "run_started", record)

    def run_updated(self, record: RunRecord) -> None:
        self.peer.call("catalog", "run_updated", record)

    def run_finished(self, record: RunRecord) -> None:
        self.peer.call("catalog", "run_finished", record)

    def list_runs(self, limit: int = 50, card: str | None = None) -> list[RunRecord]:
        return []  # the IOC lists runs from its own catalog

    def get_run(self, run_id: str) -> RunRecord | None:
        return None

    def recover_interrupted(
        self, run_id: str | None = None, why: str = "process ended during the run"
    ) -> list[RunRecord]:
        return []  # the IOC recovers a run this process could not finish

    def close(self) -> None:
        pass


class LatestSender:
    """Run buffers to the IOC while it shows them: only the newest waits, so a slow pipe
    never holds up the stream thread."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self._latest: np.ndarray | None = None
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def offer(self, ai: np.ndarray) -> None:
        copy = np.ascontiguousarray(ai).reshape(-1).copy()  # `ai` is a pool buffer's view
        with self._ready:
            self._latest = copy
            if self._thread is None:
                self._thread = threading.Thread(target=self._send, name="tap", daemon=True)
                self._thread.start()
            self._ready.notify()

    def _send(self) -> None:
        while not self.peer.gone.is_set():
            with self._ready:
                self._ready.wait_for(lambda: self._latest is not None, timeout=1.0)
                words, self._latest = self._latest, None
            if words is not None:
                self.peer.note("buffer", words)


class Worker:
    def __init__(
        self, conn: Connection, lock: Any, card: CardConfig, ioc: IocConfig, archive: ArchiveConfig
    ):
        self.name = card.name
        self.lock = lock
        self.peer = Peer(conn, card.name, self._call, self._note, on_gone=self._gone)
        self.card = Card(card, ioc.min_sample_rate_hz)
        self.readout = Readout(
            self.card, ioc, archive, CatalogCalls(self.peer),
            triggers=TriggerRegistry(ioc.trigger_dir),
            on_state=lambda stats: self.peer.note("state", (next(self._seq), stats)),
            on_run=lambda run: self.peer.note("run", self._snapshot(run)),
            on_alarm=lambda message: self.peer.note("alarm", message),
            make_display=self._display,
        )  # fmt: skip
        self.period_s = min(1.0, max(0.05, 1.0 / ioc.display_rate_hz))
        self._seq = itertools.count(1)
        self._tap = LatestSender(self.peer)
        self._ended = threading.Event()

    def serve(self) -> None:
        self.peer.start()
        while not self._ended.wait(self.period_s):
            run = self.readout.run
            snap = self._snapshot(run) if run is not None else None
            self.peer.note("tick", (next(self._seq), self.readout.stats(), snap))
        self.peer.join(10.0)

    def end_soon(self, why: str) -> None:
        """Close run and card on a thread (a signal handler must not wait), then exit."""
        log.warning("%s: readout process ending (%s)", self.name, why)
        threading.Thread(target=self._gone, name="ending", daemon=True).start()

    def _gone(self) -> None:
        """The IOC closed the pipe or ended: close the run and the card, then exit."""
        try:
            self.readout.close()
        finally:
            self.card.close()
            self._ended.set()

    def _snapshot(self, run: Run) -> RunSnapshot:
        # Done with its last state change (IDLE or FAULT, the record made), a moment
        # before `run.done`: the snapshot sent with that change must say so.
        done = run.done or (run.record is not None and run.state in FINAL_STATES)
        return RunSnapshot(
            seq=next(self._seq),
            run_id=run.run_id,
            directory=str(run.directory),
            status=run.status(),
            done=done,
            files=list(run.files) if done else [],
            record=run.record if done else None,
        )

    def _display(self, cmap: ChannelMap, samples: int, rate: float) -> DisplayStage:
        """The display ring in a file both processes map; the IOC maps it before we go on."""
        fd, path = tempfile.mkstemp(prefix=f"dtacq-display-{self.name}-", dir=SHM_DIR)
        info = DisplayInfo(path, cmap, samples)
        try:
            os.ftruncate(fd, info.nbytes)
            mapping = mmap.mmap(fd, info.nbytes)
        finally:
            os.close(fd)
        try:
            stage = DisplayStage(cmap, samples, rate, memory=info.memory(mapping), lock=self.lock)
            self.peer.call("display", info)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)  # the IOC has it mapped (or failed to): the name is not needed
        return stage

    # -- from the IOC -------------------------------------------------------------------

    def _call(self, method: str, args: tuple[Any, ...]) -> tuple[Any, Attrs]:
        self.card.assume_external_clock(args[0])  # see ReadoutProcess.ext_clock_hz
        value = self._do(method, args[1:])
        return value, Attrs(self.readout.channel_map, self.readout.sample_rate_hz)

    def _do(self, method: str, args: tuple[Any, ...]) -> Any:
        readout = self.readout
        if method == "start":
            readout.start(*args)
        elif method == "stop":
            timeout, reason = args
            readout.stop(timeout, reason)
            if reason:  # the link is lost: the IOC reconnects the card, so do we
                self._disconnect()
        elif method == "close":
            readout.close()
            self._disconnect()
        elif method == "start_run":
            return self._snapshot(readout.start_run(*args))
        elif method == "stop_run":
            run = readout.stop_run(*args)
            return self._snapshot(run) if run is not None else None
        elif method == "run_stop":
            if readout.run is not None:
                readout.run.stop()
        elif method == "refresh_calibration":
            readout.refresh_calibration()
        elif method == "stream_info":
            return readout.stream_info()
        else:
            raise ValueError(f"{self.name}: the readout process has no call {method!r}")
        return None

    def _disconnect(self) -> None:
        self.card.close()
        self.card.info = None

    def _note(self, kind: str, payload: Any) -> None:
        if kind == "tap":
            self.readout.buffer_tap = self._tap.offer if payload else None
