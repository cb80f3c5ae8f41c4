"""Bridge fan-out: 20 WebSocket clients x 16 waveforms of 4096 points at 10 Hz.

Measures, for the bridge (`dtacq-ioc bridge` reading a CA server through caproto)
and for a bare Autobahn server that sends the same bytes at the same rate in the
same run: per-client update rate, p95 latency from the value's timestamp to the
client, and the server's CPU. Targets: >= 9.5 Hz per client, p95 < 100 ms, CPU
within 2x of the bare server.

    .venv/bin/python bench/bridge_fanout.py [--seconds 10] [--clients 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
NWAVE, NPOINTS, RATE = 16, 4096, 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def bare_server(port: int) -> None:
    """Autobahn on Twisted's asyncio reactor, sending PVWS-shaped waveform updates."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    clients: set = set()

    class Proto(WebSocketServerProtocol):
        def onOpen(self):
            clients.add(self)

        def onClose(self, *a):
            clients.discard(self)

    factory = WebSocketServerFactory()
    factory.protocol = Proto
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    x = np.arange(NPOINTS)

    async def tick():
        n = 0
        start = loop.time()
        while True:
            n += 1
            now = time.time()
            for i in range(NWAVE):
                data = ((x + n + i) % 1000).astype("<i2")
                msg = {
                    "type": "update", "pv": f"BENCH:WF{i:02d}",
                    "b64srt": base64.b64encode(data.tobytes()).decode(),
                    "seconds": int(now), "nanos": int((now % 1) * 1e9),
                }  # fmt: skip
                payload = json.dumps(msg, separators=(",", ":")).encode()
                for c in list(clients):
                    c.sendMessage(payload)
            # absolute deadlines: the bare server holds 10 Hz exactly (no drift)
            await asyncio.sleep(max(0.0, start + n / RATE - loop.time()))

    ticker = loop.create_task(tick())
    loop.run_forever()
    ticker.cancel()


async def clients_run(url: str, pvs: list[str], nclients: int, seconds: float, subscribe: bool):
    import websockets

    counts = [0] * nclients
    lat: list[float] = []

    async def one(k: int) -> None:
        async with websockets.connect(url, max_size=None) as ws:
            if subscribe:
                await ws.send(json.dumps({"type": "subscribe", "pvs": pvs}))
            t_start = time.monotonic() + 1.0  # let the first (metadata) updates pass
            t_end = t_start + seconds
            while time.monotonic() < t_end:
                raw = await asyncio.wait_for(ws.recv(), 10)
                now = time.time()
                if time.monotonic() < t_start:
                    continue
                # timestamps sit at the end of each update; parse only that tail
                msg = json.loads(raw)
                if "seconds" in msg and ("b64srt" in msg):
                    counts[k] += 1
                    lat.append(now - (msg["seconds"] + msg["nanos"] * 1e-9))

    await asyncio.gather(*(one(k) for k in range(nclients)))
    rates = [c / seconds / len(pvs) for c in counts]
    return rates, lat


def measure(name: str, proc: subprocess.Popen, url, pvs, nclients, seconds, subscribe):
    p = psutil.Process(proc.pid)
    cpu0, t0 = p.cpu_times(), time.monotonic()
    rates, lat = asyncio.run(clients_run(url, pvs, nclients, seconds, subscribe))
    cpu1, t1 = p.cpu_times(), time.monotonic()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0) * 100
    p95 = float(np.percentile(lat, 95)) * 1000 if lat else float("nan")
    p50 = float(np.percentile(lat, 50)) * 1000 if lat else float("nan")
    rss = p.memory_info().rss / 1e6
    print(
        f"{name:8s} clients={nclients} rate/client min={min(rates):.2f}"
        f" mean={np.mean(rates):.2f} Hz"
        f"  latency p50={p50:.1f} p95={p95:.1f} ms  CPU={cpu:.1f}%  RSS={rss:.0f} MB"
    )
    return min(rates), p95, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        bare_server(args.bare)
        return 0

    os.environ.update(
        EPICS_CA_SERVER_PORT=str(free_port()), EPICS_CA_REPEATER_PORT=str(free_port()),
        EPICS_CA_ADDR_LIST="127.0.0.1", EPICS_CA_AUTO_ADDR_LIST="NO",
        EPICS_CAS_INTF_ADDR_LIST="127.0.0.1",
    )  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sys.path.insert(0, str(ROOT / "tests"))
            from bridge_helpers import _wait_ca, bridge_config

            ioc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "bridge_helpers.py"), "BENCH:",
                 str(RATE), str(NPOINTS), str(NWAVE)],
                env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(ioc)
            _wait_ca("BENCH:COUNT", ioc)
            port = free_port()
            cfg = bridge_config(Path(tmp), port)
            bridge = subprocess.Popen(
                [sys.executable, "-m", "dtacq_ioc", "--log-level", "WARNING", "bridge", str(cfg)],
                cwd=ROOT,
                stderr=subprocess.DEVNULL,
            )
            procs.append(bridge)
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, __file__, "--bare", str(bare_port)])
            procs.append(bare)
            wait_port(port)
            wait_port(bare_port)
            pvs = [f"BENCH:WF{i:02d}" for i in range(NWAVE)]
            print(f"{args.clients} clients x {NWAVE} waveforms x {NPOINTS} int16 at {RATE:g} Hz, "
                  f"{args.seconds:g} s each")  # fmt: skip
            b_rate, b_p95, b_cpu = measure(
                "bridge", bridge, f"ws://127.0.0.1:{port}/pvws/pv", pvs, args.clients,
                args.seconds, True,
            )  # fmt: skip
            _, _, r_cpu = measure(
                "bare", bare, f"ws://127.0.0.1:{bare_port}/", pvs, args.clients, args.seconds,
                False,
            )  # fmt: skip
            ok = b_rate >= 9.5 and b_p95 < 100 and b_cpu <= 2 * r_cpu
            print(
                f"targets: rate>=9.5 {'ok' if b_rate >= 9.5 else 'MISSED'}, "
                f"p95<100ms {'ok' if b_p95 < 100 else 'MISSED'}, "
                f"CPU<=2x bare ({b_cpu / max(r_cpu, 1e-9):.2f}x) "
                f"{'ok' if b_cpu <= 2 * r_cpu else 'MISSED'}"
            )
            return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
