"""Stream ingest: the driver's StreamClient against a bare recv_into loop.

Starts the simulator unthrottled as a separate process on a loopback address of
its own, reads its 4210 stream for N seconds with StreamClient (counting bytes
in on_buffer), then for N seconds with a bare ``recv_into`` loop into one
buffer, and prints both rates and their ratio. Target: >= 1 GB/s and >= 50 %
of the bare loop.

    .venv/bin/python bench/stream_ingest.py [--seconds 5] [--module ACQ425ELF]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import random_loopback, stop_process  # noqa: E402

from dtacq_ioc.card.card import Card  # noqa: E402
from dtacq_ioc.card.stream import StreamClient  # noqa: E402
from dtacq_ioc.config import load_config  # noqa: E402
from dtacq_ioc.contract import StreamLayout  # noqa: E402

CONFIG = """
[ioc]
name = "bench"
[archive]
data_dir = "data"

[[cards]]
name = "BENCH"
host = "{host}"
prefix = "BENCH:"

[cards.sim]
carrier = "acq2106"

[[cards.sim.sites]]
site = 1
module = "{module}"
"""


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"simulator exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout} s")


@contextlib.contextmanager
def simulator(config: Path, host: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtacq_ioc", "sim", str(config), "--unthrottled"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(host, 4221, proc)
        yield
    finally:
        stop_process(proc)


def driver_rate(host: str, layout: StreamLayout, buffer_samples: int, seconds: float) -> float:
    """Bytes per second delivered to on_buffer, from the first buffer to the last."""
    counted = [0]
    first: list[float] = []
    last = [0.0]
    done = threading.Event()
    ended = threading.Event()
    sample_bytes = layout.sample_bytes

    def on_buffer(samples: np.ndarray) -> None:
        now = time.perf_counter()
        if not first:
            first.append(now)
        else:
            counted[0] += len(samples) * sample_bytes
            last[0] = now
            if now - first[0] >= seconds:
                done.set()

    stream = StreamClient(
        "BENCH", host, 4210, layout, buffer_samples, on_buffer, lambda e: ended.set(), 5.0
    )
    stream.start()
    done.wait(seconds + 30)
    stream.stop()
    ended.wait(10)
    return counted[0] / (last[0] - first[0])


def bare_rate(host: str, nbytes: int, seconds: float) -> float:
    """Bytes per second of the plainest reader: recv_into one buffer, nothing else."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    total = 0
    with socket.create_connection((host, 4210), timeout=5.0) as sock:
        sock.recv_into(view)  # start timing on data, as the driver run does
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            n = sock.recv_into(view)
            if not n:
                break
            total += n
            if time.perf_counter() >= end:
                break
        return total / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--module", default="ACQ425ELF")
    parser.add_argument("--buffer-bytes", type=int, default=4 << 20)
    parser.add_argument("--rounds", type=int, default=4, help="alternate the two readers")
    args = parser.parse_args()

    host = random_loopback()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.toml"
        path.write_text(CONFIG.format(host=host, module=args.module))
        config = load_config(path)
        with simulator(path, host):
            card = Card(config.cards[0])
            card.connect()
            layout = card.configure_stream()
            card.close()
            buffer_samples = max(1, args.buffer_bytes // layout.sample_bytes)
            nbytes = buffer_samples * layout.sample_bytes
            # Alternating rounds: a shared machine's load shifts both readers alike.
            drivers, bares = [], []
            for i in range(args.rounds):
                if i % 2:  # and in both orders, so neither always follows the other
                    bares.append(bare_rate(host, nbytes, args.seconds))
                drivers.append(driver_rate(host, layout, buffer_samples, args.seconds))
                if not i % 2:
                    bares.append(bare_rate(host, nbytes, args.seconds))
    driver, bare = float(np.median(drivers)), float(np.median(bares))
    rounds = ", ".join(f"{d / 1e6:.0f}/{b / 1e6:.0f}" for d, b in zip(drivers, bares, strict=True))
    print(f"module {args.module}, {layout.sample_bytes} B/sample, buffer {nbytes} B")
    print(f"rounds (driver/bare MB/s): {rounds}")
    print(f"StreamClient   {driver / 1e6:9.1f} MB/s (median of {args.rounds})")
    print(f"bare recv_into {bare / 1e6:9.1f} MB/s")
    print(f"ratio          {driver / bare:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
