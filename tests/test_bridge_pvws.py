"""PVWS through real sockets: a generic CA server, a bridge process, WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest
import websockets
from bridge_helpers import (
    bridge_config,
    bridge_process,
    generic_ioc,
    new_port,
    recv_json,
    recv_until,
)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A generic IOC and a bridge with one write token; yields the bridge port and its dir."""
    d = tmp_path_factory.mktemp("pvws")
    port = new_port()
    cfg = bridge_config(d, port, [TOKEN], extra="max_message_bytes = 4096")
    with generic_ioc("GEN:"), bridge_process(cfg, port) as proc:
        yield port, d, proc


def url(port: int, token: str | None = None) -> str:
    return f"ws://127.0.0.1:{port}/pvws/pv" + (f"?token={token}" if token else "")


async def subscribe(ws, *pvs: str) -> dict[str, dict]:
    """Subscribe and return the first update of each PV."""
    await ws.send(json.dumps({"type": "subscribe", "pvs": list(pvs)}))
    first: dict[str, dict] = {}
    while len(first) < len(pvs):
        msg = await recv_json(ws)
        if msg.get("type") == "update" and msg["pv"] in pvs and msg["pv"] not in first:
            first[msg["pv"]] = msg
    return first


def test_first_update_carries_metadata_then_only_changes(served):
    port, _, _ = served

    async def go():
        async with websockets.connect(url(port, TOKEN)) as ws:
            first = await subscribe(ws, "GEN:TEMP", "GEN:MODE", "GEN:NOTE", "GEN:NAN", "GEN:NAME")
            t = first["GEN:TEMP"]
            assert t["vtype"] == "VDouble" and t["units"] == "degC" and t["precision"] == 3
            desc = t.get("description")
            if desc is None:  # looked up beside the value: may come just after
                later = await recv_until(
                    ws, lambda m: m.get("pv") == "GEN:TEMP" and "description" in m
                )
                desc = later["description"]
            assert desc == "a temperature"  # the record's DESC field
            assert (t["min"], t["max"]) == (-50.0, 100.0)
            assert (t["alarm_low"], t["alarm_high"], t["warn_low"], t["warn_high"]) == (
                -40.0, 90.0, -30.0, 80.0,
            )  # fmt: skip
            assert t["severity"] == "NONE" and t["readonly"] is False
            assert isinstance(t["seconds"], int) and isinstance(t["nanos"], int)
            m = first["GEN:MODE"]
            assert m["vtype"] == "VEnum" and m["labels"] == ["Off", "Slow", "Fast"]
            assert first["GEN:NOTE"]["vtype"] == "VString"
            assert first["GEN:NAN"]["value"] == "NaN"
            assert first["GEN:NAME"]["text"] == "short"

            await ws.send(json.dumps({"type": "write", "pv": "GEN:TEMP", "value": 42.25}))
            upd = await recv_until(ws, lambda m: m.get("pv") == "GEN:TEMP" and "value" in m)
            assert upd["value"] == 42.25
            assert "vtype" not in upd and "units" not in upd and "labels" not in upd

            await ws.send(json.dumps({"type": "write", "pv": "GEN:MODE", "value": "Fast"}))
            upd = await recv_until(ws, lambda m: m.get("pv") == "GEN:MODE" and "value" in m)
            assert (upd["value"], upd["text"]) == (2, "Fast")
            await ws.send(json.dumps({"type": "write", "pv": "GEN:NOTE", "value": "x" * 500}))
            upd = await recv_until(ws, lambda m: m.get("pv") == "GEN:NOTE" and "text" in m)
            assert upd["text"] == "x" * 500

    asyncio.run(go())


