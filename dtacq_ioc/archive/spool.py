"""A durable on-disk spool of runs waiting for CouchDB.

Each finished run to upload becomes one JSON file under the spool directory (the
document, its id chosen up front, and the file list), written atomically. Delivery
puts the document through the update handler at that id, so a retry after a partial
delivery merges into the same document instead of creating a second one, then sends
every file the server does not yet show complete. The entry is removed only once the
server shows the document and every file; local data files are never touched.

Delivery runs either as a worker thread (the IOC) with capped exponential backoff, or
as one pass on demand (``dtacq-ioc runs upload``). A file lock per entry keeps two
processes from sending the same entry at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dtacq_ioc.archive.couchdb import (
    CouchClient,
    CouchError,
    CouchSettings,
    measurement_document,
)
from dtacq_ioc.archive.records import RunFile, RunRecord, sha256_of
from dtacq_ioc.config import CouchConfig

log = logging.getLogger(__name__)

ENTRY_SUFFIX = ".json"

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "doc_id": self.doc_id,
            "document": self.document,
            "files": [f.to_dict() for f in self.files],
            "created": self.created,
            "attempts": self.attempts,
            "last_error": self.last_error,
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
        )


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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    # -- entries -----------------------------------------------------------------

    def add(self, record: RunRecord) -> SpoolEntry:
        """Spool a finished run (atomically); wake the worker. Returns the entry."""
        files = [f if f.sha256 else RunFile.from_path(f.path, f.name) for f in record.files]
        record.files = files
        existing = self.get(record.run_id)
        # Re-spooling a run keeps its document id: the server may already hold part of it.
        doc_id = existing.doc_id if existing else record.doc_id or new_doc_id()
        record.doc_id = doc_id
        entry = SpoolEntry(
            run_id=record.run_id,
            doc_id=doc_id,
            document=measurement_document(record),
            files=files,
        )
        self._write(entry)
        log.info("run %s spooled for CouchDB as document %s", record.run_id, doc_id)
        self._wake.set()
        return entry

    def pending(self) -> list[SpoolEntry]:
        entries = []
        for path in self.directory.glob(f"*{ENTRY_SUFFIX}"):
            entry = self._read(path)
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.created, e.run_id))

    def get(self, run_id: str) -> SpoolEntry | None:
        path = self._path(run_id)
        return self._read(path) if path.exists() else None

    # -- delivery ----------------------------------------------------------------

    def deliver_all(self, progress: FileProgress | None = None) -> list[DeliveryResult]:
        """Try every pending entry once, in order; report each outcome."""
        with self._pass_lock:
            entries = self.pending()
            if not entries:
                return []
            results = []
            try:
                client = CouchClient(self._settings())
            except CouchError as exc:
                return [self._failed(e, str(exc)) for e in entries]
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
            if not self._path(entry.run_id).exists():  # delivered by another process
                return DeliveryResult(entry.run_id, entry.doc_id)
            try:
                self._deliver(client, entry, progress)
            except (CouchError, OSError) as exc:
                return self._failed(entry, str(exc))
            log.info("run %s delivered to CouchDB (document %s)", entry.run_id, entry.doc_id)
            self.last_error = ""
            # Reported before the entry goes, so an empty spool means every report is in;
            # a crash in between only repeats a delivery, which is idempotent.
            if self._on_result is not None:
                self._on_result(entry, None)
            self._path(entry.run_id).unlink()
        return DeliveryResult(entry.run_id, entry.doc_id)

    def _deliver(
        self, client: CouchClient, entry: SpoolEntry, progress: FileProgress | None
    ) -> None:
        doc = client.get_document(entry.doc_id)
        if doc is None:
            client.insert_with_timestamp(entry.document, doc_id=entry.doc_id)
            doc = _require(client, entry)
        digests: dict[str, str] = {}
        for f in entry.files:
            if client.file_confirmed(doc, f):
                continue  # sent by an earlier attempt
            if not Path(f.path).is_file():
                raise CouchError(f"run {entry.run_id}: file {f.path} is missing")
            if sha256_of(f.path) != f.sha256:
                raise CouchError(f"run {entry.run_id}: {f.path} changed since the run ended")

            def file_progress(sent: int, total: int, f: RunFile = f) -> None:
                if progress is not None:
                    progress(entry, f, sent, total)

            digests[f.name] = client.upload_file(entry.doc_id, f, file_progress)
            doc = _require(client, entry)
        missing = [
            f.name
            for f in entry.files
            if not client.file_confirmed(doc, f, digests.get(f.name, ""))
        ]
        if missing:
            raise CouchError(
                f"run {entry.run_id}: server does not show complete: {', '.join(missing)}"
            )

    def _failed(self, entry: SpoolEntry, error: str) -> DeliveryResult:
        entry.attempts += 1
        entry.last_error = error
        self.last_error = error
        if self._path(entry.run_id).exists():
            self._write(entry)
        log.warning("run %s not delivered (attempt %d): %s", entry.run_id, entry.attempts, error)
        if self._on_result is not None:
            self._on_result(entry, error)
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

    def kick(self) -> None:
        self._wake.set()

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
        failures = 0
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                results = self.deliver_all()
            except Exception:  # the worker must outlive any surprise; the entry stays
                log.exception("spool delivery pass failed")
                results = [DeliveryResult("", "", "internal error")]
            with self._idle:
                self._idle.notify_all()
            if any(not r.ok for r in results):
                failures += 1
                delay = min(self.initial_backoff_s * 2 ** (failures - 1), self.max_backoff_s)
                if self._stop.wait(delay):
                    break
                self._wake.set()
            else:
                failures = 0

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


def new_doc_id() -> str:
    """A document id chosen before the first attempt, like CouchDB's own uuids."""
    return uuid.uuid4().hex


def _require(client: CouchClient, entry: SpoolEntry) -> dict[str, Any]:
    doc = client.get_document(entry.doc_id)
    if doc is None:
        raise CouchError(f"run {entry.run_id}: document {entry.doc_id} missing after insert")
    return doc
