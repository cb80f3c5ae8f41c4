"""Bad and slow clients: fuzzed messages, a client that stops reading. Real sockets only."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import psutil
import pytest
from bridge_helpers import (
    bridge_config,
    bridge_process,
    client_frame,
    generic_ioc,
    new_port,
    raw_websocket,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

KNOWN = {"subscribe", "monitor", "clear", "list", "write", "ping", "echo", "auth"}


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _bad_messages():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
    return st.one_of(
        st.binary(max_size=200).map(lambda b: ("binary", b)),
        st.text(max_size=200).filter(_not_json).map(lambda t: ("text", t)),
        st.one_of(scalars, st.lists(scalars, max_size=5)).map(lambda v: ("text", json.dumps(v))),
        st.fixed_dictionaries(
            {"type": st.one_of(scalars.filter(lambda t: t not in KNOWN), st.lists(scalars))},
            optional={"pvs": st.lists(st.text(max_size=10)), "x": scalars},
        ).map(lambda d: ("text", json.dumps(d))),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["subscribe", "monitor", "clear"]),
                "pvs": st.one_of(
                    scalars,
                    st.lists(st.integers(), min_size=1, max_size=3),
                    st.just([""]),
                    st.lists(st.text(max_size=5).map(lambda t: t + " x"), min_size=1),
                ),
            }
        ).map(lambda d: ("text", json.dumps(d))),
        st.fixed_dictionaries(
            {"type": st.just("write")}, optional={"pv": scalars, "value": scalars}
        ).map(lambda d: ("text", json.dumps(d))),
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    port = new_port()
    cfg = bridge_config(d, port, ["tok"], extra="slow_client_timeout_s = 2.0")
    with generic_ioc("GEN:", rate=20, npoints=4096, nwave=16), bridge_process(cfg, port) as p:
        yield port, p


def test_ten_thousand_malformed_messages(served):
    port, proc = served
    url = f"ws://127.0.0.1:{port}/pvws/pv"
    # The watcher reads only after the fuzz: its own keepalive (pongs unread meanwhile)
    # would close it if the fuzz takes over 40 s, as it can on a loaded machine.
    with connect(url, ping_interval=None) as watcher, connect(url) as fuzz:
        watcher.send(json.dumps({"type": "subscribe", "pvs": ["GEN:COUNT"]}))
        assert json.loads(watcher.recv(10))["pv"] == "GEN:COUNT"
        fuzz.send(json.dumps({"type": "echo"}))  # spends the "first message" (auth) slot
        assert json.loads(fuzz.recv(5)) == {"type": "echo"}
        count = 0

        @settings(
            max_examples=10_000,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(_bad_messages())
        def one(message):
            nonlocal count
            _, body = message
            fuzz.send(body)  # bytes go as a binary frame, str as text
            reply = json.loads(fuzz.recv(5))
            assert reply["type"] == "error" and isinstance(reply["message"], str), (body, reply)
            assert "Traceback" not in reply["message"]
            count += 1

        one()
        assert count >= 10_000
        assert proc.poll() is None
        fuzz.send(json.dumps({"type": "echo", "n": 1}))
        assert json.loads(fuzz.recv(5)) == {"type": "echo", "n": 1}
        t_end = time.monotonic() + 1.0
        seen = 0
        while time.monotonic() < t_end:  # the watcher is still served at the IOC's rate
            msg = json.loads(watcher.recv(5))
            seen += msg.get("pv") == "GEN:COUNT"
        assert seen >= 5


def test_client_that_stops_reading_is_dropped_and_memory_stays_bounded(served):
    port, proc = served
    bridge = psutil.Process(proc.pid)
    wfs = [f"GEN:WF{i:02d}" for i in range(16)]
    stop = threading.Event()
    rates: list[int] = []

    def watch():  # a normal client beside the slow one
        with connect(f"ws://127.0.0.1:{port}/pvws/pv", max_size=None) as ws:
            ws.send(json.dumps({"type": "subscribe", "pvs": ["GEN:COUNT", *wfs]}))
            t0, n = time.monotonic(), 0
            while not stop.is_set():
                msg = json.loads(ws.recv(5))
                n += msg.get("pv") == "GEN:COUNT"
                if time.monotonic() - t0 >= 1.0:
                    rates.append(n)
                    t0, n = time.monotonic(), 0

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rss0 = bridge.memory_info().rss
    slow = raw_websocket(port, rcvbuf=4096)
    local = slow.getsockname()
    slow.sendall(client_frame(json.dumps({"type": "subscribe", "pvs": wfs}).encode()))
    t0 = time.monotonic()
    peak = rss0
    dropped_after = None
    while time.monotonic() - t0 < 20:
        peak = max(peak, bridge.memory_info().rss)
        conns = [c for c in bridge.net_connections("tcp") if c.raddr and tuple(c.raddr) == local]
        if not conns or conns[0].status != psutil.CONN_ESTABLISHED:
            dropped_after = time.monotonic() - t0
            break
        time.sleep(0.1)
    stop.set()
    watcher.join(10)
    slow.close()
    assert dropped_after is not None, "the slow client was never dropped"
    assert dropped_after >= 2.0, "dropped before the configured timeout"
    # ~3.5 MB/s of updates were due to the slow client; none of it may pile up.
    assert peak - rss0 < 40 * 1024 * 1024, f"bridge grew {(peak - rss0) / 1e6:.1f} MB"
    assert rates and min(rates[1:] or rates) >= 10, f"the other client was slowed: {rates}"


def _read_frame(sock: socket.socket, opcode: int = 1) -> bytes:
    """One unmasked server frame's payload if its opcode matches, else b"" (the bridge
    sends whole messages, never fragments)."""

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", exact(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", exact(8))
    payload = exact(n)
    return (payload or b"-") if b0 & 0x0F == opcode else b""


def test_paused_client_gets_the_latest_value_when_it_resumes(served):
    """While a client is not reading, updates per PV merge: on resume it gets the latest."""
    port, _ = served
    wfs = [f"GEN:WF{i:02d}" for i in range(16)]
    sock = raw_websocket(port, rcvbuf=4096)
    sock.sendall(
        client_frame(json.dumps({"type": "subscribe", "pvs": [*wfs, "GEN:COUNT"]}).encode())
    )
    paused_s = 1.2  # shorter than the 2 s after which the bridge drops a client
    time.sleep(paused_s)  # the point of the test: a client that does not read for a while
    resumed = time.time()
    counts: list[int] = []
    sock.settimeout(5)
    while True:
        payload = _read_frame(sock)
        if not payload:
            continue
        msg = json.loads(payload)
        if msg.get("pv") == "GEN:COUNT" and "value" in msg:
            counts.append(msg["value"])
            stamp = msg["seconds"] + msg["nanos"] * 1e-9
            if stamp >= resumed:  # caught up with live updates
                break
    sock.close()
    # COUNT ticks at 20 Hz: a client that queued every update would see every value in turn.
    steps = np.diff(counts)
    assert (steps > 1).any(), f"no update was merged while paused: {counts}"
    assert len(counts) < paused_s * 20, counts


def test_ping_message_sends_a_websocket_ping_frame(served):
    port, _ = served
    sock = raw_websocket(port, rcvbuf=4096)
    sock.settimeout(5)
    sock.sendall(client_frame(json.dumps({"type": "ping"}).encode()))
    assert _read_frame(sock, opcode=0x9), "expected a ping frame"
    sock.close()
