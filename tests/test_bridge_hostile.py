"""Hostile clients against a real bridge and a real CA server: nothing one client does
stops another, memory stays bounded, and each kind of refusal is at most a line or two
in the log. The long version (40,000 names, tens of thousands of messages) is
bench/hostile.py."""

from __future__ import annotations

import json
import socket
import time

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
from support import output
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from dtacq_ioc.bridge.legacy import parse_frame

MAX_BYTES = 16384
SEARCH_S = 1.0
PENDING = 300
EXTRA = f"""max_message_bytes = {MAX_BYTES}
max_subscriptions = 6000
max_pending_searches = {PENDING}
search_timeout_s = {SEARCH_S}
slow_client_timeout_s = 5.0"""
SMALL_SUBS, SMALL_PENDING = 40, 5
SMALL = f"""max_subscriptions = {SMALL_SUBS}
max_pending_searches = {SMALL_PENDING}
search_timeout_s = {SEARCH_S}"""


@pytest.fixture(scope="module")
def ioc():
    with generic_ioc("GEN:", rate=20, npoints=1024, nwave=2) as proc:
        yield proc


def _bridge(tmp_path_factory, extra: str):
    d = tmp_path_factory.mktemp("hostile")
    port = new_port()
    cfg = bridge_config(d, port, ["tok"], extra=extra)
    (d / "data" / "run.txt").write_text("a run file")
    with bridge_process(cfg, port) as proc:
        yield port, proc


@pytest.fixture(scope="module")
def served(ioc, tmp_path_factory):
    yield from _bridge(tmp_path_factory, EXTRA)


@pytest.fixture(scope="module")
def small(ioc, tmp_path_factory):
    """A bridge with small caps: 40 PVs per client, 5 looked up at once."""
    yield from _bridge(tmp_path_factory, SMALL)


def pvws(port: int) -> str:
    return f"ws://127.0.0.1:{port}/pvws/pv"


def resolves(port: int, pv: str = "GEN:TEMP", timeout: float = 10.0) -> float:
    """A fresh client subscribes to a served PV: seconds until its first value."""
    t0 = time.monotonic()
    with connect(pvws(port)) as ws:
        ws.send(json.dumps({"type": "subscribe", "pvs": [pv]}))
        while True:
            msg = json.loads(ws.recv(max(0.1, timeout - (time.monotonic() - t0))))
            assert msg.get("type") != "error", f"a fresh client was refused {pv}: {msg}"
            if msg.get("pv") == pv and "vtype" in msg:  # the first update: metadata and value
                return time.monotonic() - t0


def until_errors(ws, count: int, timeout: float) -> list[dict]:
    """Read until `count` error messages have come; the updates between are skipped."""
    errors: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(errors) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(errors)} of {count} errors within {timeout} s"
        msg = json.loads(ws.recv(left))
        if msg.get("type") == "error":
            errors.append(msg)
    return errors


def peer_lines(proc, ws) -> list[str]:
    host, port = ws.socket.getsockname()[:2]
    return [line for line in output(proc).splitlines() if f"{host}:{port}" in line]


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def no_tracebacks(proc) -> None:
    log = output(proc)
    assert "Traceback" not in log, log[-4000:]
    assert "Attempt to send on a closed protocol" not in log, log[-4000:]


def test_unknown_names_are_forgotten_and_never_block_a_fresh_client(served):
    port, proc = served
    batch = 1000  # one message of names; PENDING of them are looked up at once
    with connect(pvws(port), max_size=None) as ws:

        def one_round(r: int, probe: str | None = None) -> None:
            names = [f"U:{r}:{i}" for i in range(batch)]
            ws.send(json.dumps({"type": "subscribe", "pvs": names}))
            if probe:  # while this client's names are being looked up, another resolves
                resolves(port, probe)
            errors = until_errors(ws, batch, timeout=30 + 10 * SEARCH_S)
            assert {e["pv"] for e in errors} == set(names)
            assert all("not found" in e["message"] for e in errors)
            ws.send(json.dumps({"type": "clear", "pvs": names}))

        one_round(-1)  # warms the bridge up: the baseline holds one round's worth
        before = rss(proc)
        for r, probe in enumerate(["GEN:TEMP", "GEN:MODE", "GEN:NAN", "GEN:NAME", "GEN:FWF"]):
            one_round(r, probe)
        grown = rss(proc) - before
        # Unforgotten, every name kept ~7.5 KB (and 5,000 of them blocked new searches).
        assert grown < 10 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB over 5,000 names"
        resolves(port, "GEN:RO")
        lines = peer_lines(proc, ws)
    assert len(lines) <= 3, lines  # connected, and one line for 6,000 names not found
    no_tracebacks(proc)