def test_values_match_caget(served):
    """Waveform and scalar decode to what pyepics (the C client) reads for the same timestamp."""
    import epics

    port, _, _ = served

    async def collect(seconds: float) -> dict[tuple[int, int], np.ndarray]:
        got: dict[tuple[int, int], np.ndarray] = {}
        async with websockets.connect(url(port)) as ws:
            first = await subscribe(ws, "GEN:WF00", "GEN:FWF")
            assert first["GEN:WF00"]["vtype"] == "VShortArray"
            assert first["GEN:FWF"]["vtype"] == "VDoubleArray"
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                msg = await recv_json(ws)
                if msg.get("pv") == "GEN:WF00":
                    raw = base64.b64decode(msg["b64srt"])
                    got[(msg["seconds"], msg["nanos"])] = np.frombuffer(raw, "<i2")
        return got

    def caget_later():
        time.sleep(1.0)
        return epics.PV("GEN:WF00", form="time").get_with_metadata(timeout=5)

    async def both():
        task = asyncio.create_task(collect(2.5))
        reading = await asyncio.to_thread(caget_later)
        return await task, reading

    got, reading = asyncio.run(both())
    assert reading is not None
    stamp = reading["timestamp"]
    match = [v for (s, ns), v in got.items() if abs(s + ns * 1e-9 - stamp) < 1e-4]
    assert match, f"no bridge update with the caget timestamp {stamp}"
    assert np.array_equal(match[0], np.asarray(reading["value"], dtype=np.int16))
    assert epics.caget("GEN:TEMP") is not None


def test_list_echo_ping_clear_and_unknown(served):
    port, _, _ = served

    async def go():
        async with websockets.connect(url(port)) as ws:
            await subscribe(ws, "GEN:COUNT")
            await ws.send(json.dumps({"type": "subscribe", "pvs": ["NO:SUCH:PV"]}))
            err = await recv_until(ws, lambda m: m.get("type") == "error", timeout=10)
            assert err["pv"] == "NO:SUCH:PV" and "not found" in err["message"]
            upd = await recv_until(ws, lambda m: m.get("pv") == "NO:SUCH:PV")
            assert upd["severity"] == "UNDEFINED" and upd["connected"] is False
            await ws.send(json.dumps({"type": "list"}))
            lst = await recv_until(ws, lambda m: m.get("type") == "list")
            assert lst["pvs"] == ["GEN:COUNT", "NO:SUCH:PV"]
            await ws.send(json.dumps({"type": "clear", "pvs": ["GEN:COUNT", "NO:SUCH:PV"]}))
            await ws.send(json.dumps({"type": "list"}))
            lst = await recv_until(ws, lambda m: m.get("type") == "list")
            assert lst["pvs"] == []
            pong = await ws.ping()  # our ping; the bridge's ping frame is answered by the library
            await asyncio.wait_for(pong, 5)
            await ws.send(json.dumps({"type": "ping"}))
            await ws.send(json.dumps({"type": "echo", "body": [1, "two"]}))
            echo = await recv_until(ws, lambda m: m.get("type") == "echo")
            assert echo == {"type": "echo", "body": [1, "two"]}
            # after clear, no more COUNT updates arrive
            await ws.send(json.dumps({"type": "echo", "mark": 1}))
            with pytest.raises(TimeoutError):
                await recv_until(ws, lambda m: m.get("pv") == "GEN:COUNT", timeout=0.5)

    asyncio.run(go())


def test_writes_need_a_token(served):
    port, _, _ = served

    async def current(ws, pv):
        await ws.send(json.dumps({"type": "clear", "pvs": [pv]}))
        await ws.send(json.dumps({"type": "subscribe", "pvs": [pv]}))
        # A change sent before the clear may still be on its way: the new subscription's
        # first update is the one that carries the whole state.
        return await recv_until(
            ws, lambda m: m.get("type") == "update" and m.get("pv") == pv and "readonly" in m
        )

    async def go():
        async with websockets.connect(url(port)) as ro:
            first = await subscribe(ro, "GEN:TEMP")
            assert first["GEN:TEMP"]["readonly"] is True
            before = first["GEN:TEMP"]["value"]
            await ro.send(json.dumps({"type": "write", "pv": "GEN:TEMP", "value": before + 1}))
            err = await recv_until(ro, lambda m: m.get("type") == "error")
            assert "read-only" in err["message"]
            assert (await current(ro, "GEN:TEMP"))["value"] == before

        async with websockets.connect(url(port, "wrong")) as bad:
            await subscribe(bad, "GEN:TEMP")
            await bad.send(json.dumps({"type": "write", "pv": "GEN:TEMP", "value": 7.0}))
            assert (
                "read-only"
                in (await recv_until(bad, lambda m: m.get("type") == "error"))["message"]
            )

        async with websockets.connect(url(port)) as auth:
            await auth.send(json.dumps({"type": "auth", "token": TOKEN}))
            first = await subscribe(auth, "GEN:TEMP")
            assert first["GEN:TEMP"]["readonly"] is False
            await auth.send(json.dumps({"type": "write", "pv": "GEN:TEMP", "value": 12.5}))
            upd = await recv_until(auth, lambda m: m.get("pv") == "GEN:TEMP" and "value" in m)
            assert upd["value"] == 12.5
            await auth.send(json.dumps({"type": "auth", "token": TOKEN}))
            err = await recv_until(auth, lambda m: m.get("type") == "error")
            assert "first message" in err["message"]

    asyncio.run(go())


