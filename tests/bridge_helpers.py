"""Helpers for the bridge tests: a generic CA server, a bridge process, WebSocket clients.

The generic IOC below is an ordinary Channel Access server with one PV of each
kind PVWS must translate (scalar with limits/units, enum, int16 and float64
waveforms, a long string). It stands in for *any* IOC the bridge may serve;
tests of the nEDM protocol use the project's real IOC instead.

Run as a script: ``python tests/bridge_helpers.py PREFIX [RATE_HZ [NPOINTS [NWAVE]]]``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from support import ROOT, child_env, free_port, running, stop_process

HERE = Path(__file__).resolve()


def ioc_main(argv: list[str]) -> None:
    import numpy as np
    from caproto import ChannelType
    from caproto.asyncio.server import start_server
    from caproto.server import PVGroup, pvproperty

    prefix = argv[0]
    rate = float(argv[1]) if len(argv) > 1 else 10.0
    npoints = int(argv[2]) if len(argv) > 2 else 1024
    nwave = int(argv[3]) if len(argv) > 3 else 1

    body: dict = {
        "TEMP": pvproperty(
            value=21.5,
            dtype=float,
            units="degC",
            precision=3,
            doc="a temperature",
            upper_ctrl_limit=100.0,
            lower_ctrl_limit=-50.0,
            upper_alarm_limit=90.0,
            lower_alarm_limit=-40.0,
            upper_warning_limit=80.0,
            lower_warning_limit=-30.0,
            record="ai",
        ),
        "MODE": pvproperty(
            value="Off",
            dtype=ChannelType.ENUM,
            enum_strings=["Off", "Slow", "Fast"],
            record="mbbo",
        ),
        "COUNT": pvproperty(value=0, dtype=int),
        "NAN": pvproperty(value=float("nan"), dtype=float),
        "NOTE": pvproperty(value="hello", dtype=ChannelType.CHAR, max_length=2000),
        "NAME": pvproperty(value="short", dtype=ChannelType.STRING),
        "RO": pvproperty(value=3.0, dtype=float, read_only=True),
        "FWF": pvproperty(
            value=np.zeros(npoints),
            dtype=ChannelType.DOUBLE,
            max_length=npoints,
            max_subscription_backlog=3,
        ),
    }
    for i in range(nwave):
        body[f"WF{i:02d}"] = pvproperty(
            value=np.zeros(npoints, dtype=np.int16), dtype=ChannelType.INT,
            max_length=npoints, max_subscription_backlog=3,
        )  # fmt: skip
    Group = type("Generic", (PVGroup,), body)
    group = Group(prefix=prefix)
    waves = [getattr(group, f"WF{i:02d}") for i in range(nwave)]

    async def tick() -> None:
        n = 0
        x = np.arange(npoints)
        while True:
            n += 1
            ts = time.time()
            await group.COUNT.write(n, timestamp=ts)
            await group.FWF.write(np.sin(x / 50.0 + n) * 2.5, timestamp=ts)
            for i, w in enumerate(waves):
                await w.write(((x + n + i) % 1000).astype(np.int16), timestamp=ts)
            await asyncio.sleep(1.0 / rate)

    async def main() -> None:
        server = asyncio.create_task(start_server(group.pvdb, interfaces=["127.0.0.1"]))
        ticker = asyncio.create_task(tick())
        await asyncio.gather(server, ticker)

    asyncio.run(main())


@contextlib.contextmanager
def generic_ioc(
    prefix: str, rate: float = 10.0, npoints: int = 1024, nwave: int = 1, ca_port: int = 0
):
    """The generic CA server as a child process; ready once its PVs answer a CA read.

    `ca_port` gives it (and a bridge started with the same) a CA port of its own, for
    tests that stop an IOC while another runs: two servers on one port share searches.
    """
    proc = subprocess.Popen(
        [sys.executable, str(HERE), prefix, str(rate), str(npoints), str(nwave)],
        env=child_env(PYTHONPATH=str(ROOT / "tests"), **ca_env(ca_port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_ca(prefix + "COUNT", proc, ca_port)
        yield proc
    finally:
        stop_process(proc)


def ca_env(ca_port: int) -> dict[str, str]:
    return {"EPICS_CA_SERVER_PORT": str(ca_port)} if ca_port else {}


def _wait_ca(name: str, proc: subprocess.Popen, ca_port: int = 0, timeout: float = 20.0) -> None:
    from caproto.sync.client import read

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"IOC exited: {proc.stderr.read().decode()[-2000:]}")
        if ca_port:  # another port than this process's: ask from a child that has it
            probe = f"from caproto.sync.client import read; read({name!r}, timeout=1.0)"
            env = child_env(**ca_env(ca_port))
            if (
                subprocess.run(
                    [sys.executable, "-c", probe], env=env, capture_output=True
                ).returncode
                == 0
            ):
                return
        else:
            with contextlib.suppress(Exception):
                read(name, timeout=0.5)
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not answer within {timeout} s")


def bridge_config(directory: Path, port: int, tokens: list[str] = (), extra: str = "") -> Path:
    """A config for `dtacq-ioc bridge`: one placeholder card (the bridge reads only PVs)."""
    toks = ", ".join(json.dumps(t) for t in tokens)
    path = directory / "bridge.toml"
    path.write_text(
        f"""
[ioc]
name = "bridgetest"
trigger_dir = "triggers"
[archive]
data_dir = "data"
[bridge]
enabled = true
host = "127.0.0.1"
port = {port}
tokens = [{toks}]
{extra}

[[cards]]
name = "C1"
host = "127.0.0.1"
prefix = "GEN:"
[cards.modules]
1 = "ACQ425ELF"
"""
    )
    (directory / "data").mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def bridge_process(config: Path, port: int, ca_port: int = 0) -> Iterator[subprocess.Popen]:
    env = child_env(**ca_env(ca_port))
    with running(["bridge", str(config)], ready=("127.0.0.1", port), env=env) as proc:
        yield proc


def new_port() -> int:
    return free_port("127.0.0.1")


async def recv_json(ws, timeout: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws, pred, timeout: float = 10.0) -> dict:
    """Read messages until one satisfies pred; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no matching message")
        msg = await recv_json(ws, left)
        if pred(msg):
            return msg


if __name__ == "__main__":
    os.environ.setdefault("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1")
    ioc_main(sys.argv[1:])


def raw_websocket(port: int, path: str = "/pvws/pv", rcvbuf: int = 0) -> socket.socket:
    """A WebSocket client on a bare socket (the handshake done), for what a library client
    would never send or do; `rcvbuf` shrinks its receive buffer."""
    sock = socket.socket()
    sock.settimeout(10)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked, final client frame (up to 64 KiB) of `payload`."""
    assert len(payload) < 65536
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return bytes([0x80 | opcode]) + size + mask + body
