"""The runs view's endpoints: `dtacq-ioc bridge` alone serving a catalog it only reads.

A run is written with the project's .dig writer (two files, known samples) and put in
the SQLite catalog; the bridge process then lists, searches, shows, plots (exact and
block-sampled min/max) and exports it over real HTTP.
"""

from __future__ import annotations

import csv
import io
import itertools
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from bridge_helpers import bridge_config, bridge_process, new_port

from dtacq_ioc.archive.dig import DigWriter, dig_name, file_date
from dtacq_ioc.archive.records import RunRecord
from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog
from dtacq_ioc.bridge.runs import RunData

ROWS = 50_000  # per file
CHANNELS = [0, 1, 4]
DAY = 86400.0


def write_run(data_dir: Path, run_id: str, name: str, started: float) -> tuple[RunRecord, dict]:
    """A two-file run: channel c holds (row * (c + 1)) % 30000 - 15000, with a spike."""
    directory = data_dir / "C1" / run_id
    directory.mkdir(parents=True)
    header = {
        "channels": 8, "channel_list": CHANNELS, "byte_depth": 2, "bit_shift": 0,
        "is_float": False, "downsample": 2, "freq_hz": 200_000.0, "date": file_date(started),
        "measurement_name": name,
    }  # fmt: skip
    rows = np.arange(2 * ROWS)[:, None]
    data = ((rows * (np.array(CHANNELS) + 1)) % 30000 - 15000).astype("<i2")
    data[70_000, 1] = 32000  # in the second file
    files = []
    for i in range(2):
        with DigWriter(directory / dig_name(header["date"], i), header) as w:
            w.write(data[i * ROWS : (i + 1) * ROWS])
        files.append(w.close())
    record = RunRecord(
        run_id=run_id, card="C1", host="127.0.0.1", measurement_name=name, header=header,
        files=files, started=started, stopped=started + 1.0, samples=2 * ROWS * 2,
        bytes_written=sum(f.size for f in files), state="complete", upload=True,
    )  # fmt: skip
    return record, {ch: data[:, i] for i, ch in enumerate(CHANNELS)}


@pytest.fixture
def archive(tmp_path: Path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    now = time.time()
    catalog = SqliteCatalog(data_dir / CATALOG_FILE)
    first, samples = write_run(data_dir, "run-a", "Alpha scan", now - 3 * DAY)
    second, _ = write_run(data_dir, "run-b", "beta noise", now)
    big, _ = write_run(data_dir, "run-big", "big", now - 10 * DAY)
    big.bytes_written = 5 << 30  # as the catalog says: too big for an export in memory
    for record in (first, second, big):
        catalog.run_finished(record)
    catalog.close()
    return tmp_path, first, samples


def test_decimate_exact_and_sampled(archive) -> None:
    _, record, samples = archive
    data = RunData.open([f.path for f in record.files])
    assert data.rows == 2 * ROWS and data.rate_hz == 100_000.0
    got = data.decimate([1, 4], start=10, end=90_010, width=100)
    assert got["exact"] and got["width"] == 100 and len(got["x"]) == 100
    edges = 10 + np.arange(101) * 90_000 // 100
    for ch in (1, 4):
        want_lo = [samples[ch][a:b].min() for a, b in itertools.pairwise(edges)]
        want_hi = [samples[ch][a:b].max() for a, b in itertools.pairwise(edges)]
        assert got["min"][str(ch)] == want_lo and got["max"][str(ch)] == want_hi
    assert max(got["max"]["1"]) == 32000  # the spike, across the file boundary
    # Past the exact limit: a block from each column's middle, within the column's range.
    sampled = data.decimate([0], width=50, exact_rows=1000)
    assert not sampled["exact"] and sampled["width"] == 50
    for i, (lo, hi) in enumerate(zip(sampled["min"]["0"], sampled["max"]["0"], strict=True)):
        a, b = i * 2000, (i + 1) * 2000
        assert samples[0][a:b].min() <= lo <= hi <= samples[0][a:b].max()


def test_bridge_alone_serves_the_catalog_read_only(archive) -> None:
    tmp_path, record, samples = archive
    port = new_port()
    cfg = bridge_config(tmp_path, port)
    catalog = tmp_path / "data" / CATALOG_FILE
    before = catalog.stat().st_mtime_ns, catalog.stat().st_size
    base = f"http://127.0.0.1:{port}"
    with bridge_process(cfg, port), httpx.Client(base_url=base, timeout=30.0) as http:
        runs = http.get("/runs/").json()
        assert [r["run_id"] for r in runs] == ["run-b", "run-a", "run-big"]
        assert runs[1]["upload"] == "pending" and runs[1]["samples"] == 2 * ROWS * 2
        assert [r["run_id"] for r in http.get("/runs/?name=ALPHA").json()] == ["run-a"]
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert [r["run_id"] for r in http.get(f"/runs/?since={today}").json()] == ["run-b"]
        assert [r["run_id"] for r in http.get(f"/runs/?until={today}&name=scan").json()] == [
            "run-a"
        ]
        bad = http.get("/runs/?since=yesterday")
        assert bad.status_code == 400 and "not a date YYYY-MM-DD" in bad.json()["error"]

        shown = http.get("/runs/run-a").json()
        assert shown["header"]["channel_list"] == CHANNELS
        link = shown["file_links"][1]["href"]
        assert link.startswith("/data/C1/run-a/")
        assert http.get(link).content == Path(record.files[1].path).read_bytes()

        plot = http.get("/runs/run-a/plot?channels=1&width=10").json()
        assert plot["exact"] and max(plot["max"]["1"]) == 32000 and plot["x_units"] == "s"
        refused = http.get("/runs/run-a/plot?channels=7")
        assert refused.status_code == 400 and "not a channel of this run" in refused.json()["error"]
        assert http.get("/runs/nope/plot").status_code == 404
        assert http.get("/runs/run-a/plot/more").json() == {"error": "no such page under /runs/"}
        assert http.get("/runs/nope").json() == {"error": "unknown run id 'nope'"}

        export = http.get("/runs/run-a/export?format=csv")
        assert export.status_code == 200
        with zipfile.ZipFile(io.BytesIO(export.content)) as z:
            assert sorted(z.namelist()) == ["run-a.csv", "run-a.json"]
            rows = list(csv.reader(io.StringIO(z.read("run-a.csv").decode())))
        assert rows[0] == ["ch00", "ch01", "ch04"]
        assert [int(v) for v in rows[1 + 70_000]] == [int(samples[c][70_000]) for c in CHANNELS]
        npy = http.get("/runs/run-a/export?format=npy")
        with zipfile.ZipFile(io.BytesIO(npy.content)) as z:
            arr = np.load(io.BytesIO(z.read("run-a-ch04.npy")))
        assert np.array_equal(arr, samples[4])
        assert http.get("/runs/run-a/export?format=xls").status_code == 400
        big = http.get("/runs/run-big/export?format=npy")
        assert (
            big.status_code == 400 and "use `dtacq-ioc runs export run-big`" in big.json()["error"]
        )
    assert (catalog.stat().st_mtime_ns, catalog.stat().st_size) == before


def test_bridge_without_a_catalog_lists_no_runs(tmp_path: Path) -> None:
    port = new_port()
    cfg = bridge_config(tmp_path, port)
    with bridge_process(cfg, port):
        assert httpx.get(f"http://127.0.0.1:{port}/runs/", timeout=30.0).json() == []
    assert not (tmp_path / "data" / CATALOG_FILE).exists()
