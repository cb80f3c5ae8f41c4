"""The runs view's HTTP endpoints: the catalog read-only, a run's header, its data decimated.

    GET /runs/?name=&since=&until=&limit=     runs, newest first (since/until: YYYY-MM-DD, UTC)
    GET /runs/RUN_ID                          the run's record, header and file links
    GET /runs/RUN_ID/plot?channels=&start=&end=&width=
                                              min/max per pixel column of samples [start, end)
    GET /runs/RUN_ID/export?format=csv|npy    a zip of what `dtacq-ioc runs export` writes

The catalog is opened read-only for each request, so the bridge alone (no IOC) serves
it, and a catalog made after the bridge started is found. Samples are read through
memory maps of the .dig files, never whole: a column of a long run is summarised by
evenly spaced blocks of samples (`exact` false in the answer) until the range is short
enough to read all of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dtacq_ioc.archive.cli import RunsError, export_run
from dtacq_ioc.archive.dig import DigError, read_dig
from dtacq_ioc.archive.records import RunRecord
from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog

log = logging.getLogger(__name__)

# Rows read per plot request at most: 16 channels of int16 make 64 MiB of file pages.
ROW_BUDGET = 2_000_000
MAX_WIDTH = 4000
MAX_LIMIT = 1000


class NotFound(RunsError):
    """A run or file the catalog does not have (HTTP 404)."""


@dataclass
class RunData:
    """A run's samples over all its files, as memory maps (nothing read until asked)."""

    header: dict[str, Any]
    starts: np.ndarray  # first row of each file, and the total at the end
    columns: list[dict[int, np.ndarray]]  # per file: channel -> its column

    @classmethod
    def open(cls, paths: list[str]) -> RunData:
        if not paths:
            raise RunsError("the run has no files")
        header: dict[str, Any] | None = None
        columns = []
        for path in paths:
            try:
                h, data = read_dig(path)
            except (DigError, OSError) as exc:
                raise RunsError(str(exc)) from None
            header = header or h
            columns.append(data)
        assert header is not None
        sizes = [len(next(iter(c.values()))) if c else 0 for c in columns]
        return cls(header, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), columns)

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

    def _slice(self, channel: int, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of one channel, read from the files they lie in."""
        parts = []
        for i, data in enumerate(self.columns):
            lo, hi = max(start, self.starts[i]), min(end, self.starts[i + 1])
            if lo < hi:
                parts.append(data[channel][lo - self.starts[i] : hi - self.starts[i]])
        return np.concatenate(parts) if parts else np.empty(0)

    def _gather(self, channel: int, rows: np.ndarray) -> np.ndarray:
        """The rows (sorted) of one channel, from whichever files hold them."""
        out = np.empty(rows.shape, dtype=self.columns[0][channel].dtype)
        flat, dest = rows.ravel(), out.reshape(-1)
        part = np.searchsorted(self.starts, flat, side="right") - 1
        for i, data in enumerate(self.columns):
            mask = part == i
            if mask.any():
                dest[mask] = data[channel][flat[mask] - self.starts[i]]
        return out

    def decimate(
        self,
        channels: list[int],
        start: int = 0,
        end: int | None = None,
        width: int = 1000,
        budget: int = ROW_BUDGET,
    ) -> dict[str, Any]:
        """Min and max of each channel over `width` equal columns of rows [start, end)."""
        end = self.rows if end is None else min(end, self.rows)
        start = max(0, min(start, end))
        n = end - start
        width = max(1, min(width, n, MAX_WIDTH)) if n else 0
        edges = start + (np.arange(width + 1, dtype=np.int64) * n) // max(width, 1)
        exact = n <= budget
        block = n // max(width, 1) if exact else max(1, budget // max(width, 1))
        shift = 0 if self.header.get("is_float") else int(self.header.get("bit_shift") or 0)
        lows: dict[str, list[Any]] = {}
        highs: dict[str, list[Any]] = {}
        for ch in channels:
            if width == 0:
                lo = hi = np.empty(0)
            elif exact:
                x = self._slice(ch, start, end)
                lo = np.minimum.reduceat(x, edges[:-1] - start)
                hi = np.maximum.reduceat(x, edges[:-1] - start)
            else:
                # Evenly spaced blocks of each column: `block` rows from its start,
                # `block` from its middle when there is room for two.
                half = block // 2 or 1
                mid = (edges[:-1] + edges[1:]) // 2
                rows = np.concatenate(
                    [edges[:-1, None] + np.arange(half), mid[:, None] + np.arange(half)], axis=1
                )
                x = self._gather(ch, np.minimum(rows, end - 1))
                lo, hi = x.min(axis=1), x.max(axis=1)
            if shift:
                lo, hi = lo >> shift, hi >> shift
            lows[str(ch)], highs[str(ch)] = lo.tolist(), hi.tolist()
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
            "min": lows,
            "max": highs,
            "units": "ADC mean" if self.header.get("is_float") else "ADC",
        }


class RunsResource(Resource):
    """`/runs/...`: everything is computed on a thread, never on the event loop."""

    isLeaf = True

    def __init__(self, data_dir: Path):
        super().__init__()
        self.data_dir = Path(data_dir)

    def render_GET(self, request: Any) -> Any:
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
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
        # calls (asyncio runs the loop): asyncio's threads do the work.
        d = Deferred.fromFuture(asyncio.ensure_future(asyncio.to_thread(job)))
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
        if request.finished:
            return
        exc = failure.value
        if not isinstance(exc, RunsError):
            log.error("runs view: %s", failure.getTraceback())
            exc = RunsError("internal error (logged by the bridge)")
        self._fail(request, exc)
        request.finish()

    def _fail(self, request: Any, exc: RunsError) -> bytes:
        request.setResponseCode(404 if isinstance(exc, NotFound) else 400)
        request.setHeader(b"content-type", b"application/json")
        body = json.dumps({"error": str(exc)}).encode()
        if request.startedWriting:
            return b""
        request.write(body)
        return b""


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
