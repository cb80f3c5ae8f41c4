"""The embedded catalog: ``runs.sqlite`` in the archive's data directory.

One row per run (the whole header as JSON plus columns for the fields people sort and
filter by), one row per file. WAL mode lets ``dtacq-ioc runs`` read while the IOC
writes. Every method may be called from any thread: one connection, one lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtacq_ioc.archive.dig import file_index, read_dig, run_files
from dtacq_ioc.archive.records import RunFile, RunRecord, sha256_of

log = logging.getLogger(__name__)

CATALOG_FILE = "runs.sqlite"
# Room kept beside the catalog, given up when the disk is full so that the run which
# filled it is still closed with its reason (a row and its files take a few pages).
RESERVE_SUFFIX = ".reserve"
RESERVE_BYTES = 2 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    card TEXT NOT NULL,
    host TEXT NOT NULL,
    measurement_name TEXT NOT NULL,
    log TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    stopped REAL,
    samples INTEGER NOT NULL,
    bytes_written INTEGER NOT NULL,
    counter_errors INTEGER NOT NULL,
    overruns INTEGER NOT NULL,
    fault TEXT NOT NULL,
    upload INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    upload_state TEXT NOT NULL DEFAULT '',
    upload_error TEXT NOT NULL DEFAULT '',
    freq_hz REAL,
    byte_depth INTEGER,
    bit_shift INTEGER,
    downsample INTEGER,
    nchannels INTEGER,
    date TEXT,
    header_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_card_started ON runs (card, started);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""

# Record fields stored as plain columns, in table order.
_RECORD_COLUMNS = (
    "run_id",
    "card",
    "host",
    "measurement_name",
    "log",
    "state",
    "started",
    "stopped",
    "samples",
    "bytes_written",
    "counter_errors",
    "overruns",
    "fault",
    "upload",
    "doc_id",
)
# Header fields copied into columns (the JSON keeps them all).
_HEADER_COLUMNS = ("freq_hz", "byte_depth", "bit_shift", "downsample", "date")


@dataclass(frozen=True)
class UploadState:
    """Where a run stands with CouchDB: '' (not for upload), 'spooled' or 'delivered'."""

    state: str = ""
    error: str = ""


class SqliteCatalog:
    """The ``Catalog`` over one SQLite file."""

    def __init__(self, path: Path, readonly: bool = False):
        """`readonly` opens an existing catalog for reading only (the bridge's runs view)."""
        self.path = Path(path)
        self.reserve = self.path.with_name(self.path.name + RESERVE_SUFFIX)
        self._lock = threading.Lock()
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10.0)
            self._conn.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            self._keep_room()

    # -- the Catalog protocol --------------------------------------------------------

    def run_started(self, record: RunRecord) -> None:
        self._save(record)

    def run_updated(self, record: RunRecord) -> None:
        """Record progress (new files, samples) so a killed process leaves a useful row."""
        self._save(record)

    def run_finished(self, record: RunRecord) -> None:
        self._save(record)

    def list_runs(
        self,
        limit: int = 50,
        card: str | None = None,
        name: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[RunRecord]:
        """Newest first; `name` matches part of the measurement name or run id, any case."""
        where: list[str] = []
        params: list[Any] = []
        if card is not None:
            where.append("card = ?")
            params.append(card)
        if name:
            where.append("(instr(lower(measurement_name), ?) > 0 OR instr(lower(run_id), ?) > 0)")
            params += [name.lower(), name.lower()]
        if since is not None:
            where.append("started >= ?")
            params.append(since)
        if until is not None:
            where.append("started < ?")
            params.append(until)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY started DESC, run_id DESC LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
            return [self._record(row) for row in rows]

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            return None if row is None else self._record(row)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- beyond the protocol ---------------------------------------------------------

    def recover_interrupted(
        self, run_id: str | None = None, why: str = "process ended during the run"
    ) -> list[RunRecord]:
        """Mark runs a killed process left 'running' (all, or the one `run_id`) as
        'interrupted', `why` in their fault; return them.

        Sizes and digests are taken from the files as they are on disk, since the
        writer never got to report them; a missing file is dropped from the record
        and named in ``fault``.
        """
        recovered = []
        for record in self._running():
            if run_id is not None and record.run_id != run_id:
                continue
            missing = [f.name for f in record.files if not Path(f.path).is_file()]
            record.files = [_rescan(f) for f in record.files if f.name not in missing]
            # Files opened after the last report are on disk only: the run's directory
            # (<data_dir>/<card>/<run_id>, beside this catalog) has them all.
            known = {f.name for f in record.files}
            directory = self.path.parent / record.card / record.run_id
            if directory.is_dir():
                extra = [RunFile.from_path(p) for p in run_files(directory) if p.name not in known]
                record.files = sorted([*record.files, *extra], key=lambda f: file_index(f.name))
            # A file killed before its header was out holds nothing: it goes.
            for f in record.files:
                if f.size == 0:
                    Path(f.path).unlink(missing_ok=True)
            record.files = [f for f in record.files if f.size]
            record.samples = sum(_samples_in(Path(f.path)) for f in record.files)
            record.bytes_written = sum(f.size for f in record.files)
            record.state = "interrupted"
            record.stopped = record.stopped or _last_change(record)
            note = why
            if missing:
                note += f"; missing files: {', '.join(missing)}"
            record.fault = f"{record.fault}; {note}" if record.fault else note
            self._save(record)
            log.warning("run %s marked interrupted (%s)", record.run_id, note)
            recovered.append(record)
        return recovered

    def set_upload_state(self, run_id: str, state: str, doc_id: str = "", error: str = "") -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE runs SET upload_state = ?, upload_error = ?,"
                " doc_id = CASE WHEN ? = '' THEN doc_id ELSE ? END WHERE run_id = ?",
                (state, error, doc_id, doc_id, run_id),
            )

    def upload_state(self, run_id: str) -> UploadState:
        with self._lock:
            row = self._conn.execute(
                "SELECT upload_state, upload_error FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return UploadState() if row is None else UploadState(row[0], row[1])

    # -- internals -------------------------------------------------------------------

    def _running(self) -> list[RunRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM runs WHERE state = 'running'").fetchall()
            return [self._record(row) for row in rows]

    def _save(self, record: RunRecord) -> None:
        values = [getattr(record, c) for c in _RECORD_COLUMNS]
        values[_RECORD_COLUMNS.index("upload")] = int(record.upload)
        header = record.header
        extra = [_scalar(header.get(c)) for c in _HEADER_COLUMNS]
        channel_list = header.get("channel_list")
        nchannels = len(channel_list) if isinstance(channel_list, list) else None
        columns = (*_RECORD_COLUMNS, *_HEADER_COLUMNS, "nchannels", "header_json")
        row = (*values, *extra, nchannels, json.dumps(header, sort_keys=True, default=str))
        with self._lock:
            try:
                self._write_row(record, columns, row)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL or not self.reserve.exists():
                    raise
                # The disk is full (most likely the run being recorded filled it).
                log.warning("disk full: the catalog's reserve goes to record %s", record.run_id)
                self.reserve.unlink()
                self._write_row(record, columns, row)
            self._keep_room()

    def _write_row(self, record: RunRecord, columns: tuple[str, ...], row: tuple[Any, ...]) -> None:
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
        with self._conn:
            self._conn.execute(
                f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                f" ON CONFLICT (run_id) DO UPDATE SET {updates}",
                row,
            )
            self._conn.execute("DELETE FROM files WHERE run_id = ?", (record.run_id,))
            self._conn.executemany(
                "INSERT INTO files (run_id, idx, name, path, size, sha256)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (record.run_id, i, f.name, f.path, f.size, f.sha256)
                    for i, f in enumerate(record.files)
                ],
            )

    def _keep_room(self) -> None:
        """Make the reserve when it is missing and the disk has room for it again."""
        if self.reserve.exists():
            return
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)  # real blocks: a sparse file frees none
        except OSError:
            with contextlib.suppress(OSError):
                self.reserve.unlink()  # no room yet: try again at the next write
        finally:
            os.close(fd)

    def _record(self, row: sqlite3.Row) -> RunRecord:
        files = self._conn.execute(
            "SELECT name, path, size, sha256 FROM files WHERE run_id = ? ORDER BY idx",
            (row["run_id"],),
        ).fetchall()
        values = {c: row[c] for c in _RECORD_COLUMNS}
        values["upload"] = bool(values["upload"])
        return RunRecord(
            **values,
            header=json.loads(row["header_json"]),
            files=[RunFile(f["name"], f["path"], f["size"], f["sha256"]) for f in files],
        )


def _scalar(value: Any) -> Any:
    """A header value fit for a column: numbers and strings as they are, else None."""
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float | str) else None


def _samples_in(path: Path) -> int:
    """Whole samples in a .dig file, as reading it gives them (raw samples, so times
    the downsampling of a float file); 0 for a file that is not readable as one."""
    try:
        header, channels = read_dig(path)  # memory-mapped: nothing is read but the header
    except (OSError, ValueError, TypeError) as exc:  # DigError is a ValueError
        log.warning("%s: no samples counted: %s", path, exc)
        return 0
    rows = len(next(iter(channels.values()))) if channels else 0
    return rows * (int(header.get("downsample") or 1) if header.get("is_float") else 1)


def _rescan(f: RunFile) -> RunFile:
    size = Path(f.path).stat().st_size
    if size == f.size and f.sha256:
        return f
    return RunFile(f.name, f.path, size, sha256_of(f.path))


def _last_change(record: RunRecord) -> float:
    """When the run last wrote: its newest file's mtime, else its start."""
    times = [Path(f.path).stat().st_mtime for f in record.files]
    return max(times, default=record.started or time.time())
