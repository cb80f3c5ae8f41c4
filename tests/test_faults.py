"""Faults the IOC survives without a restart, each through real processes.

A card that drops off the network, a data directory the IOC cannot write, a
CouchDB that is down, the IOC itself killed with SIGKILL mid-run, a counter jump
and a full disk; after each, readbacks, catalog and files agree on the samples.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import epics
import pytest
from conftest import COUCH_DB, COUCH_WRITER, PouchServer
from ioc_support import caget, castr, ioc_process, ioc_toml, new_prefix, wait_for
from test_ioc import assert_put_refused, put, sim_knob

from dtacq_ioc.archive.dig import read_run
from dtacq_ioc.archive.records import sha256_of
from dtacq_ioc.archive.sqlite import SqliteCatalog


def couch_archive(server: PouchServer) -> str:
    user, password = COUCH_WRITER
    return f"""backend = "couchdb"
retry_max_s = 1.0

[archive.couchdb]
url = "{server.url}"
db = "{COUCH_DB}"
user = "{user}"
password = "{password}"
auth = "cookie"
timeout_s = 5.0
"""


def start_run(ioc, name: str, upload: bool = False) -> None:
    assert put(ioc.pv("CLKDIV"), 1000) == 1  # 100 kHz: quick and many buffers
    assert put(ioc.pv("RUN:NAME"), name) == 1
    assert put(ioc.pv("RUN:UPLOAD"), "Yes" if upload else "No") == 1
    assert put(ioc.pv("RUN:START"), 1) == 1
    wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) > 50_000, "a run under way")


def last_result(ioc) -> dict:
    return json.loads(wait_for(lambda: castr(ioc.pv("RUN:LAST_RESULT")), "a finished run"))


def runs_cli(config: Path, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "runs", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def shown(config: Path, run_id: str) -> dict[str, str]:
    """`dtacq-ioc runs show RUN_ID`'s summary lines, by name."""
    out = runs_cli(config, "show", run_id)
    return dict(re.findall(r"^(samples|state)\s+(.+?)\s*$", out, re.MULTILINE))


def recorded(data_dir: Path) -> list:
    """The catalog's rows, read as `dtacq-ioc runs` reads them while the IOC runs."""
    catalog = SqliteCatalog(data_dir / "runs.sqlite")
    try:
        return catalog.list_runs()
    finally:
        catalog.close()


def file_samples(files: list) -> int:
    _, chans = read_run(files)
    return len(chans[0])


def documents(server: PouchServer) -> list[dict]:
    with server.admin() as client:
        rows = client.view("measurements", "measurements", reduce=False)["rows"]
        return [client.get_document(r["id"]) for r in rows]


@pytest.mark.parametrize(
    ("knob", "seconds"),
    [("SIM:REBOOT", 4), ("SIM:HANG", 8)],
    ids=["card-reboot", "network-loss"],  # ports refused; connections open but silent
)
def test_card_lost_mid_run_closes_the_run_alarms_and_recovers(tmp_path, loopback, knob, seconds):
    prefix = new_prefix()
    with ioc_process(ioc_toml(tmp_path, loopback, prefix), prefix, loopback) as ioc:
        start_run(ioc, "card lost")
        rbv = epics.PV(ioc.pv("SAMPLE_RATE_RBV"), form="ctrl")
        assert rbv.wait_for_connection(5)
        sim_knob(ioc.host, knob, seconds)
        wait_for(lambda: caget(ioc.pv("CONNECTED"), as_string=True) == "No", "link down")
        wait_for(lambda: rbv.get_ctrlvars() and rbv.severity == 3, "readbacks INVALID")
        result = last_result(ioc)
        assert result["fault"] and result["samples"] > 50_000, result
        _, chans = read_run([ioc.data_dir / f for f in result["files"]])
        assert len(chans[0]) == result["samples"]
        wait_for(lambda: caget(ioc.pv("STATE"), as_string=True) == "IDLE", "reconnected", 60)
        wait_for(lambda: rbv.get_ctrlvars() and rbv.severity == 0, "alarm cleared")
        rbv.disconnect()


def test_unwritable_data_directory_fails_the_run_cleanly_and_the_ioc_serves_on(tmp_path, loopback):
    prefix = new_prefix()
    with ioc_process(ioc_toml(tmp_path, loopback, prefix), prefix, loopback) as ioc:
        blocker = ioc.data_dir / "C1"  # where the card's run directories go
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file where a directory must be")
        assert put(ioc.pv("CLKDIV"), 1000) == 1
        put(ioc.pv("RUN:START"), 1)
        wait_for(lambda: "C1" in castr(ioc.pv("LAST_ERROR")), "the failure reported")
        assert caget(ioc.pv("RUN:STATE_RBV"), as_string=True) in ("IDLE", "FAULT")
        assert caget(ioc.pv("STATE"), as_string=True) == "IDLE"  # still serving, still streaming
        samples = caget(ioc.pv("STREAM:SAMPLES"))
        wait_for(lambda: caget(ioc.pv("STREAM:SAMPLES")) > samples, "the stream goes on")
        blocker.unlink()
        start_run(ioc, "after the fix")
        assert put(ioc.pv("RUN:STOP"), 1) == 1
        result = last_result(ioc)
        assert result["state"] == "IDLE" and not result["fault"], result


