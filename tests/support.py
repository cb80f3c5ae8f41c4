"""Helpers shared by the tests: loopback addresses, free ports, configs, real processes.

Each test that starts a simulated card gives it a random loopback address
(127.a.b.c), so cards keep their real ports (4210, 4220+site) and tests never
collide with each other or with a running IOC.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dtacq_ioc.notify import socket_address
from dtacq_ioc.preflight import ephemeral_ports

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for TCP and UDP on `host`, below the kernel's ephemeral range.

    Below it, because a server port the kernel could also hand to a client breaks UDP:
    caproto's sync client binds port 0 with SO_REUSEADDR, and Linux then may give it
    an IOC's port (see `preflight.ca_port_caveat`): a search timeout about once in
    37,000 searches, and the put fuzz alone makes ~600. Below the range, it also keeps
    clear of a simulated card's fixed ports (53000 + channel).
    """
    ephemeral = ephemeral_ports()
    rng = random.SystemRandom()
    candidates = range(max(5100, ephemeral.start - 12000), ephemeral.start)
    if len(candidates) < 1000:  # a host whose ephemeral range starts low: use what is above
        candidates = range(ephemeral.stop, 65536)
    for _ in range(1000):
        port = rng.choice(candidates)
        if bindable(host, port, socket.SOCK_STREAM) and bindable(host, port, socket.SOCK_DGRAM):
            return port
    raise RuntimeError(f"no free port on {host} in {candidates.start}..{candidates.stop - 1}")


def bindable(host: str, port: int, kind: socket.SocketKind) -> bool:
    """Whether a socket of `kind` could bind host:port now (no SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def random_loopback() -> str:
    """An address on lo no other test uses (it binds 4220 there to make sure)."""
    rng = random.SystemRandom()
    for _ in range(100):
        host = f"127.{rng.randint(10, 250)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        with socket.socket() as s:
            try:
                s.bind((host, 4220))
            except OSError:
                continue
        return host
    raise RuntimeError("no free loopback address")


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc=None) -> None:
    """Block until host:port accepts a connection (or fail, naming what we waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} did not open within {timeout} s")
        time.sleep(0.05)


def sim_card_toml(
    name: str,
    host: str,
    module: str = "ACQ425ELF",
    carrier: str = "acq2106",
    prefix: str | None = None,
    ssh_port: int | None = None,
    sim_extra: str = "",
    site_extra: str = "",
    card_extra: str = "",
    faults: str = "",
) -> str:
    """One [[cards]] entry with a [cards.sim] table, as TOML text."""
    ssh_port = ssh_port or free_port(host)
    return f"""
[[cards]]
name = "{name}"
host = "{host}"
prefix = "{prefix or f"TEST:{name}:"}"
timeout_s = 3.0
{card_extra}

[cards.ssh]
user = "root"
password = "sim"
port = {ssh_port}
host_key_policy = "auto-add"

[cards.sim]
carrier = "{carrier}"
{sim_extra}

[cards.sim.faults]
{faults}

[[cards.sim.sites]]
site = 1
module = "{module}"
{site_extra}
"""


def write_config(directory: Path, cards: str, extra: str = "") -> Path:
    """A complete config in `directory` with its data under it."""
    path = directory / "test.toml"
    path.write_text(
        f"""
[ioc]
name = "test"
autosave_dir = "autosave"
[archive]
data_dir = "data"
{extra}
{cards}
"""
    )
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `timeout`; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drain(proc: subprocess.Popen, chunks: list[bytes]) -> None:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        chunks.append(line)


def output(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """Everything a process started by `running` printed (all of it once it has exited)."""
    if proc.poll() is not None:
        proc.drain.join(timeout)  # type: ignore[attr-defined]
    return b"".join(proc.chunks).decode(errors="replace")  # type: ignore[attr-defined]


@contextlib.contextmanager
def running(
    args: list[str],
    ready: tuple[str, int] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Run `python -m dtacq_ioc ARGS` as a real process; wait for a port; always clean up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtacq_ioc", *args],
        cwd=cwd or ROOT,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # Drain the pipe all along: a full pipe would block the child's logging, and so the child.
    chunks: list[bytes] = []
    drain = threading.Thread(target=_drain, args=(proc, chunks), daemon=True)
    drain.start()
    proc.drain = drain  # type: ignore[attr-defined]
    proc.chunks = chunks  # type: ignore[attr-defined]
    try:
        if ready is not None:
            wait_for_port(*ready, timeout=timeout, proc=proc)
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def sim_process(config: Path, host: str, *extra: str) -> Iterator[subprocess.Popen]:
    """`dtacq-ioc sim CONFIG` as a real process, ready when site 1's knob port answers."""
    with running(["sim", str(config), *extra], ready=(host, 4221)) as proc:
        yield proc


class NotifyListener:
    """The systemd side: a datagram socket the IOC sends to, recording what arrives."""

    def __init__(self) -> None:
        self.address = f"@dtacq-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(self.address))
        self.messages: list[str] = []

    def wait_for(self, predicate, timeout: float, proc=None) -> str:
        """Return the first new message matching predicate (older ones stay recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching notify message; got {self.messages[-10:]}")
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"IOC exited with {proc.returncode}: {self.messages[-10:]}")
            self.sock.settimeout(min(left, 0.5))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()
