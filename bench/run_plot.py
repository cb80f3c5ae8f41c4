"""The runs view's decimated plot of a long run: time to first draw against reading its bytes.

Writes a synthetic run with the project's .dig writer (default 10 minutes of 16
channels at 1 MHz, int16: 19.2 GB in 60-second files) and catalogs it, starts
`dtacq-ioc bridge` alone on it, and measures with the page files out of the page
cache (posix_fadvise DONTNEED):

- the endpoint: GET /runs/ID/plot for all 16 channels, 1500 columns (HTTP, cold);
- the page: Debian's Chromium opening /#run=ID until the plot is drawn (cold);
- the baseline: reading the same bytes of the files once, sequentially (cold).

Target: first draw under 2 s.

    .venv/bin/python bench/run_plot.py [--minutes 10] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, running  # noqa: E402

from dtacq_ioc.archive.dig import DigWriter, dig_name, file_date  # noqa: E402
from dtacq_ioc.archive.records import RunRecord  # noqa: E402
from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog  # noqa: E402

CHANNELS = 16
RATE = 1_000_000
BLOCK = 1 << 20  # rows written per call
CHROMIUM = "/usr/bin/chromium"

CONFIG = """
[ioc]
name = "bench"
[archive]
data_dir = "data"
[bridge]
enabled = true
port = {port}
tokens = ["bench"]

[[cards]]
name = "BENCH"
host = "127.0.0.1"
prefix = "BENCH:"
[cards.modules]
1 = "ACQ425ELF"
"""


def write_run(data_dir: Path, minutes: float) -> RunRecord:
    """The run's files (one per minute) and its catalog row."""
    run_id = "bench-run"
    directory = data_dir / "BENCH" / run_id
    directory.mkdir(parents=True)
    started = time.time()
    header = {
        "channels": CHANNELS, "channel_list": list(range(CHANNELS)), "byte_depth": 2,
        "bit_shift": 0, "is_float": False, "downsample": 1, "freq_hz": float(RATE),
        "date": file_date(started), "measurement_name": "bench long run", "run_id": run_id,
    }  # fmt: skip
    t = np.arange(BLOCK)[:, None]
    block = (np.sin(2 * np.pi * t * (np.arange(CHANNELS) + 1) / 5000.0) * 20000).astype("<i2")
    rows_left = int(minutes * 60 * RATE)
    per_file = 60 * RATE
    files, index = [], 0
    t0 = time.monotonic()
    while rows_left > 0:
        path = directory / dig_name(header["date"], index)
        with DigWriter(path, header) as w:
            n = min(per_file, rows_left)
            while n > 0:
                k = min(n, BLOCK)
                w.write(block[:k])
                n -= k
                rows_left -= k
        files.append(w.close())
        index += 1
    size = sum(f.size for f in files)
    print(f"wrote {size / 1e9:.1f} GB in {len(files)} files in {time.monotonic() - t0:.0f} s")
    record = RunRecord(
        run_id=run_id, card="BENCH", host="127.0.0.1", measurement_name="bench long run",
        header=header, files=files, started=started, stopped=started + minutes * 60,
        samples=int(minutes * 60 * RATE), bytes_written=size, state="complete",
    )  # fmt: skip
    catalog = SqliteCatalog(data_dir / CATALOG_FILE)
    catalog.run_finished(record)
    catalog.close()
    return record


def evict(record: RunRecord) -> None:
    """Drop the files from the page cache, so each reader starts from the disk."""
    for f in record.files:
        fd = os.open(f.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(record: RunRecord) -> float:
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for f in record.files:
        with open(f.path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def endpoint(port: int, run_id: str) -> tuple[float, dict]:
    url = f"http://127.0.0.1:{port}/runs/{run_id}/plot?width=1500"
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = json.loads(resp.read())
    return time.perf_counter() - t0, body


def page_draw(port: int, run_id: str) -> tuple[float, str]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/?token=bench")
            page.wait_for_function("state.access !== undefined", timeout=30_000)
            # all 16 channels, as the endpoint was asked
            t0 = time.perf_counter()
            page.evaluate(f"location.hash = 'run={run_id}'")
            page.wait_for_function("+document.getElementById('rd-plot').dataset.drawn >= 1",
                                   timeout=120_000)  # fmt: skip
            wall = time.perf_counter() - t0
            return wall, page.locator("#rd-note").text_content() or ""
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--dir", default=None, help="where to write the run (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="run-plot-", dir=args.dir))
    try:
        data = work / "data"
        record = write_run(data, args.minutes)
        port = free_port()
        cfg = work / "bench.toml"
        cfg.write_text(CONFIG.format(port=port))
        with running(["bridge", str(cfg)], ready=("127.0.0.1", port), timeout=60):
            evict(record)
            cold, body = endpoint(port, record.run_id)
            warm, _ = endpoint(port, record.run_id)
            evict(record)
            draw, note = page_draw(port, record.run_id) if os.path.exists(CHROMIUM) else (0, "")
        evict(record)
        base = read_all(record)
        gb = record.bytes_written / 1e9
        print(f"run: {args.minutes:g} min, {CHANNELS} ch, {RATE / 1e6:g} MHz, {gb:.1f} GB")
        print(
            f"endpoint, 16 channels x {body['width']} columns: cold {cold:.2f} s,"
            f" warm {warm:.2f} s (exact={body['exact']}, {body['rows_per_column']} rows per column)"
        )
        if note:
            print(f"page, 4 channels, first draw: {draw:.2f} s ({note})")
        print(f"baseline, reading the same bytes: {base:.1f} s ({gb / base:.2f} GB/s)")
        print(f"ratio endpoint cold / baseline: {cold / base:.4f}; target first draw < 2 s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