def test_catalog_down_during_a_run_is_delivered_when_it_returns(tmp_path, loopback):
    server = PouchServer(tmp_path / "pouch")
    (tmp_path / "pouch").mkdir()
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, archive_extra=couch_archive(server))
    try:
        with ioc_process(config, prefix, loopback) as ioc:
            start_run(ioc, "catalog down", upload=True)
            assert put(ioc.pv("RUN:STOP"), 1) == 1
            result = last_result(ioc)
            spool = ioc.data_dir / "spool"
            wait_for(lambda: list(spool.glob("*.json")), "the run waiting in the spool")
            server.start()  # the database comes back
            # The spool lets an entry go only once the document and every file are in.
            wait_for(lambda: not list(spool.glob("*.json")), "the run delivered", 60)
            docs = documents(server)
        assert [d["measurement_name"] for d in docs] == ["catalog down"]
        doc = docs[0]
        assert doc["dtacq_run"]["run_id"] == result["run_id"]
        names = [Path(f).name for f in result["files"]]
        assert sorted(doc["_attachments"]) == sorted(names)
        assert not list(spool.glob("*.json"))
    finally:
        server.stop()


def test_sigkill_mid_run_leaves_a_readable_interrupted_run_that_is_delivered(
    pouchdb, tmp_path, loopback
):
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, archive_extra=couch_archive(pouchdb))
    with ioc_process(config, prefix, loopback) as ioc:
        start_run(ioc, "killed", upload=True)
        run_id = castr(ioc.pv("RUN:ID_RBV"))
        wait_for(lambda: caget(ioc.pv("RUN:BYTES_RBV")) > 1_000_000, "data on disk")
        ioc.proc.send_signal(signal.SIGKILL)
        ioc.proc.wait(10)
    # The simulator died with its IOC (no port left bound): the next start plays it again.
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, archive_extra=couch_archive(pouchdb))
    with ioc_process(config, prefix, loopback) as ioc:
        spool = ioc.data_dir / "spool"
        wait_for(lambda: documents(pouchdb), "the interrupted run spooled and sent", 60)
        wait_for(lambda: not list(spool.glob("*.json")), "its delivery complete", 60)
        docs = documents(pouchdb)
    catalog = SqliteCatalog(tmp_path / "data" / "runs.sqlite")
    try:
        record = catalog.get_run(run_id)
    finally:
        catalog.close()
    assert record.state == "interrupted"
    header, chans = read_run([f.path for f in record.files])
    assert header["measurement_name"] == "killed"
    samples = len(chans[0])
    assert samples > 50_000 and all(len(c) == samples for c in chans.values())
    # Counted from the files, in the catalog, in `runs show` and in the document.
    assert record.samples == samples and shown(config, run_id)["samples"] == str(samples)
    (doc,) = docs
    assert doc["measurement_name"] == "killed" and doc["dtacq_run"]["state"] == "interrupted"
    assert doc["dtacq_run"]["samples"] == samples
    sizes = {f.name: f.size for f in record.files}
    assert {k: v["length"] for k, v in doc["_attachments"].items()} == sizes


def test_after_a_counter_jump_readbacks_catalog_and_files_agree(tmp_path, loopback):
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix)
    with ioc_process(config, prefix, loopback) as ioc:
        start_run(ioc, "dropped")  # on_counter_error = "stop": the jump ends the run
        sim_knob(ioc.host, "SIM:DROP", "30000,7")
        result = last_result(ioc)
        assert result["state"] == "FAULT" and "counter jump" in result["fault"], result
        samples = file_samples([ioc.data_dir / f for f in result["files"]])
        assert result["samples"] == samples > 50_000
        wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) == samples, "the readback on the files")
        assert shown(config, result["run_id"])["samples"] == str(samples)


@contextlib.contextmanager
def small_disk(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB at `path`: a disk that fills in seconds; always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, and mounting one needs root")
    path.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "dtacq-test-full", str(path)],
        check=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


def test_a_full_disk_closes_the_run_with_its_reason_and_refuses_the_next(tmp_path, loopback):
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix)
    with small_disk(tmp_path / "data", 16) as data, ioc_process(config, prefix, loopback) as ioc:
        start_run(ioc, "fills the disk")
        result = last_result(ioc)  # ends by itself: the disk is full
        assert result["state"] == "FAULT" and "No space left" in result["fault"], result
        samples = file_samples([data / f for f in result["files"]])
        assert result["samples"] == samples > 50_000
        wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) == samples, "the readback on the files")
        row = shown(config, result["run_id"])
        assert row["samples"] == str(samples) and row["state"].startswith("fault: ")
        (record,) = recorded(data)
        assert "No space left" in record.fault
        # Each file is what the catalog says: a write cut short by the disk was cut back.
        for f in record.files:
            assert (f.size, f.sha256) == (Path(f.path).stat().st_size, sha256_of(f.path))
        assert all(p.stat().st_size > 0 for p in data.rglob("*.dig"))
        # The disk is still full: the next run is refused, in words, and leaves nothing.
        assert [p.name for p in (data / "C1").iterdir()] == [result["run_id"]]
        assert_put_refused(ioc.pv("RUN:START"), 1)
        wait_for(lambda: "no room for a run" in castr(ioc.pv("LAST_ERROR")), "the reason shown")
        assert [p.name for p in (data / "C1").iterdir()] == [result["run_id"]]
        assert [r.run_id for r in recorded(data)] == [result["run_id"]]
        assert caget(ioc.pv("STATE"), as_string=True) == "IDLE"
