"""Transient shot readout: the driver's read_shot against a bare recv_into of the same bytes.

Starts the simulator as a separate process (one ACQ425ELF: 16 channels of int16),
runs one soft-triggered shot of PRE=0 POST=4 000 000 samples, then reads it
repeatedly from 53000+ch, alternating `Transient.read_shot` (into its preallocated
array) with the plainest reader (`recv_into` of each port into one preallocated
buffer), and prints both rates and their ratio. Target: >= 80 % of the bare reader.

    .venv/bin/python bench/transient.py [--post 4000000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from stream_ingest import CONFIG, simulator  # noqa: E402
from support import random_loopback  # noqa: E402

from dtacq_ioc.card.card import Card  # noqa: E402
from dtacq_ioc.card.transient import DATA_PORT, TransientSettings, recv_exactly  # noqa: E402
from dtacq_ioc.config import load_config  # noqa: E402


def bare_seconds(host: str, channels: int, nbytes: int, buf: memoryview) -> float:
    """Time to recv_into every channel's bytes, port after port, into one buffer."""
    t0 = time.perf_counter()
    for ch in range(1, channels + 1):
        with socket.create_connection((host, DATA_PORT + ch), timeout=10.0) as sock:
            got = recv_exactly(sock, buf[:nbytes])
        if got != nbytes:
            raise RuntimeError(f"channel {ch}: {got} of {nbytes} bytes")
    return time.perf_counter() - t0


def driver_seconds(card: Card) -> float:
    t0 = time.perf_counter()
    shot = card.transient().read_shot()
    elapsed = time.perf_counter() - t0
    if not shot.complete:
        raise RuntimeError("the driver's read was short")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--post", type=int, default=4_000_000)
    parser.add_argument("--rounds", type=int, default=4, help="alternate the two readers")
    args = parser.parse_args()

    host = random_loopback()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.toml"
        path.write_text(CONFIG.format(host=host, module="ACQ425ELF"))
        config = load_config(path)
        with simulator(path, host):
            card = Card(config.cards[0])
            try:
                card.connect()
                layout = card.configure_stream()
                tr = card.transient()
                tr.configure(TransientSettings(pre=0, post=args.post))
                tr.arm(30.0)
                tr.soft_trigger()
                tr.wait_done(60.0 + args.post / card.sample_rate_hz())
                nbytes = args.post * layout.word_size
                total = nbytes * layout.ai_channels
                buf = memoryview(bytearray(nbytes))
                driver_seconds(card)  # warm up both sides: the simulator builds its columns
                drivers, bares = [], []
                for i in range(args.rounds):
                    if i % 2:  # both orders, so neither always follows the other
                        bares.append(bare_seconds(host, layout.ai_channels, nbytes, buf))
                    drivers.append(driver_seconds(card))
                    if not i % 2:
                        bares.append(bare_seconds(host, layout.ai_channels, nbytes, buf))
            finally:
                card.close()
    driver, bare = float(np.median(drivers)), float(np.median(bares))
    rounds = ", ".join(
        f"{total / d / 1e6:.0f}/{total / b / 1e6:.0f}" for d, b in zip(drivers, bares, strict=True)
    )
    print(f"shot: {layout.ai_channels} ch x {args.post} samples x {layout.word_size} B "
          f"= {total / 1e6:.0f} MB from 53000+ch; nproc {os.cpu_count()}")  # fmt: skip
    print(f"rounds (driver/bare MB/s): {rounds}")
    print(
        f"read_shot      {total / driver / 1e6:9.1f} MB/s  {driver:.3f} s (median of {args.rounds})"
    )
    print(f"bare recv_into {total / bare / 1e6:9.1f} MB/s  {bare:.3f} s")
    print(f"ratio          {bare / driver:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
