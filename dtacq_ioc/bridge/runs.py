"""The runs view's HTTP endpoints: the catalog read-only, a run's header, its data decimated.

    GET /runs/?name=&since=&until=&limit=     runs, newest first (since/until: YYYY-MM-DD, UTC)
    GET /runs/RUN_ID                          the run's record, header and file links
    GET /runs/RUN_ID/plot?channels=&start=&end=&width=
                                              min/max per pixel column of samples [start, end)
    GET /runs/RUN_ID/export?format=csv|npy    a zip of what `dtacq-ioc runs export` writes

The catalog is opened read-only for each request, so the bridge alone (no IOC) serves
it, and a catalog made after the bridge started is found. Samples are read through
memory maps of the .dig files, never whole: a column of a long run is summarised by
a block of samples from its middle (`exact` false in the answer) until the range is
short enough to read all of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dtacq_ioc.archive.cli import RunsError, export_run
from dtacq_ioc.archive.dig import DigError, map_dig
from dtacq_ioc.archive.records import RunRecord
from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog

log = logging.getLogger(__name__)

# Ranges up to this many rows are read whole (16 channels of int16: 64 MiB) for exact
# min/max; longer ones read BLOCK_BYTES from the middle of each column.
EXACT_ROWS = 2_000_000
BLOCK_BYTES = 32 << 10
READERS = 16
EXPORT_MAX_BYTES = 1 << 30
MAX_WIDTH = 4000
MAX_LIMIT = 1000


class NotFound(RunsError):
    """A run or file the catalog does not have (HTTP 404)."""


@dataclass
class DigPart:
    """One file of a run: its samples mapped, and where they start in the file."""

    path: str
    data: np.ndarray  # (rows, channels) memory map
    offset: int

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])


@dataclass
class RunData:
    """A run's samples over all its files, as memory maps (nothing read until asked)."""

    header: dict[str, Any]
    parts: list[DigPart]
    starts: np.ndarray  # first row of each file, and the total at the end

    @classmethod
    def open(cls, paths: list[str]) -> RunData:
        if not paths:
            raise RunsError("the run has no files")
        header: dict[str, Any] | None = None
        parts = []
        for path in paths:
            try:
                h, data, offset = map_dig(path)
            except (DigError, OSError) as exc:
                raise RunsError(str(exc)) from None
            header = header or h
            parts.append(DigPart(str(path), data, offset))
        assert header is not None
        starts = np.concatenate([[0], np.cumsum([p.rows for p in parts])]).astype(np.int64)
        return cls(header, parts, starts)

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    @property
    def channels(self) -> list[int]:
        return [int(c) for c in self.header["channel_list"]]

    @property
    def rate_hz(self) -> float:
        """Rows per second in the files (the card's rate over the downsampling)."""
        rate = float(self.header.get("freq_hz") or 0.0)
        return rate / max(1, int(self.header.get("downsample") or 1)) if rate > 0 else 0.0

    def _exact(self, cols: list[int], start: int, end: int, cuts: np.ndarray) -> tuple[Any, Any]:
        """Min and max of every sample of each column [cuts[i], cuts[i+1])."""
        pieces = []
        for i, part in enumerate(self.parts):
            lo, hi = max(start, self.starts[i]), min(end, self.starts[i + 1])
            if lo < hi:
                pieces.append(part.data[lo - self.starts[i] : hi - self.starts[i], cols])
        x = np.concatenate(pieces)
        return np.minimum.reduceat(x, cuts, axis=0), np.maximum.reduceat(x, cuts, axis=0)

    def _sampled(self, cols: list[int], edges: np.ndarray, block: int) -> tuple[Any, Any]:
        """Min and max of `block` rows from the middle of each column, read in parallel.

        pread on threads keeps many reads in flight: a cold disk answers scattered
        reads far faster than one page fault at a time through the memory map.
        """
        dtype = self.parts[0].data.dtype
        nchan = self.parts[0].data.shape[1]
        row_bytes = dtype.itemsize * nchan
        mids = (edges[:-1] + edges[1:]) // 2
        which = np.searchsorted(self.starts, mids, side="right") - 1
        fds = [os.open(p.path, os.O_RDONLY) for p in self.parts]
        try:

            def read(k: int) -> tuple[Any, Any]:
                # Within the column, and within the file holding its middle.
                part, first = self.parts[which[k]], int(self.starts[which[k]])
                lo, hi = max(int(edges[k]), first), min(int(edges[k + 1]), first + part.rows)
                n = min(block, hi - lo)
                local = max(lo, min(int(mids[k]) - n // 2, hi - n)) - first
                raw = os.pread(fds[which[k]], n * row_bytes, part.offset + local * row_bytes)
                x = np.frombuffer(raw, dtype=dtype)[: (len(raw) // row_bytes) * nchan]
                x = x.reshape(-1, nchan)[:, cols]
                return x.min(axis=0), x.max(axis=0)

            with ThreadPoolExecutor(max_workers=READERS) as pool:
                found = list(pool.map(read, range(len(mids))))
        finally:
            for fd in fds:
                os.close(fd)
        return np.array([f[0] for f in found]), np.array([f[1] for f in found])

    def decimate(
        self,
        channels: list[int],
        start: int = 0,
        end: int | None = None,
        width: int = 1000,
        exact_rows: int = EXACT_ROWS,
    ) -> dict[str, Any]:
        """Min and max of each channel over `width` equal columns of rows [start, end)."""
        end = self.rows if end is None else min(end, self.rows)
        start = max(0, min(start, end))
        n = end - start
        width = max(1, min(width, n, MAX_WIDTH)) if n else 0
        edges = start + (np.arange(width + 1, dtype=np.int64) * n) // max(width, 1)
        exact = n <= exact_rows
        known = self.channels
        cols = [known.index(ch) for ch in channels]
        lo: Any  # integer codes, or floats for downsampled runs (shift 0)
        hi: Any
        if width == 0 or not cols:
            lo = hi = np.empty((0, len(cols)))
        elif exact:
            lo, hi = self._exact(cols, start, end, edges[:-1] - start)
        else:
            row_bytes = self.parts[0].data.dtype.itemsize * self.parts[0].data.shape[1]
            lo, hi = self._sampled(cols, edges, max(1, BLOCK_BYTES // row_bytes))
        shift = 0 if self.header.get("is_float") else int(self.header.get("bit_shift") or 0)
        if shift:
            lo, hi = lo >> shift, hi >> shift
        rate = self.rate_hz
        return {
            "start": start,
            "end": end,
            "rows": self.rows,
            "width": width,
            "exact": exact,
            "rows_per_column": int(n // width) if width else 0,
            "rate_hz": rate,
            "x": [(e / rate if rate else int(e)) for e in edges[:-1].tolist()],
            "x_units": "s" if rate else "sample",
            "min": {str(ch): lo[:, i].tolist() for i, ch in enumerate(channels)},
            "max": {str(ch): hi[:, i].tolist() for i, ch in enumerate(channels)},
            "units": "ADC mean" if self.header.get("is_float") else "ADC",
        }


class RunsResource(Resource):
    """`/runs/...`: everything is computed on a thread, never on the event loop."""

    isLeaf = True

    def __init__(self, data_dir: Path):
        super().__init__()
        self.data_dir = Path(data_dir)
        # Threads of its own: a long export never holds up the IOC's asyncio.to_thread work.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="runs-view")

    def render_GET(self, request: Any) -> Any:
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
        job: Callable[[], Any]
        if not path:
            job, kind = (lambda: self.list(args)), "json"
        elif len(path) == 1:
            job, kind = (lambda: self.show(path[0])), "json"
        elif len(path) == 2 and path[1] == "plot":
            job, kind = (lambda: self.plot(path[0], args)), "json"
        elif len(path) == 2 and path[1] == "export":
            job, kind = (lambda: self.export(path[0], args.get("format", "csv"))), "file"
        else:
            return self._fail(request, NotFound("no such page under /runs/"))
        # Twisted's thread pool starts only with reactor.run(), which the bridge never
        # calls (asyncio runs the loop).
        future = asyncio.get_running_loop().run_in_executor(self.pool, job)
        d = Deferred.fromFuture(future)
        d.addCallbacks(
            lambda result: self._done(request, kind, result),
            lambda failure: self._failed(request, failure),
        )
        return NOT_DONE_YET

    # -- on a thread --

    def _catalog(self) -> SqliteCatalog | None:
        path = self.data_dir / CATALOG_FILE
        if not path.is_file():
            return None
        try:
            return SqliteCatalog(path, readonly=True)
        except sqlite3.Error as exc:
            raise RunsError(f"catalog {path} unreadable: {exc}") from None

    def _record(self, run_id: str) -> RunRecord:
        catalog = self._catalog()
        record = None
        if catalog is not None:
            try:
                record = catalog.get_run(run_id)
            finally:
                catalog.close()
        if record is None:
            raise NotFound(f"unknown run id {run_id!r}")
        return record

    def list(self, args: dict[str, str]) -> list[dict[str, Any]]:
        limit = min(_int(args, "limit", 200), MAX_LIMIT)
        since = _day(args, "since")
        until = _day(args, "until")
        catalog = self._catalog()
        if catalog is None:
            return []
        try:
            records = catalog.list_runs(
                limit=limit,
                card=args.get("card") or None,
                name=args.get("name") or None,
                since=since,
                until=None if until is None else until + 86400.0,  # the whole day
            )
            return [self._summary(r, catalog.upload_state(r.run_id).state) for r in records]
        finally:
            catalog.close()

    def _summary(self, r: RunRecord, upload: str) -> dict[str, Any]:
        return {
            "run_id": r.run_id,
            "card": r.card,
            "name": r.measurement_name,
            "started": _iso(r.started),
            "stopped": _iso(r.stopped),
            "seconds": None if r.stopped is None else round(r.stopped - r.started, 3),
            "state": r.state,
            "fault": r.fault,
            "samples": r.samples,
            "files": len(r.files),
            "bytes": r.bytes_written,
            "counter_errors": r.counter_errors,
            "overruns": r.overruns,
            "upload": (upload or "pending") if r.upload else "",
        }

    def show(self, run_id: str) -> dict[str, Any]:
        r = self._record(run_id)
        files = [{"name": f.name, "href": self._href(f.path), "size": f.size} for f in r.files]
        return {**self._summary(r, ""), "log": r.log, "header": r.header, "file_links": files}

    def _href(self, path: str) -> str | None:
        """The file's URL under /data/, or None if it lies outside the data directory."""
        try:
            rel = Path(os.path.realpath(path)).relative_to(os.path.realpath(self.data_dir))
        except ValueError:
            return None
        return "/data/" + "/".join(rel.parts)

    def plot(self, run_id: str, args: dict[str, str]) -> dict[str, Any]:
        r = self._record(run_id)
        data = RunData.open([f.path for f in r.files])
        known = data.channels
        channels = _channels(args.get("channels", ""), known)
        end = _int(args, "end", data.rows) if args.get("end") else None
        return data.decimate(channels, _int(args, "start", 0), end, _int(args, "width", 1000))

    def export(self, run_id: str, fmt: str) -> tuple[str, str]:
        if fmt not in ("csv", "npy"):
            raise RunsError(f"format {fmt!r}: choose csv or npy")
        r = self._record(run_id)
        if r.bytes_written > EXPORT_MAX_BYTES:  # the export reads the whole run into memory
            raise RunsError(
                f"run {run_id} has {r.bytes_written / 1e9:.1f} GB, more than the page exports"
                f" ({EXPORT_MAX_BYTES / 1e9:.1f} GB); use `dtacq-ioc runs export {run_id}`"
            )
        with tempfile.TemporaryDirectory(prefix="dtacq-export-") as tmp:
            written = export_run(r, Path(tmp) / "out", fmt)
            fd, zpath = tempfile.mkstemp(prefix="dtacq-export-", suffix=".zip")
            os.close(fd)
            with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z:
                for p in written:
                    z.write(p, p.name)
        return zpath, f"{r.run_id}-{fmt}.zip"

    # -- back on the event loop --

    def _done(self, request: Any, kind: str, result: Any) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            if kind == "file":
                os.unlink(result[0])  # the client went away while the export was made
            return
        if kind == "json":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(result, separators=(",", ":")).encode())
            request.finish()
            return
        self._send_file(request, *result)

    def _send_file(self, request: Any, path: str, name: str) -> None:
        from twisted.protocols.basic import FileSender

        f = open(path, "rb")  # noqa: SIM115 - closed when the transfer ends
        os.unlink(path)  # the open handle keeps it readable; nothing is left behind
        request.setHeader(b"content-type", b"application/zip")
        request.setHeader(b"content-disposition", f'attachment; filename="{name}"'.encode())
        request.setHeader(b"content-length", str(os.fstat(f.fileno()).st_size).encode())

        def finish(_: Any) -> None:
            f.close()
            if not request.finished:
                request.finish()

        FileSender().beginFileTransfer(f, request).addBoth(finish)

    def _failed(self, request: Any, failure: Any) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        exc = failure.value
        if not isinstance(exc, RunsError):
            log.error("runs view: %s", failure.getTraceback())
            exc = RunsError("internal error (logged by the bridge)")
        request.write(self._fail(request, exc))
        request.finish()

    def _fail(self, request: Any, exc: RunsError) -> bytes:
        """The error's status and headers set; its one-line JSON body returned."""
        request.setResponseCode(404 if isinstance(exc, NotFound) else 400)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": str(exc)}).encode()


def _int(args: dict[str, str], key: str, default: int) -> int:
    text = args.get(key, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise RunsError(f"{key}: {text[:40]!r} is not a whole number") from None


def _day(args: dict[str, str], key: str) -> float | None:
    text = args.get(key, "")
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise RunsError(f"{key}: {text[:40]!r} is not a date YYYY-MM-DD") from None


def _channels(text: str, known: list[int]) -> list[int]:
    if not text.strip():
        return known
    out = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) not in known:
            raise RunsError(f"channels: {part.strip()[:20]!r} is not a channel of this run {known}")
        out.append(int(part))
    return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