def test_bad_writes_get_clear_errors(served):
    port, _, _ = served
    cases = [
        ({"pv": "GEN:TEMP", "value": "warm"}, "takes a number"),
        ({"pv": "GEN:TEMP", "value": 1000}, "outside"),
        ({"pv": "GEN:RO", "value": 1}, "read-only"),
        ({"pv": "GEN:MODE", "value": "Turbo"}, "is not one of"),
        ({"pv": "GEN:MODE", "value": 9}, "out of range"),
        ({"pv": "GEN:COUNT", "value": 1.5}, "integer"),
        ({"pv": "GEN:COUNT", "value": [1, 2]}, "scalar"),
        ({"pv": "GEN:COUNT", "value": None}, "number, string or list"),
        ({"pv": "GEN:NOT:SUBSCRIBED", "value": 1}, "subscribe to it first"),
        ({"pv": 5, "value": 1}, '"pv"'),
        ({"pv": "GEN:TEMP"}, '"value"'),
    ]

    async def go():
        async with websockets.connect(url(port, TOKEN)) as ws:
            first = await subscribe(ws, "GEN:TEMP", "GEN:RO", "GEN:MODE", "GEN:COUNT")
            temp = first["GEN:TEMP"]["value"]
            for body, expect in cases:
                await ws.send(json.dumps({"type": "write", **body}))
                err = await recv_until(ws, lambda m: m.get("type") == "error")
                assert expect in err["message"], (body, err)
            await ws.send(json.dumps({"type": "clear", "pvs": ["GEN:TEMP"]}))
            again = await subscribe(ws, "GEN:TEMP")
            assert again["GEN:TEMP"]["value"] == temp

    asyncio.run(go())


def test_oversized_message_closes_with_1009(served):
    port, _, _ = served

    async def go():
        async with websockets.connect(url(port), max_size=None) as ws:
            await ws.send(json.dumps({"type": "echo", "pad": "x" * 10000}))
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1009
        async with websockets.connect(url(port)) as ws:  # the bridge still serves
            await ws.send(json.dumps({"type": "echo"}))
            assert (await recv_json(ws))["type"] == "echo"

    asyncio.run(go())


def test_page_and_data_files(served):
    port, d, _ = served
    (d / "data" / "run1").mkdir(exist_ok=True)
    (d / "data" / "run1" / "a.dig").write_bytes(b"\x04\x00\x00\x00{}  ")
    (d / "secret.txt").write_text("outside")
    link = d / "data" / "escape"
    if not link.exists():
        link.symlink_to(d / "secret.txt")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=5) as http:
        page = http.get(base + "/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert http.get(base + "/data/run1/a.dig").content == b"\x04\x00\x00\x00{}  "
        assert http.get(base + "/data/escape").status_code == 404
        assert http.get(base + "/data/%2e%2e/secret.txt").status_code == 404
        assert http.get(base + "/data/..%2fsecret.txt").status_code == 404
        assert http.post(base + "/data/run1/a.dig").status_code == 405
    assert (d / "data" / "run1" / "a.dig").exists()


def test_disconnected_pv_is_reported(tmp_path):
    port = new_port()
    cfg = bridge_config(tmp_path, port)

    async def go(ioc):
        async with websockets.connect(url(port)) as ws:
            first = await subscribe(ws, "GONE:TEMP")
            assert first["GONE:TEMP"]["severity"] == "NONE"
            ioc.terminate()
            upd = await recv_until(ws, lambda m: m.get("pv") == "GONE:TEMP", timeout=30)
            assert upd["severity"] == "UNDEFINED" and upd["connected"] is False

    ca_port = new_port()
    with generic_ioc("GONE:", ca_port=ca_port) as ioc, bridge_process(cfg, port, ca_port):
        asyncio.run(go(ioc))
