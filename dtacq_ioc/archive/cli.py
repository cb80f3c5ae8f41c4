"""``dtacq-ioc runs list | show | export | upload``: the archive from a shell.

Reads the local SQLite catalog directly (works while the IOC runs, and without it);
``upload`` delivers the spool now, in this process, with progress bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console, JustifyMethod
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.archive.spool import Spool, SpoolEntry
from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog
from dtacq_ioc.config import Config

log = logging.getLogger(__name__)


class RunsError(Exception):
    """A one-line reason for the operator."""


def runs_command(config: Config, args: argparse.Namespace) -> int:
    # Not a terminal (a pipe, a test): wide enough that run ids are never folded.
    out = Console(width=None if sys.stdout.isatty() else 160)
    path = config.archive.data_dir / CATALOG_FILE
    try:
        catalog = SqliteCatalog(path)
    except (sqlite3.Error, OSError) as exc:
        sys.stderr.write(f"runs {args.action}: catalog {path} unreadable: {exc}\n")
        return 1
    try:
        if args.action == "list":
            return _list(out, catalog, args.limit)
        if args.action == "show":
            return _show(out, catalog, _run(catalog, args))
        if args.action == "export":
            return _export(out, _run(catalog, args), args.output, args.format)
        if args.action == "upload":
            return _upload(out, config, catalog)
        raise RunsError(f"unknown action {args.action!r}")
    except RunsError as exc:
        sys.stderr.write(f"runs {args.action}: {exc}\n")
        return 1
    except sqlite3.Error as exc:
        sys.stderr.write(f"runs {args.action}: catalog {path}: {exc}\n")
        return 1
    finally:
        catalog.close()


def _run(catalog: SqliteCatalog, args: argparse.Namespace) -> RunRecord:
    if not args.run:
        raise RunsError("a run id is needed (see `dtacq-ioc runs list`)")
    record = catalog.get_run(args.run)
    if record is None:
        raise RunsError(f"unknown run id {args.run!r}")
    return record


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def _upload_text(catalog: SqliteCatalog, record: RunRecord) -> str:
    if not record.upload:
        return "-"
    state = catalog.upload_state(record.run_id)
    return state.state or "pending"


def _list(out: Console, catalog: SqliteCatalog, limit: int) -> int:
    runs = catalog.list_runs(limit=limit)
    table = Table(title=f"runs in {catalog.path}" if runs else "no runs yet")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("run", "left"),
        ("card", "left"),
        ("started (UTC)", "left"),
        ("seconds", "right"),
        ("state", "left"),
        ("samples", "right"),
        ("files", "right"),
        ("size", "right"),
        ("counter err", "right"),
        ("overruns", "right"),
        ("upload", "left"),
        ("measurement", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name == "run")
    for r in runs:
        seconds = "" if r.stopped is None else f"{r.stopped - r.started:.1f}"
        table.add_row(
            r.run_id,
            r.card,
            _when(r.started),
            seconds,
            r.state,
            str(r.samples),
            str(len(r.files)),
            _size(r.bytes_written),
            str(r.counter_errors),
            str(r.overruns),
            _upload_text(catalog, r),
            r.measurement_name,
        )
    out.print(table)
    return 0


def _show(out: Console, catalog: SqliteCatalog, r: RunRecord) -> int:
    upload = catalog.upload_state(r.run_id)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for name, value in (
        ("run", r.run_id),
        ("card", f"{r.card} ({r.host})"),
        ("measurement", r.measurement_name),
        ("log", r.log),
        ("state", r.state + (f": {r.fault}" if r.fault else "")),
        ("started", _when(r.started)),
        ("stopped", _when(r.stopped)),
        ("samples", str(r.samples)),
        ("bytes written", str(r.bytes_written)),
        ("counter errors", str(r.counter_errors)),
        ("overruns", str(r.overruns)),
        ("upload", _upload_text(catalog, r) + (f": {upload.error}" if upload.error else "")),
        ("document", r.doc_id),
    ):
        summary.add_row(name, value)
    out.print(summary)
    # One block per file: digests and paths are too long for a table's columns.
    out.print(f"files ({len(r.files)}):")
    for f in r.files:
        out.print(f"  {f.name}  {f.size} bytes  sha256 {f.sha256}", soft_wrap=True)
        out.print(f"    {f.path}", soft_wrap=True, highlight=False)
    out.print("header:")
    out.print_json(json.dumps(r.header, sort_keys=True))
    return 0


def _export(out: Console, r: RunRecord, directory: Path, fmt: str) -> int:
    for path in export_run(r, directory, fmt):
        out.print(str(path), soft_wrap=True)
    return 0


def export_run(r: RunRecord, directory: Path, fmt: str) -> list[Path]:
    """Write a run's samples (`csv`, or `npy` per channel) and its JSON; the files written.

    RunsError says, in one line, why a run cannot be exported.
    """
    from dtacq_ioc.archive.dig import DigError, read_run

    if not r.files:
        raise RunsError(f"run {r.run_id} has no files")
    missing = [f.path for f in r.files if not Path(f.path).is_file()]
    if missing:
        raise RunsError(f"run {r.run_id}: file {missing[0]} is missing")
    try:
        header, channels = read_run([f.path for f in r.files])
    except (DigError, OSError, ValueError) as exc:
        raise RunsError(str(exc)) from None
    shift = 0 if header.get("is_float") else int(header.get("bit_shift", 0))
    # Readers apply the bit shift: the export holds ADC codes (or the float means).
    data = {ch: (a >> shift if shift else np.asarray(a)) for ch, a in channels.items()}
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if fmt == "npy":
        for ch, arr in data.items():
            path = directory / f"{r.run_id}-ch{ch:02d}.npy"
            np.save(path, arr)
            written.append(path)
    else:
        path = directory / f"{r.run_id}.csv"
        _write_csv(path, data, bool(header.get("is_float")))
        written.append(path)
    meta = directory / f"{r.run_id}.json"
    meta.write_text(
        json.dumps({"header": header, "bit_shift_applied": shift, "record": r.to_dict()}, indent=1)
    )
    written.append(meta)
    return written


def _write_csv(path: Path, data: dict[int, np.ndarray], is_float: bool) -> None:
    names = [f"ch{ch:02d}" for ch in data]
    matrix = np.column_stack(list(data.values())) if data else np.empty((0, 0))
    fmt = "%.17g" if is_float else "%d"
    np.savetxt(path, matrix, delimiter=",", header=",".join(names), comments="", fmt=fmt)


def _upload(out: Console, config: Config, catalog: SqliteCatalog) -> int:
    def record_result(entry: SpoolEntry, error: str | None) -> None:
        if error is None:
            catalog.set_upload_state(entry.run_id, "delivered", entry.doc_id)
        else:
            catalog.set_upload_state(entry.run_id, "spooled", entry.doc_id, error)

    spool = Spool(config.archive.spool, config.archive.couchdb, on_result=record_result)
    pending = spool.pending()
    if not pending:
        out.print("nothing to upload")
        return 0
    tasks: dict[tuple[str, str], TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=out,
    ) as progress:

        def on_progress(entry: SpoolEntry, f: RunFile, sent: int, total: int) -> None:
            key = (entry.run_id, f.name)
            if key not in tasks:
                tasks[key] = progress.add_task(f"{entry.run_id} {f.name}", total=total)
            progress.update(tasks[key], completed=sent)

        results = spool.deliver_all(progress=on_progress)
    failed = [r for r in results if not r.ok]
    for result in results:
        if result.ok:
            out.print(f"delivered {result.run_id} as document {result.doc_id}", soft_wrap=True)
        else:
            sys.stderr.write(f"runs upload: {result.run_id}: {result.error}\n")
    return 1 if failed else 0
