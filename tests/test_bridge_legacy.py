"""The old nEDM digitizer protocol against the real IOC on a simulated card."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import websockets
from support import free_port, running, sim_card_toml, write_config

from dtacq_ioc.bridge.legacy import parse_frame

TOKEN = "legacy-token"


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    """`dtacq-ioc run` with the bridge, on one simulated ACQ425ELF; yields (port, host, dir)."""
    from support import random_loopback

    d = tmp_path_factory.mktemp("legacy")
    host = random_loopback()
    port = free_port()
    legacy_port = free_port()
    (d / "triggers").mkdir()
    cfg = write_config(
        d,
        sim_card_toml("L1", host),
        extra=f"""
[bridge]
enabled = true
port = {port}
tokens = ["{TOKEN}"]
slow_client_timeout_s = 5.0
legacy_port = {legacy_port}
""",
    )
    text = cfg.read_text().replace(
        '[ioc]\nname = "test"', '[ioc]\nname = "test"\ntrigger_dir = "triggers"'
    )
    cfg.write_text(text)
    with running(["run", str(cfg)], ready=("127.0.0.1", port), timeout=60):
        yield port, host, d, legacy_port


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.announces: list[str] = []

    async def call(self, command: str, timeout: float = 30.0, embed: bool = True, **args):
        await self.ws.send(json.dumps({"cmd": command, "args": args, "embed": embed}))
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            assert isinstance(raw, bytes), "replies are binary frames"
            (length,) = struct.unpack_from("<i", raw)
            assert length % 4 == 0, "the header is padded to a multiple of 4"
            header, payload = parse_frame(raw)
            if header.get("cmd") == "announce":
                self.announces.append(header["msg"])
                continue
            return header, payload


def url(port: int, token: str | None = None) -> str:
    return f"ws://127.0.0.1:{port}/legacy" + (f"?token={token}" if token else "")


def test_old_page_sequence(ioc):
    port, host, d, _ = ioc

    async def go():
        async with (
            websockets.connect(url(port, TOKEN)) as ws1,
            websockets.connect(url(port, TOKEN)) as ws2,
            websockets.connect(url(port)) as ws3,
        ):
            a, b, ro = Client(ws1), Client(ws2), Client(ws3)
            h, _ = await a.call("initializeWebPage")
            assert h["ok"] and h["result"] == [host]
            h, _ = await a.call("requestDigitizerControl", ip_addr=host)
            assert h["ok"], h
            h, _ = await b.call("requestDigitizerControl", ip_addr=host)
            assert not h["ok"] and "controlled by another client" in h["error"]
            h, _ = await ro.call("requestDigitizerControl", ip_addr=host)
            assert not h["ok"] and "read-only" in h["error"]
            h, _ = await b.call("requestDigitizerControl", ip_addr="10.9.9.9")
            assert not h["ok"] and "not one of the digitizers" in h["error"]

            h, _ = await a.call("getChannels", timeout=60)
            assert h["ok"], h
            mod = h["result"]["modules"][0]
            assert (mod["site"], mod["nchan"], mod["word_size"], mod["min_clkdiv"]) == (
                1, 16, 2, 50,
            )  # fmt: skip
            assert mod["gain_labels"] == {"0": "x1", "1": "x2", "2": "x4", "3": "x8"}

            h, _ = await a.call("setClkDiv", clkdiv=10)
            assert not h["ok"] and "below the module minimum 50" in h["error"]
            h, _ = await a.call("setClkDiv", clkdiv=2000)
            assert h["ok"] and h["result"] == 2000, h

            h, _ = await a.call("performCmd", cmd="gain2=1")
            assert h["ok"], h
            h, _ = await a.call("readCurrentGains")
            assert h["result"]["1"]["1"] == 1
            h, _ = await a.call("performCmd", cmd=["gain=0", "reboot"])
            assert not h["ok"] and "only gain settings" in h["error"]

            source = "class T(Trigger):\n    def trigger(self, v):\n        return True\n"
            h, _ = await a.call("startReadout", trigger=source, should_save=True)
            assert not h["ok"] and str(d / "triggers") in h["error"]
            h, _ = await a.call("checkTrigger", trigger="no_such_trigger")
            assert not h["ok"] and "unknown trigger" in h["error"]

            h, _ = await a.call(
                "startReadout", should_save=True, measurement_name="bridge test", log="legacy"
            )
            assert h["ok"], h

            h, _ = await b.call("requestBufferStream", ip_addr=host)
            assert h["ok"]
            h, _ = await b.call("setClkDiv", clkdiv=3000)
            assert not h["ok"] and "needs control" in h["error"]

            blocks = []
            for _ in range(3):
                h, payload = await a.call("readBuffer", embed=False, channels=[0, 3],
                                          include_counter=True)  # fmt: skip
                assert h["ok"], h
                head = np.frombuffer(payload[:16], "<u4")
                assert head[0] == 0xFF02 and list(head[1:3]) == [0, 3]
                data = np.frombuffer(payload[16:], "<i2")
                assert data.size > 0 and data.size % 2 == 0
                blocks.append(data)
                await asyncio.sleep(0.2)
            h, payload = await b.call("readBuffer", embed=False, channels=[1])
            assert h["ok"] and np.frombuffer(payload[:4], "<u4")[0] == 1
            assert all(b.size == blocks[0].size for b in blocks)

            h, _ = await a.call("stopReadout", timeout=90)
            assert h["ok"], h
            assert h["result"][-1]["type"] == "JobFinished" and "error" not in h["result"][-1]
            files = h["result"][0].get("files") or []
            assert files, h["result"]
            assert list((d / "data").rglob("*.dig")), "the run wrote files"

            h, payload = await a.call("readBuffer", embed=False, channels=[0])
            assert h["ok"] and payload == struct.pack("<I", 0xDEADBEEF)

        # the owner has gone: control is free again
        async with websockets.connect(url(port, TOKEN)) as ws:
            c = Client(ws)
            h, _ = await c.call("requestDigitizerControl", ip_addr=host)
            assert h["ok"], h

    asyncio.run(go())


def test_legacy_port_speaks_the_same_protocol(ioc):
    _, host, _, legacy_port = ioc

    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{legacy_port}/?token={TOKEN}") as ws:
            c = Client(ws)
            h, payload = await c.call("initializeWebPage", embed=False)
            assert h["ok"] and json.loads(payload) == [host]

    asyncio.run(go())


def test_release_is_announced_and_bad_requests_get_errors(ioc):
    port, host, _, _ = ioc

    async def go():
        async with (
            websockets.connect(url(port, TOKEN)) as ws1,
            websockets.connect(url(port)) as ws2,
        ):
            a, watcher = Client(ws1), Client(ws2)
            h, _ = await a.call("requestDigitizerControl", ip_addr=host)
            assert h["ok"]
            await ws2.send("{not json")
            h, _ = await watcher.call("noSuchCommand")
            assert not h["ok"]
            raw = await asyncio.wait_for(ws2.recv(), 5)
            h, _ = parse_frame(raw)
            assert "unknown command" in h["error"]
            h, _ = await a.call("releaseDigitizerControl")
            assert h["ok"]
            h, _ = await watcher.call("initializeWebPage")
            assert any("released" in m for m in watcher.announces)

    asyncio.run(go())
