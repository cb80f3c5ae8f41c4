"""Readout throughput: `python bench/readout.py [--seconds S] [--module M] [--dir D]`.

Starts `dtacq-ioc sim --unthrottled` as a separate process on a loopback address
and measures, in the same run, on the same bytes:

1. bare socket read: recv_into from port 4210, nothing else;
2. the whole pipeline: driver stream -> counter check -> display -> run (bit
   shift for the trigger, channel copy into the writer pool) -> .dig files with
   sha256, through `Readout` and `Run` as the IOC uses them;
3. bare file write: the same number of bytes in the same chunk size to a file,
   then fsync (DigWriter fsyncs every file it closes);
4. the run writer alone: the same bytes through `RunWriter` (pool, queue,
   DigWriter with sha256), so "file writing / bare write" compares like with like;
5. sha256 alone over the same bytes in the same chunks: every file's digest is one
   sequential sha256 (the catalog and the file server check it), so no writer can
   be faster than this, however its writes overlap.

The pipeline runs at several input rates (`--input-mbps`, the simulator's SIM:MBPS
cap): the highest rate with no overruns is the sustained, lossless rate. At the
10 GbE line rate (`--line-mbps`, 1170 MB/s) it runs twice: with its files on the
disk (`--dir`) and on a memory file system (`--memory-dir`, /dev/shm), which tells
what the process can do from what the disk can take; each is followed by a bare
write of the same bytes to the same place, and the ratio printed is the run's file
rate over that bare write.

Targets (issue 14): lossless at 1170 MB/s with files written, and the run writer
>= 90 % of the bare write of the same bytes in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import random_loopback, sim_card_toml, sim_process, write_config  # noqa: E402

from dtacq_ioc.archive.catalog import open_catalog  # noqa: E402
from dtacq_ioc.card.card import Card  # noqa: E402
from dtacq_ioc.config import load_config  # noqa: E402
from dtacq_ioc.readout.pipeline import Readout  # noqa: E402
from dtacq_ioc.readout.run import RunSettings  # noqa: E402
from dtacq_ioc.readout.writer import BufferPool, Chunk, RunWriter  # noqa: E402

MB = 1e6


def bare_socket(host: str, seconds: float, chunk: int) -> float:
    view = memoryview(bytearray(chunk))
    with socket.create_connection((host, 4210)) as s:
        s.recv_into(view)  # the clock starts at the first byte
        total, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            n = s.recv_into(view)
            if not n:
                break
            total += n
    return total / elapsed / MB


def pipeline(card: Card, config, seconds: float) -> tuple[float, float, int, int, str]:
    """(stream MB/s, files MB/s, bytes written, overruns, run state) of one run."""
    catalog = open_catalog(config.archive)
    readout = Readout(card, config.ioc, config.archive, catalog)
    try:
        readout.start()
        time.sleep(0.3)  # let the stream settle before the clock starts
        b0 = readout.stats().bytes
        t0 = time.perf_counter()
        run = readout.start_run(RunSettings(measurement_name="bench"))
        time.sleep(seconds)
        readout.stop_run(60)
        elapsed = time.perf_counter() - t0
        streamed = readout.stats().bytes - b0
        rec = run.record
        assert rec is not None
        return (
            streamed / elapsed / MB,
            rec.bytes_written / elapsed / MB,
            rec.bytes_written,
            rec.overruns,
            rec.state + (f" ({rec.fault})" if rec.fault else ""),
        )
    finally:
        readout.close()
        catalog.close()


def bare_write(path: Path, total: int, chunk: int) -> float:
    data = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < total:
            done += f.write(data)
        os.fsync(f.fileno())  # as DigWriter.close does: the bytes are on the disk
    elapsed = time.perf_counter() - t0
    path.unlink()
    return done / elapsed / MB


def hash_alone(total: int, chunk: int) -> float:
    data = np.random.default_rng(1).integers(0, 255, chunk, dtype=np.uint8)
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(0, total, chunk):
        digest.update(data)
    return total / (time.perf_counter() - t0) / MB


def writer_alone(directory: Path, total: int, chunk: int, queue: int) -> float:
    pool = BufferPool(queue, chunk)
    header = {"channel_list": [0], "byte_depth": 2, "is_float": False}
    writer = RunWriter(directory, "bench", lambda i, c: dict(header), pool)
    done_evt = []
    t0 = time.perf_counter()
    done = 0
    while done < total:
        buf = writer.acquire()
        if buf is None:
            time.sleep(0.002)  # the bench waits for the disk; a run would count an overrun
            continue
        writer.submit(Chunk(buf, chunk, False, 1))
        done += chunk
    writer.finish(lambda files, err: done_evt.append((files, err)))
    writer.join()
    elapsed = time.perf_counter() - t0
    files, err = done_evt[0]
    assert not err, err
    for f in files:
        os.unlink(f.path)
    return done / elapsed / MB


def line_rate(card: Card, config, seconds: float, directory: Path, chunk: int) -> str:
    """The pipeline at the line rate with files in `directory`, then a bare write of the
    same bytes there: one line for the table."""
    archive = replace(config.archive, data_dir=directory / "data")
    stream, files, nbytes, overruns, state = pipeline(card, replace(config, archive=archive),
                                                      seconds)  # fmt: skip
    shutil.rmtree(archive.data_dir, ignore_errors=True)
    bare = bare_write(directory / "bare.bin", nbytes, chunk)
    return (f"{directory!s:12} stream {stream:7.1f} MB/s, files {files:7.1f} MB/s, "
            f"{overruns:4} overruns, run {state}; bare write {bare:7.1f} MB/s, "
            f"files = {100 * files / bare:.0f} % of bare")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--module", default="ACQ425ELF")
    p.add_argument("--buffer-bytes", type=int, default=1 << 20)
    p.add_argument("--dir", type=Path, default=None, help="where files go (default: a temp dir)")
    p.add_argument(
        "--input-mbps",
        default="0,500,900",
        help="simulator byte-rate caps to run the pipeline at (0 = as fast as it sends); "
        "a cap shows whether the pipeline keeps up with that load without overruns",
    )
    p.add_argument("--line-mbps", type=float, default=1170.0, help="10 GbE line rate, MB/s")
    p.add_argument("--line-seconds", type=float, default=8.0)
    p.add_argument(
        "--memory-dir", type=Path, default=Path("/dev/shm"),
        help="a memory file system for the second line-rate run ('' to skip)",
    )  # fmt: skip
    args = p.parse_args()
    caps = [float(x) for x in args.input_mbps.split(",")]
    host = random_loopback()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmpdir = Path(tmp)
        path = write_config(
            tmpdir,
            sim_card_toml(
                "B", host, module=args.module, card_extra=f"buffer_bytes = {args.buffer_bytes}"
            ),
        )
        config = load_config(path)
        line = []
        with sim_process(path, host, "--unthrottled"):
            card = Card(config.card("B"))
            card.connect()
            layout = card.configure_stream()
            chunk = card.default_buffer_samples(layout) * layout.ai_channels * layout.word_size
            sock_mbs = bare_socket(host, args.seconds, args.buffer_bytes)
            runs = []
            for cap in caps:
                card.knob(0).set("SIM:MBPS", cap)
                card.configure_stream(layout.sites)
                runs.append((cap, *pipeline(card, config, args.seconds)))
                shutil.rmtree(config.archive.data_dir / "B", ignore_errors=True)
            places = [tmpdir] + ([args.memory_dir] if str(args.memory_dir) not in ("", ".") else [])
            for place in places:
                with tempfile.TemporaryDirectory(dir=place) as where:
                    card.knob(0).set("SIM:MBPS", args.line_mbps)
                    card.configure_stream(layout.sites)
                    line.append(line_rate(card, config, args.line_seconds, Path(where), chunk))
            card.close()
        written = max(r[3] for r in runs)
        total = max(written, 256 << 20)
        wdir = tmpdir / "writer"
        wdir.mkdir()
        # Alternate and keep the best of each: the page cache makes the first pass slower.
        write_mbs = writer_mbs = 0.0
        hash_mbs = max(hash_alone(total, chunk) for _ in range(2))
        for _ in range(2):
            write_mbs = max(write_mbs, bare_write(tmpdir / "bare.bin", total, chunk))
            queue = config.archive.writer_queue_buffers
            writer_mbs = max(writer_mbs, writer_alone(wdir, total, chunk, queue))
        shutil.rmtree(config.archive.data_dir, ignore_errors=True)
    print(f"module {args.module}, {layout.sample_bytes} bytes/sample, buffer {args.buffer_bytes}")
    print(f"bare socket read     {sock_mbs:8.1f} MB/s")
    for cap, pipe_mbs, file_mbs, nbytes, overruns, state in runs:
        load = f"input capped at {cap:.0f} MB/s" if cap else "input uncapped"
        print(f"pipeline, {load}: stream {pipe_mbs:7.1f} MB/s, files {file_mbs:7.1f} MB/s, "
              f"{nbytes / MB:.0f} MB, {overruns} overruns, run {state}")  # fmt: skip
    print(f"bare file write      {write_mbs:8.1f} MB/s  ({total / MB:.0f} MB, {chunk} B chunks)")
    share = 100 * writer_mbs / write_mbs
    print(f"run writer alone     {writer_mbs:8.1f} MB/s  = {share:.0f} % of bare")
    ceiling = 100 * hash_mbs / write_mbs
    print(f"sha256 alone         {hash_mbs:8.1f} MB/s  = {ceiling:.0f} % of bare: the writer's "
          f"ceiling; writer = {100 * writer_mbs / hash_mbs:.0f} % of it")  # fmt: skip
    print(f"line rate {args.line_mbps:.0f} MB/s for {args.line_seconds:.0f} s, files in:")
    for text in line:
        print(f"  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
