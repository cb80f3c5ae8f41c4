"""The SQLite catalog: round trips, listing, concurrent writers, recovery after a kill."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from test_faults import small_disk

from dtacq_ioc.archive.catalog import CouchCatalog, open_catalog
from dtacq_ioc.archive.dig import DigWriter, dig_name, read_run
from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.archive.records import RunFile, RunRecord, sha256_of
from dtacq_ioc.archive.sqlite import CATALOG_FILE, RESERVE_BYTES, SqliteCatalog
from dtacq_ioc.config import ArchiveConfig

HEADER = {
    "channels": 32,
    "channel_list": [0, 1, 2, 3],
    "byte_depth": 4,
    "bit_shift": 8,
    "is_float": False,
    "ip": "127.0.0.2",
    "downsample": 1,
    "freq_hz": 20000.0,
    "date": "2026-11-25 16:27:39.000001",
    "measurement_name": "noise check",
    "log": "shielded",
    "current_gains": {"1": {"1": 0, "2": 1}},
    "gain_conversion": {"0": "x1", "1": "x2"},
    "logitems": {"temperature_K": 4.2},
}


def make_file(directory: Path, name: str, data: bytes) -> RunFile:
    path = directory / name
    path.write_bytes(data)
    return RunFile.from_path(path)


def finished_record(tmp_path: Path, run_id: str = "run-1", started: float = 1000.0) -> RunRecord:
    files = [make_file(tmp_path, f"{run_id}-{i}.dig", bytes([i]) * (100 + i)) for i in range(2)]
    return RunRecord(
        run_id=run_id,
        card="DIG1",
        host="127.0.0.2",
        measurement_name="noise check",
        log="shielded",
        header=dict(HEADER),
        files=files,
        started=started,
        stopped=started + 12.5,
        samples=4096,
        bytes_written=sum(f.size for f in files),
        state="complete",
        counter_errors=1,
        overruns=2,
        fault="",
        upload=True,
        doc_id="",
    )


def test_record_json_round_trip(tmp_path):
    record = finished_record(tmp_path)
    assert RunRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="state 'done'"):
        RunRecord(run_id="x", state="done")


def test_round_trip_and_columns(tmp_path):
    catalog = open_catalog(ArchiveConfig(data_dir=tmp_path))
    assert isinstance(catalog, Catalog) and not isinstance(catalog, CouchCatalog)
    record = finished_record(tmp_path)
    started = RunRecord(run_id=record.run_id, card="DIG1", started=record.started)
    catalog.run_started(started)
    assert catalog.get_run("run-1").state == "running"
    catalog.run_finished(record)
    assert catalog.get_run("run-1") == record
    assert catalog.get_run("nope") is None
    catalog.close()

    # The common header fields are columns a plain SQL client can use.
    with sqlite3.connect(tmp_path / CATALOG_FILE) as db:
        row = db.execute(
            "SELECT freq_hz, byte_depth, bit_shift, downsample, nchannels, date, samples"
            " FROM runs WHERE run_id = 'run-1'"
        ).fetchone()
        files = db.execute("SELECT name, size, sha256 FROM files ORDER BY idx").fetchall()
    assert row == (20000.0, 4, 8, 1, 4, "2026-11-25 16:27:39.000001", 4096)
    assert files == [(f.name, f.size, f.sha256) for f in record.files]


def test_list_order_limit_and_card(tmp_path):
    catalog = SqliteCatalog(tmp_path / CATALOG_FILE)
    for i in range(5):
        r = finished_record(tmp_path, f"run-{i}", started=1000.0 + i)
        r.card = "DIG1" if i % 2 else "DIG2"
        catalog.run_finished(r)
    assert [r.run_id for r in catalog.list_runs()] == [f"run-{i}" for i in (4, 3, 2, 1, 0)]
    assert [r.run_id for r in catalog.list_runs(limit=2)] == ["run-4", "run-3"]
    assert [r.run_id for r in catalog.list_runs(card="DIG1")] == ["run-3", "run-1"]
    catalog.close()


def test_concurrent_writers(tmp_path):
    catalog = SqliteCatalog(tmp_path / CATALOG_FILE)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(20):
                r = RunRecord(run_id=f"t{n}-{i}", card=f"C{n}", started=float(i))
                catalog.run_started(r)
                r.state, r.samples = "complete", i
                catalog.run_finished(r)
                assert catalog.get_run(r.run_id).samples == i
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(catalog.list_runs(limit=1000)) == 80
    catalog.close()


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from dtacq_ioc.archive.records import RunFile, RunRecord
    from dtacq_ioc.archive.sqlite import SqliteCatalog

    directory = Path(sys.argv[1])
    catalog = SqliteCatalog(directory / "runs.sqlite")
    first = directory / "r-0.dig"
    first.write_bytes(b"a" * 1000)
    (directory / "r-1.dig").write_bytes(b"b" * 10)
    files = [RunFile.from_path(first), RunFile.from_path(directory / "r-1.dig")]
    catalog.run_started(RunRecord(run_id="r", card="DIG1", started=5.0, files=files[:1]))
    catalog.run_updated(RunRecord(run_id="r", card="DIG1", started=5.0, files=files))
    catalog.run_started(RunRecord(run_id="gone", card="DIG1", started=6.0,
        files=[RunFile("g-0.dig", str(directory / "g-0.dig"), 0, "")]))
    # The run keeps writing after its last report, then the process is killed.
    with open(directory / "r-1.dig", "ab") as f:
        f.write(b"b" * 4086)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_recover_interrupted_after_kill(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    catalog = SqliteCatalog(tmp_path / CATALOG_FILE)
    assert {r.state for r in catalog.list_runs()} == {"running"}
    recovered = {r.run_id: r for r in catalog.recover_interrupted()}
    assert set(recovered) == {"r", "gone"}
    r = catalog.get_run("r")
    assert r == recovered["r"]
    assert r.state == "interrupted" and r.stopped is not None
    assert [(f.name, f.size) for f in r.files] == [("r-0.dig", 1000), ("r-1.dig", 4096)]
    assert r.files[1].sha256 == sha256_of(tmp_path / "r-1.dig")
    assert r.bytes_written == 5096
    gone = catalog.get_run("gone")
    assert gone.state == "interrupted" and gone.files == []
    assert "missing files: g-0.dig" in gone.fault
    assert catalog.recover_interrupted() == []  # nothing left running
    catalog.close()


def test_a_recovered_run_counts_its_samples_from_its_files(tmp_path):
    """Killed mid-run: samples from the files as reading them gives; empty files go."""
    catalog = SqliteCatalog(tmp_path / CATALOG_FILE)
    directory = tmp_path / "DIG1" / "r"
    directory.mkdir(parents=True)
    rows = np.arange(123 * 4, dtype="<i4").reshape(123, 4)
    with DigWriter(directory / dig_name("d", 0), HEADER) as dig:
        dig.write(rows)
    with open(directory / dig_name("d", 0), "ab") as f:
        f.write(b"\0" * 7)  # a sample cut short by the kill
    with DigWriter(directory / dig_name("d", 1), {**HEADER, "file_index": 1}) as dig:
        dig.write(rows[:20])
    (directory / dig_name("d", 2)).touch()  # opened, killed before its header
    catalog.run_started(RunRecord(run_id="r", card="DIG1", started=5.0, header=HEADER))
    (recovered,) = catalog.recover_interrupted()
    _, chans = read_run(directory)
    assert recovered.samples == catalog.get_run("r").samples == len(chans[0]) == 143
    assert [f.name for f in recovered.files] == [dig_name("d", 0), dig_name("d", 1)]
    assert not (directory / dig_name("d", 2)).exists()
    catalog.close()


def test_the_catalog_keeps_room_beside_it(tmp_path):
    catalog = SqliteCatalog(tmp_path / CATALOG_FILE)
    assert catalog.reserve.stat().st_size == RESERVE_BYTES
    catalog.reserve.unlink()  # given up for a full disk: made again once there is room
    catalog.run_started(RunRecord(run_id="r", card="DIG1", started=5.0))
    assert catalog.reserve.stat().st_blocks * 512 >= RESERVE_BYTES  # allocated, not sparse
    catalog.close()


def test_on_a_full_disk_the_reserve_still_closes_the_row(tmp_path):
    with small_disk(tmp_path / "disk", 4) as disk:
        catalog = SqliteCatalog(disk / CATALOG_FILE)
        record = RunRecord(run_id="r", card="DIG1", started=5.0, header=HEADER)
        catalog.run_started(record)
        # The run that fills the disk.
        with open(disk / "run.dig", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        record.state, record.fault = "fault", "writing run.dig: No space left on device"
        record.log = "x" * 200_000  # a row of many pages: it cannot fit in what is left
        catalog.run_finished(record)
        assert catalog.get_run("r").fault == record.fault and not catalog.reserve.exists()
        catalog.close()


def test_a_recovered_downsampled_run_counts_the_samples_its_means_stand_for(tmp_path):
    catalog = SqliteCatalog(tmp_path / CATALOG_FILE)
    directory = tmp_path / "DIG1" / "ds"
    directory.mkdir(parents=True)
    header = {**HEADER, "is_float": True, "byte_depth": 8, "bit_shift": 0, "downsample": 4}
    with DigWriter(directory / dig_name("d", 0), header) as dig:
        dig.write(np.zeros((10, 4), dtype="<f8"))
    catalog.run_started(RunRecord(run_id="ds", card="DIG1", started=5.0, header=header))
    (recovered,) = catalog.recover_interrupted()
    assert recovered.samples == 40  # 10 means of 4, as a run that ended well records them
    catalog.close()