def test_caps_a_client_and_its_searches(small):
    port, proc = small
    with connect(pvws(port), max_size=None) as ws:
        names = [f"CAP:{i}" for i in range(SMALL_SUBS + 20)]
        ws.send(json.dumps({"type": "subscribe", "pvs": names}))
        refusal = until_errors(ws, 1, timeout=10)[0]
        assert refusal["message"] == (
            f"20 PV names refused: at most {SMALL_SUBS} PVs per connection (clear some first)"
        )
        t0 = time.monotonic()
        resolves(port, "GEN:TEMP")  # meanwhile: another client's search is not held up
        errors = until_errors(ws, SMALL_SUBS, timeout=30 + 10 * SMALL_SUBS * SEARCH_S)
        waves = SMALL_SUBS // SMALL_PENDING
        # 5 at a time, each wave a search timeout long: the rest waited their turn.
        assert time.monotonic() - t0 >= 0.9 * (waves - 1) * SEARCH_S
        assert sorted(e["pv"] for e in errors) == sorted(names[:SMALL_SUBS])
        ws.send(json.dumps({"type": "list"}))
        while (msg := json.loads(ws.recv(10))).get("type") != "list":
            pass
        assert msg["pvs"] == sorted(names[:SMALL_SUBS])
        # A forgotten name is searched again when asked again (and still not found).
        ws.send(json.dumps({"type": "subscribe", "pvs": ["CAP:3"]}))
        assert until_errors(ws, 1, timeout=10)[0]["pv"] == "CAP:3"
        # Clearing makes room again, and a served PV then resolves on this connection too.
        ws.send(json.dumps({"type": "clear", "pvs": msg["pvs"]}))
        ws.send(json.dumps({"type": "subscribe", "pvs": ["GEN:COUNT"]}))
        while not ((msg := json.loads(ws.recv(10))).get("pv") == "GEN:COUNT" and "value" in msg):
            assert msg.get("type") != "error", msg
        lines = peer_lines(proc, ws)
    assert len(lines) <= 4, lines  # connected, the refusal, names not found
    no_tracebacks(proc)


# -- a bounded fuzz of malformed and hostile messages --


def _deep(n: int, open_: str, close: str, inner: str = "1") -> str:
    return open_ * n + inner + close * n


