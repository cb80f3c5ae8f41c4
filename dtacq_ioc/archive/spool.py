"""A durable on-disk spool of runs waiting for CouchDB.

Each run to upload is one JSON file under the spool directory (the document, its id
chosen up front, the files known so far, and what the server has confirmed), written
atomically. As the old server did, the document is posted when the run starts and each
file is sent as it closes; the entry is removed once the run has ended and the server
shows the document and every file. Delivery puts the document through the update
handler at that id, so a retry merges into the same document; a file the server has
confirmed is never sent again. Local data files are never touched.

Delivery runs either as a worker thread (the IOC) with capped exponential backoff per
run, or as one pass on demand (``dtacq-ioc runs upload``). A file lock per entry keeps
two processes from sending the same entry at once. A file the database keeps refusing
raises ``alarm`` (one line naming the run, the file and the database's answer).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dtacq_ioc.archive.couchdb import (
    EXTRAS_KEY,
    CouchClient,
    CouchError,
    CouchSettings,
    CouchUnreachable,
    measurement_document,
    run_doc_id,
)
from dtacq_ioc.archive.records import RunFile, RunRecord, sha256_of
from dtacq_ioc.config import CouchConfig

log = logging.getLogger(__name__)

ENTRY_SUFFIX = ".json"
ALARM_REFUSALS = 3  # refusals of one file in a row that raise the alarm

# (entry, file, bytes sent, file size)
FileProgress = Callable[["SpoolEntry", RunFile, int, int], None]
# (entry, None when delivered or the one-line error)
ResultCallback = Callable[["SpoolEntry", "str | None"], None]


@dataclass
class SpoolEntry:
    run_id: str
    doc_id: str
    document: dict[str, Any]
    files: list[RunFile]
    created: float = field(default_factory=time.time)
    attempts: int = 0
    last_error: str = ""
    final: bool = True  # the run has ended: nothing more will be added
    posted: bool = False  # the document is in the database
    confirmed: list[str] = field(default_factory=list)  # files the server shows complete
    refused: str = ""  # the file the database refused last, and how often in a row
    refusals: int = 0
    next_try: float = 0.0  # the worker's backoff (epoch seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "doc_id": self.doc_id,
            "document": self.document,
            "files": [f.to_dict() for f in self.files],
            "created": self.created,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "final": self.final,
            "posted": self.posted,
            "confirmed": self.confirmed,
            "refused": self.refused,
            "refusals": self.refusals,
            "next_try": self.next_try,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpoolEntry:
        return cls(
            run_id=str(data["run_id"]),
            doc_id=str(data["doc_id"]),
            document=dict(data["document"]),
            files=[RunFile.from_dict(f) for f in data["files"]],
            created=float(data.get("created", 0.0)),
            attempts=int(data.get("attempts", 0)),
            last_error=str(data.get("last_error", "")),
            final=bool(data.get("final", True)),
            posted=bool(data.get("posted", False)),
            confirmed=[str(n) for n in data.get("confirmed", [])],
            refused=str(data.get("refused", "")),
            refusals=int(data.get("refusals", 0)),
            next_try=float(data.get("next_try", 0.0)),
        )

    @property
    def outstanding(self) -> bool:
        """Whether anything is left to send (an open run may have sent all it has)."""
        unsent = any(f.name not in self.confirmed for f in self.files)
        return self.final or not self.posted or unsent


@dataclass(frozen=True)
class DeliveryResult:
    run_id: str
    doc_id: str
    error: str = ""  # empty when delivered

    @property
    def ok(self) -> bool:
        return not self.error


class Spool:
    """Runs waiting for CouchDB, in ``directory``; safe to use from any thread."""

    def __init__(
        self,
        directory: Path,
        couch: CouchConfig | CouchSettings,
        on_result: ResultCallback | None = None,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._couch = couch
        self._on_result = on_result
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._pass_lock = threading.Lock()  # one delivery pass at a time in this process
        self._entries_lock = threading.RLock()  # read-modify-write of entry files
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        # One line while a file keeps being refused: the IOC's status shows it.
        self.alarm = ""

    # -- entries -----------------------------------------------------------------

    def begin(self, record: RunRecord) -> SpoolEntry:
        """A run has started: spool its document (no files yet) to be posted now."""
        return self._update(record, final=False)

    def add_files(self, record: RunRecord) -> SpoolEntry | None:
        """Files of a running run have closed: send them now (None if not spooled)."""
        if self.get(record.run_id) is None:
            return None
        return self._update(record, final=False)

    def add(self, record: RunRecord) -> SpoolEntry:
        """Spool a finished run (atomically); wake the worker. Returns the entry."""
        return self._update(record, final=True)

    def _update(self, record: RunRecord, final: bool) -> SpoolEntry:
        files = [f if f.sha256 else RunFile.from_path(f.path, f.name) for f in record.files]
        record.files = files
        with self._entries_lock:
            existing = self.get(record.run_id)
            if existing is not None and existing.final and not final:
                # A file-closed report that lost the race with the run's end: its files
                # are in the final entry already, its "running" document is out of date.
                return existing
            # Re-spooling a run keeps its document id: the server may already hold part of it.
            doc_id = existing.doc_id if existing else record.doc_id or run_doc_id(record.run_id)
            record.doc_id = doc_id
            entry = SpoolEntry(
                run_id=record.run_id, doc_id=doc_id, document=measurement_document(record),
                files=files, final=final,
            )  # fmt: skip
            if existing is not None:
                # What the server already has stays sent; the document posted at the start
                # keeps its fields (the final update only adds ours and the file name).
                entry.created, entry.posted = existing.created, existing.posted
                entry.confirmed = existing.confirmed
                entry.attempts, entry.last_error = existing.attempts, existing.last_error
                entry.refused, entry.refusals = existing.refused, existing.refusals
                merged = {f.name: f for f in existing.files} | {f.name: f for f in files}
                entry.files = list(merged.values())
            self._write(entry)
        what = "run" if final else "running run"
        log.info("%s %s spooled for CouchDB as document %s", what, record.run_id, doc_id)
        self._wake.set()
        return entry

    def pending(self) -> list[SpoolEntry]:
        """Entries with something left to send, oldest first."""
        entries = []
        for path in self.directory.glob(f"*{ENTRY_SUFFIX}"):
            entry = self._read(path)
            if entry is not None and entry.outstanding:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.created, e.run_id))

    def get(self, run_id: str) -> SpoolEntry | None:
        path = self._path(run_id)
        return self._read(path) if path.exists() else None

    # -- delivery ----------------------------------------------------------------

    def deliver_all(self, progress: FileProgress | None = None) -> list[DeliveryResult]:
        """Try every pending entry once, in order; report each outcome."""
        return self._pass(progress, honour_backoff=False)

    def _pass(self, progress: FileProgress | None, honour_backoff: bool) -> list[DeliveryResult]:
        with self._pass_lock:
            now = time.time()
            entries = [e for e in self.pending() if not honour_backoff or e.next_try <= now]
            if not entries:
                return []
            results = []
            try:
                client = CouchClient(self._settings())
            except CouchError as exc:
                return [self._failed(e, str(exc), "") for e in entries]
            with client:
                for entry in entries:
                    results.append(self._deliver_locked(client, entry, progress))
            return results

    def _deliver_locked(
        self, client: CouchClient, entry: SpoolEntry, progress: FileProgress | None
    ) -> DeliveryResult:
        with self._entry_lock(entry.run_id) as locked:
            if not locked:
                return DeliveryResult(entry.run_id, entry.doc_id, "being delivered elsewhere")
            current = self.get(entry.run_id)
            if current is None:  # delivered by another process
                return DeliveryResult(entry.run_id, entry.doc_id)
            sending: list[str] = []
            try:
                self._deliver(client, current, progress, sending)
            except (CouchError, OSError) as exc:
                return self._failed(current, str(exc), sending[0] if sending else "", exc)
            finished = current.final  # this pass made the final update
            with self._entries_lock:
                current = self.get(entry.run_id) or current
                current.attempts, current.last_error, current.next_try = 0, "", 0.0
                current.refused, current.refusals = "", 0
                self.last_error = ""
                if self.alarm.startswith(f"run {entry.run_id}:"):
                    self.alarm = ""
                if not finished or not _all_confirmed(current):
                    # A running run is kept for its next files; files added meanwhile, or
                    # the end of the run, go out with the next pass.
                    self._write(current)
                    if current.outstanding:
                        self._wake.set()
                    return DeliveryResult(entry.run_id, entry.doc_id)
                log.info("run %s delivered to CouchDB (document %s)", entry.run_id, entry.doc_id)
                # Reported before the entry goes, so an empty spool means every report is in;
                # a crash in between only repeats a delivery, which is idempotent.
                if self._on_result is not None:
                    self._on_result(current, None)
                self._path(entry.run_id).unlink()
        return DeliveryResult(entry.run_id, entry.doc_id)

    def _deliver(
        self,
        client: CouchClient,
        entry: SpoolEntry,
        progress: FileProgress | None,
        sending: list[str],
    ) -> None:
        if not entry.posted:
            if client.get_document(entry.doc_id) is None:
                client.insert_with_timestamp(entry.document, doc_id=entry.doc_id)
            entry.posted = True
            self._merge(entry, lambda e: setattr(e, "posted", True))
        doc = _require(client, entry)
        for f in entry.files:
            if f.name in entry.confirmed:
                continue  # never sent twice
            sending[:] = [f.name]
            if not client.file_confirmed(doc, f):  # else: sent by an attempt that lost its reply
                if not Path(f.path).is_file():
                    raise CouchError(f"run {entry.run_id}: file {f.path} is missing")
                if sha256_of(f.path) != f.sha256:
                    raise CouchError(f"run {entry.run_id}: {f.path} changed since it closed")

                def file_progress(sent: int, total: int, f: RunFile = f) -> None:
                    if progress is not None:
                        progress(entry, f, sent, total)

                digest = client.upload_file(entry.doc_id, f, file_progress)
                doc = _require(client, entry)
                if not client.file_confirmed(doc, f, digest):
                    raise CouchError(f"run {entry.run_id}: server does not show {f.name} complete")
            entry.confirmed.append(f.name)
            self._merge(entry, partial(_confirm, name=f.name))
        sending.clear()
        if entry.final:
            extras = {EXTRAS_KEY: entry.document[EXTRAS_KEY]}
            if "filename" in entry.document:
                extras["filename"] = entry.document["filename"]
            client.update_document(entry.doc_id, extras)

    def _merge(self, entry: SpoolEntry, change: Callable[[SpoolEntry], Any]) -> None:
        """Record progress in the entry file, which a running run may have grown meanwhile."""
        with self._entries_lock:
            current = self.get(entry.run_id)
            if current is not None:
                change(current)
                self._write(current)

    def _failed(
        self, entry: SpoolEntry, error: str, file_name: str, exc: Exception | None = None
    ) -> DeliveryResult:
        with self._entries_lock:
            current = self.get(entry.run_id) or entry
            current.attempts += 1
            current.last_error = error
            delay = min(self.initial_backoff_s * 2 ** (current.attempts - 1), self.max_backoff_s)
            current.next_try = time.time() + delay
            refused = file_name and not isinstance(exc, CouchUnreachable)
            if refused:
                same = current.refused == file_name
                current.refused, current.refusals = file_name, current.refusals + 1 if same else 1
            if self._path(entry.run_id).exists():
                self._write(current)
        self.last_error = error
        log.warning("run %s not delivered (attempt %d): %s", entry.run_id, current.attempts, error)
        if refused and current.refusals >= ALARM_REFUSALS:
            self.alarm = (
                f"run {entry.run_id}: {file_name} refused {current.refusals} times "
                f"by the database: {error}"
            )
            if current.refusals == ALARM_REFUSALS:
                log.error("%s", self.alarm)
        if self._on_result is not None:
            self._on_result(current, error)
        return DeliveryResult(entry.run_id, entry.doc_id, error)

    # -- the worker --------------------------------------------------------------

    def start(self) -> None:
        """Deliver in a thread: now, whenever an entry is added, and with backoff on failure."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._wake.set()  # a restart resumes what an earlier process spooled
        self._thread = threading.Thread(target=self._run, name="spool-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Block until the spool is empty (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.pending():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 1.0))
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._pass(None, honour_backoff=True)
            except Exception:  # the worker must outlive any surprise; the entry stays
                log.exception("spool delivery pass failed")
            with self._idle:
                self._idle.notify_all()
            # Sleep until the earliest retry is due, or an entry is added.
            waits = [e.next_try - time.time() for e in self.pending()]
            # (At least a moment: an entry another process is sending has no backoff.)
            self._wake.wait(max(min(waits), 0.2) if waits else None)
            self._wake.clear()

    # -- files -------------------------------------------------------------------

    def _settings(self) -> CouchSettings:
        if isinstance(self._couch, CouchSettings):
            return self._couch
        return CouchSettings.from_config(self._couch)

    def _path(self, run_id: str) -> Path:
        return self.directory / f"{quote(run_id, safe='')}{ENTRY_SUFFIX}"

    def _write(self, entry: SpoolEntry) -> None:
        path = self._path(entry.run_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(entry.to_dict(), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read(self, path: Path) -> SpoolEntry | None:
        try:
            return SpoolEntry.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("spool entry %s unreadable, left in place: %s", path, exc)
            return None

    @contextlib.contextmanager
    def _entry_lock(self, run_id: str) -> Iterator[bool]:
        lock_path = self._path(run_id).with_suffix(".lock")
        with open(lock_path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                if not self._path(run_id).exists():
                    lock_path.unlink(missing_ok=True)
                fcntl.flock(f, fcntl.LOCK_UN)


def _confirm(entry: SpoolEntry, name: str) -> None:
    if name not in entry.confirmed:
        entry.confirmed.append(name)


def _all_confirmed(entry: SpoolEntry) -> bool:
    return all(f.name in entry.confirmed for f in entry.files)


def _require(client: CouchClient, entry: SpoolEntry) -> dict[str, Any]:
    doc = client.get_document(entry.doc_id)
    if doc is None:
        raise CouchError(f"run {entry.run_id}: document {entry.doc_id} missing after insert")
    return doc
