"""`dtacq-ioc runs list | show | export | upload` through the real CLI process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import COUCH_DB, COUCH_WRITER
from support import ROOT, child_env, free_port, sim_card_toml, write_config

from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.archive.couchdb import CouchClient
from dtacq_ioc.archive.dig import DigWriter, dig_name
from dtacq_ioc.archive.records import RunRecord
from dtacq_ioc.config import load_config

RUN_ID = "20261125T162739-0badc0de"
CHANNELS = [0, 1, 2]


def runs(config, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "runs", *args, "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def archive(tmp_path):
    """A config whose catalog holds one finished run (two .dig files), spooled for upload."""
    user, password = COUCH_WRITER
    config_path = write_config(
        tmp_path,
        sim_card_toml("DIG1", "127.0.0.1"),
        extra=f"""backend = "couchdb"
[archive.couchdb]
url = {{ env = "TEST_DB_URL" }}
db = "{COUCH_DB}"
user = "{user}"
password = "{password}"
timeout_s = 5.0
""",
    )
    config = load_config(config_path)
    run_dir = config.archive.data_dir / "DIG1" / RUN_ID
    run_dir.mkdir(parents=True)
    header = {
        "channel_list": CHANNELS,
        "channels": 32,
        "byte_depth": 4,
        "bit_shift": 8,
        "is_float": False,
        "freq_hz": 20000.0,
        "measurement_name": "cli check",
        "log": "exported",
    }
    rng = np.random.default_rng(7)
    data = (rng.integers(-(2**23), 2**23, size=(3000, 3)) << 8).astype("<i4")
    files = []
    for i, part in enumerate((data[:2000], data[2000:])):
        with DigWriter(run_dir / dig_name("2026-11-25 16-27-39.000000", i), header) as w:
            w.write(part)
        files.append(w.close())
    record = RunRecord(
        run_id=RUN_ID,
        card="DIG1",
        host="127.0.0.2",
        measurement_name="cli check",
        log="exported",
        header=header,
        files=files,
        started=1_795_000_000.0,
        stopped=1_795_000_002.5,
        samples=3000,
        bytes_written=sum(f.size for f in files),
        state="complete",
        counter_errors=0,
        upload=True,
    )
    catalog = open_catalog(config.archive, start_delivery=False)
    catalog.run_finished(record)
    catalog.close()
    return config_path, record, data >> 8


def test_list_and_show(archive):
    config, record, _ = archive
    env = child_env(TEST_DB_URL="http://127.0.0.1:9")
    listed = runs(config, "list", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if RUN_ID in line)
    for text in ("DIG1", "2026-11-18 11:06:40", "complete", "3000", "spooled", "cli check"):
        assert text in row, (text, row)

    shown = runs(config, "show", RUN_ID, env=env)
    assert shown.returncode == 0, shown.stderr
    for f in record.files:
        assert f.name in shown.stdout and f.sha256 in shown.stdout
    assert '"freq_hz": 20000.0' in shown.stdout

    unknown = runs(config, "show", "no-such-run", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "runs show: unknown run id 'no-such-run'"
    missing = runs(config, "export", env=env)
    assert missing.returncode == 1 and "a run id is needed" in missing.stderr


@pytest.mark.parametrize("fmt", ["npy", "csv"])
def test_export(archive, tmp_path, fmt):
    config, _, codes = archive
    out = tmp_path / "export"
    done = runs(config, "export", RUN_ID, "--format", fmt, "-o", str(out), env=child_env())
    assert done.returncode == 0, done.stderr
    if fmt == "npy":
        for i, ch in enumerate(CHANNELS):
            np.testing.assert_array_equal(np.load(out / f"{RUN_ID}-ch{ch:02d}.npy"), codes[:, i])
    else:
        table = np.loadtxt(out / f"{RUN_ID}.csv", delimiter=",", skiprows=1, dtype=np.int64)
        np.testing.assert_array_equal(table, codes)
        assert (out / f"{RUN_ID}.csv").read_text().splitlines()[0] == "ch00,ch01,ch02"
    assert (out / f"{RUN_ID}.json").is_file()


def test_upload(archive, pouchdb):
    config, record, _ = archive
    down = runs(config, "upload", env=child_env(TEST_DB_URL=f"http://127.0.0.1:{free_port()}"))
    assert down.returncode == 1
    [line] = down.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"runs upload: {RUN_ID}: ") and "ConnectError" in line

    done = runs(config, "upload", env=child_env(TEST_DB_URL=pouchdb.url))
    assert done.returncode == 0, done.stderr
    assert f"delivered {RUN_ID} as document" in done.stdout
    doc_id = done.stdout.split("as document ")[1].split()[0]
    with CouchClient(pouchdb.settings()) as client:
        doc = client.get_document(doc_id)
        assert doc["measurement_name"] == "cli check"
        assert all(client.file_confirmed(doc, f) for f in record.files)

    listed = runs(config, "list", env=child_env())
    row = next(line for line in listed.stdout.splitlines() if RUN_ID in line)
    assert "delivered" in row
    again = runs(config, "upload", env=child_env(TEST_DB_URL=pouchdb.url))
    assert again.returncode == 0 and "nothing to upload" in again.stdout
