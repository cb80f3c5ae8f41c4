"""Helpers for the simulator tests: a simulated card in-process, raw knob and stream sockets.

Everything here talks to the simulator the way `nc` would: plain TCP, bytes in and
out, no driver code.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from support import sim_card_toml, write_config

from dtacq_ioc.config import load_config
from dtacq_ioc.sim import SimCard, Simulator
from dtacq_ioc.sim.signals import SignalTable

PROMPT = re.compile(rb"acq400\.(\d+) (\d) >$")
TIMEOUT = 10.0


@contextlib.contextmanager
def sim_card(tmp_path: Path, host: str, **toml: str) -> Iterator[SimCard]:
    """One simulated card named C at `host`, served in this process."""
    config = load_config(write_config(tmp_path, sim_card_toml("C", host, **toml)))
    sim = Simulator(config)
    sim.start()
    try:
        yield sim.card("C")
    finally:
        sim.stop()


class Knobs:
    """A raw connection to one knob site."""

    def __init__(self, host: str, site: int, prompt: bool = True):
        self.site = site
        self.sock = socket.create_connection((host, 4220 + site), timeout=TIMEOUT)
        self.buf = b""
        self.status = 0
        if prompt:
            assert self.ask("prompt on") == ""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Knobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("knob connection closed")
        self.buf += data

    def exchange(self, line: str) -> bytes:
        """Send a line; return every byte of the reply up to and including the prompt."""
        self.sock.sendall(line.encode() + b"\n")
        while not PROMPT.search(self.buf):
            self._fill()
        out, self.buf = self.buf, b""
        return out

    def ask(self, line: str) -> str:
        """The reply text without the prompt (prompt on); the prompt's flag is kept."""
        raw = self.exchange(line)
        m = PROMPT.search(raw)
        assert m is not None and int(m.group(1)) == self.site, raw
        self.status = int(m.group(2))
        text = raw[: m.start()].decode()
        assert text == "" or text.endswith("\n"), raw
        return text[:-1] if text else text

    def value(self, knob: str) -> str:
        return self.ask(knob)

    def set(self, knob: str, value: object) -> None:
        reply = self.ask(f"{knob}={value}")
        assert reply == "", f"{knob}={value}: {reply!r}"

    def lines(self, n: int) -> list[str]:
        """n LF-terminated lines (for prompt off)."""
        while self.buf.count(b"\n") < n:
            self._fill()
        parts = self.buf.split(b"\n")
        self.buf = b"\n".join(parts[n:])
        return [p.decode() for p in parts[:n]]


class StatusLines:
    """The 2235 console: CRLF-terminated 'state pre post elapsed extra' lines."""

    def __init__(self, host: str):
        self.sock = socket.create_connection((host, 2235), timeout=TIMEOUT)
        self.buf = b""

    def next(self) -> list[int]:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("status console closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return [int(f) for f in line.split()]

    def until(self, state: int) -> list[int]:
        """Lines up to the first one in `state` (progress lines repeat a state)."""
        while True:
            fields = self.next()
            if fields[0] == state:
                return fields

    def states(self, n: int) -> list[int]:
        """The next n distinct states (lines repeating the last state are skipped)."""
        out: list[int] = []
        while len(out) < n:
            state = self.next()[0]
            if not out or out[-1] != state:
                out.append(state)
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> StatusLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_dtype(card: SimCard) -> np.dtype:
    st = card.state
    fields = [(f"s{s.site}", s.dtype, (s.spec.nchan,)) for s in st.stream_sites()]
    if st.nspad:
        fields.append(("spad", "<u4", (st.nspad,)))
    return np.dtype(fields)


def signal_table(card: SimCard) -> SignalTable:
    """What the card streams now, as tests compute it independently of the socket."""
    with card.state.lock:
        return SignalTable(card.state.stream_sites(), card.state.sample_rate_hz())


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError(f"stream closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_all(sock: socket.socket, limit: int = 1 << 26) -> bytes:
    """Everything until the peer closes (at most `limit` bytes)."""
    out = bytearray()
    while len(out) < limit:
        data = sock.recv(65536)
        if not data:
            break
        out += data
    return bytes(out)


def read_samples(host: str, dtype: np.dtype, n: int) -> np.ndarray:
    with socket.create_connection((host, 4210), timeout=TIMEOUT) as s:
        return np.frombuffer(recv_exact(s, n * dtype.itemsize), dtype=dtype)


def wait_refused(host: str, port: int, timeout: float = TIMEOUT) -> None:
    """Block until host:port refuses connections (a card going down)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # accepted into the backlog as the listener closed: going down, not yet down
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} still accepts after {timeout} s")
        time.sleep(0.02)
