"""Simulator stream throughput: `python bench/sim_stream.py [--seconds S] [--throttled]`.

Starts `dtacq-ioc sim` as a real process on a loopback address with one ACQ425ELF
card, reads port 4210 with recv_into for S seconds and prints MB/s, samples/s,
and (throttled) how far the rate is from the nominal 1 MHz.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import random_loopback, sim_card_toml, sim_process, write_config

SSB = 40  # ACQ425ELF: 16 x int16 + 2 spad words
CHUNK = 10_000 * SSB  # one 10 ms block at 1 MHz


def read_chunk(s: socket.socket, view: memoryview) -> int:
    """Fill the chunk; return the spad counter of its last sample."""
    got = 0
    while got < CHUNK:
        n = s.recv_into(view[got:])
        if not n:
            raise EOFError("stream closed")
        got += n
    return int.from_bytes(view[CHUNK - 8 : CHUNK - 4], "little")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--throttled", action="store_true")
    args = p.parse_args()
    host = random_loopback()
    view = memoryview(bytearray(CHUNK))
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), sim_card_toml("B", host))
        extra = () if args.throttled else ("--unthrottled",)
        with sim_process(config, host, *extra), socket.create_connection((host, 4210)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            first, t0 = read_chunk(s, view), time.perf_counter()
            total, last, t1 = 0, first, t0
            while t1 - t0 < args.seconds:
                last, t1 = read_chunk(s, view), time.perf_counter()
                total += CHUNK
    elapsed = t1 - t0
    rate = (last - first) / elapsed
    mode = "throttled" if args.throttled else "unthrottled"
    print(f"{mode}: {total / elapsed / 1e6:.1f} MB/s, {rate:.0f} samples/s over {elapsed:.2f} s")
    if args.throttled:
        print(f"rate error vs 1 MHz: {(rate / 1e6 - 1) * 100:+.4f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