def _hostile():
    depth = st.integers(33, MAX_BYTES // 2 - 40)  # every message within MAX_BYTES
    text = st.text(max_size=40)
    return st.one_of(
        depth.map(lambda n: _deep(n, "[", "]")),
        st.integers(33, MAX_BYTES // 6).map(lambda n: _deep(n, '{"a":', "}")),
        depth.map(lambda n: '{"type":"echo","x":' + _deep(n, "[", "]") + "}"),
        depth.map(lambda n: '{"type":"subscribe","pvs":' + _deep(n, "[", "]", '"X"') + "}"),
        st.integers(33, 3000).map(lambda n: "[" * n),  # unterminated
        st.integers(4400, MAX_BYTES - 1).map(lambda n: "1" * n),  # past Python's digit limit
        st.sampled_from(["NaN", "Infinity", "-Infinity", '{"type":"echo","v":NaN}']),
        st.sampled_from(['"\\ud800"', '{"type":"\\udfff"}', '{"type":"clear","pvs":["\\ud800"]}']),
        text.map(lambda t: '{"type":"echo","s":"' + t.replace('"', "")),  # unterminated string
        st.binary(max_size=300).map(lambda b: b"\xc0\xae" + b),  # a binary frame
        st.lists(text, max_size=30).map(
            lambda names: json.dumps({"type": "subscribe", "pvs": [n + " " for n in names] or 1})
        ),
        st.dictionaries(
            text,
            st.recursive(
                st.none() | st.integers() | text, lambda c: st.lists(c, max_size=3), max_leaves=10
            ),
            max_size=5,
        ).map(lambda d: json.dumps({**d, "type": 7})),
    )


def test_fuzz_of_hostile_messages_on_both_protocols(served):
    port, proc = served
    legacy = f"ws://127.0.0.1:{port}/legacy"
    before = rss(proc)
    sent = {"pvws": 0, "legacy": 0}
    watch = connect(pvws(port), ping_interval=None)  # reads only after: no keepalive
    with connect(pvws(port)) as pv, connect(legacy) as old, watch as watcher:
        watcher.send(json.dumps({"type": "subscribe", "pvs": ["GEN:COUNT"]}))
        assert json.loads(watcher.recv(10))["pv"] == "GEN:COUNT"

        @settings(max_examples=1500, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(_hostile())
        def one(message):
            pv.send(message)  # bytes go as a binary frame
            reply = json.loads(pv.recv(10))
            assert reply["type"] == "error" and "Traceback" not in reply["message"], reply
            sent["pvws"] += 1
            old.send(message)
            header, _ = parse_frame(old.recv(10))
            # The old server's error reply: "error" in words and no "ok" key at all.
            assert "ok" not in header and "Traceback" not in header["error"], header
            sent["legacy"] += 1

        one()
        assert sent == {"pvws": 1500, "legacy": 1500}
        pv_lines, old_lines = peer_lines(proc, pv), peer_lines(proc, old)
        # Each connection is still served after all of it.
        pv.send(json.dumps({"type": "echo", "n": 1}))
        assert json.loads(pv.recv(10)) == {"type": "echo", "n": 1}
        old.send(json.dumps({"cmd": "initializeWebPage"}))
        assert parse_frame(old.recv(10))[0]["ok"] is True
        t_end, seen = time.monotonic() + 1.0, 0
        while time.monotonic() < t_end:
            seen += json.loads(watcher.recv(5)).get("pv") == "GEN:COUNT"
        assert seen >= 5, "the watcher was starved"
    resolves(port)
    grown = rss(proc) - before
    assert grown < 20 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB"
    # connected + at most one line per kind of refusal (malformed, refused)
    assert len(pv_lines) <= 4 and len(old_lines) <= 4, (pv_lines, old_lines)
    no_tracebacks(proc)


# -- closed sockets, oversized messages, bad URLs --


def test_replies_and_updates_meeting_a_closing_socket_are_dropped_quietly(served):
    port, proc = served
    for i in range(20):
        # Updates at 20 Hz, then a text frame that is not UTF-8: the bridge starts its close
        # and waits for the client's, which never comes; updates keep arriving meanwhile.
        sock = raw_websocket(port)
        sub = {"type": "subscribe", "pvs": ["GEN:COUNT", "GEN:WF00", "GEN:WF01"]}
        sock.sendall(client_frame(json.dumps(sub).encode()))
        sock.sendall(client_frame(b'{"type":"echo","x":"\xc0\xae"}'))
        # The nEDM protocol: a reply due after a search that takes SEARCH_S, closed before.
        with connect(f"ws://127.0.0.1:{port}/legacy") as old:
            old.send(json.dumps({"cmd": "requestBufferStream", "args": {"ip_addr": "127.0.0.1"}}))
            assert parse_frame(old.recv(10))[0]["ok"]
            old.send(json.dumps({"cmd": "getChannels"}))
        if i % 5 == 4:
            time.sleep(2.5)  # let some closes time out with updates pending (closeHandshake 2 s)
        sock.close()
    resolves(port)
    no_tracebacks(proc)
    log = output(proc)
    assert log.count("dropping connection") <= 3, log[-3000:]


def test_oversized_message_closes_with_one_line(served):
    port, proc = served
    for _ in range(30):
        with connect(pvws(port), max_size=None) as ws:
            ws.send(json.dumps({"type": "echo", "pad": "x" * MAX_BYTES}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    resolves(port)
    no_tracebacks(proc)


@pytest.mark.parametrize(
    "path, codes",
    [
        ("/data/%00", {400}),
        ("/data/a%00b.dig", {400}),
        ("/data/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd", {400}),
        ("/data/%ff%fe", {400}),
        ("/%00", {400}),
        ("/index.html%00", {400}),
        ("/data/..%2f..%2fetc%2fpasswd", {404}),
        ("/data/%2e%2e/%2e%2e/etc/passwd", {404}),
        ("/data/" + "a" * 4000, {404}),
        ("/data/run.txt", {200}),
    ],
)
def test_bad_urls_get_a_clean_status_and_no_traceback(served, path, codes):
    port, proc = served
    for _ in range(20):  # twenty times: still at most a line in the log
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            status = sock.recv(4096).split(b"\r\n", 1)[0]
        assert int(status.split()[1]) in codes, (path, status)
    no_tracebacks(proc)
    assert output(proc).count("path segment") == 0
