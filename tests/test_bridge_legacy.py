"""The old nEDM digitizer protocol against the real IOC on a simulated card, with the
experiment's database (pouchdb-server) and file server (the stand-in) behind it.

The client is tests/old_page_client.py: what the old page sends, read as it reads it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct

import httpx
import numpy as np
import pytest
import websockets
from conftest import COUCH_ADMIN, COUCH_DB, COUCH_WRITER, PouchServer
from file_server_standin import FileServerStandIn
from old_page_client import OldPage
from support import free_port, random_loopback, running, sim_card_toml, write_config

from dtacq_ioc.archive.dig import read_dig
from dtacq_ioc.bridge.legacy import parse_frame

TOKEN = "legacy-token"
TRIGGER = '''
from dtacq_ioc.readout.triggers import TimeLimit


class ThreeSeconds(TimeLimit):
    """Write three seconds, then end the run by itself."""

    NAME = "three_seconds"

    def __init__(self):
        super().__init__(seconds=3.0)
'''
OLD_KEYS = {"mods", "divide", "current_clk_div", "readout_size", "max_buffer", "min_buffer",
            "gain_settings", "ext_frequency", "current_gains", "sysclk"}  # fmt: skip
DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")  # str(datetime.utcnow())


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    """`dtacq-ioc run` with the bridge and CouchDB behind a file server, on one simulated
    ACQ425ELF; the old page's host (127.0.0.1) may write on the legacy endpoint."""
    d = tmp_path_factory.mktemp("legacy")
    couch = PouchServer(d)
    couch.start()
    files = FileServerStandIn(couch.url, COUCH_ADMIN, d / "file_server").start()
    host = random_loopback()
    port, legacy_port = free_port(), free_port()
    (d / "triggers").mkdir()
    (d / "triggers" / "three_seconds.py").write_text(TRIGGER)
    archive = f"""
backend = "couchdb"
retry_max_s = 2.0
[archive.couchdb]
url = "{couch.url}"
db = "{COUCH_DB}"
user = "{COUCH_WRITER[0]}"
password = "{COUCH_WRITER[1]}"
file_server = "{files.url}"
timeout_s = 10.0
[bridge]
enabled = true
port = {port}
tokens = ["{TOKEN}"]
slow_client_timeout_s = 5.0
legacy_port = {legacy_port}
legacy_write_hosts = ["127.0.0.1"]
"""
    cfg = write_config(d, sim_card_toml("L1", host), extra=archive)
    text = cfg.read_text().replace(
        '[ioc]\nname = "test"', '[ioc]\nname = "test"\ntrigger_dir = "triggers"'
    )
    cfg.write_text(text)
    try:
        with running(["run", str(cfg)], ready=("127.0.0.1", port), timeout=60) as proc:
            yield {"port": port, "host": host, "dir": d, "legacy_port": legacy_port,
                   "couch": couch, "files": files, "proc": proc}  # fmt: skip
    finally:
        files.stop()
        couch.stop()


def page_url(ioc) -> str:
    return f"ws://127.0.0.1:{ioc['legacy_port']}"  # "ws://" + host_ip, no path


async def poll_run(page: OldPage, channels: list[int], want: int) -> tuple[list, int]:
    """Poll as the page does until `want` buffers arrived; count the header-only replies."""
    buffers, empty = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while len(buffers) < want and loop.time() < deadline:
        got = await page.read_buffer(channels)
        assert not got.done, "the run ended before enough buffers came"
        if got.header_only:
            assert got.channels == channels
            empty += 1
        else:
            buffers.append(got)
    return buffers, empty


def test_the_old_page_runs_the_card(ioc):
    host = ioc["host"]

    async def go():
        async with websockets.connect(page_url(ioc)) as ws:
            page = OldPage(ws)
            reply = await page.initialize()
            assert reply.result == {"urls": [host]}
            assert not (await page.request_control(host)).refused

            reply = await page.get_channels()
            s = reply.result
            assert set(s) == OLD_KEYS, s
            assert s["mods"] == {"1": 16} and s["readout_size"] == 2 and s["divide"] == 1
            assert s["gain_settings"] == {"0": "x1", "1": "x2", "2": "x4", "3": "x8"}
            assert sorted(s["current_gains"]["1"], key=int) == [str(i) for i in range(16)]
            assert s["ext_frequency"] == 0 and isinstance(s["sysclk"], int)
            assert s["min_buffer"] == (1 << 20) // 2 and s["max_buffer"] >= s["min_buffer"]

            # Gains as the page writes them, read back 0-based.
            assert not (await page.send_gains({("1", 2): 3})).refused
            await page.get_channels()
            assert page.settings["current_gains"]["1"]["2"] == 3

            # A fractional clkdiv (the page divides clocks) is truncated.
            reply = await page.set_frequency_khz(30.0)
            want = int(page.settings["sysclk"] / 1 / 30000.0)
            assert not reply.refused and reply.result == want, reply.header
            clock = float(page.settings["sysclk"])  # a front-panel clock as fast as the card's
            reply = await page.use_external_clock(clock)
            assert not reply.refused and reply.result == clock, reply.header
            reply = await page.use_external_clock(None)
            assert not reply.refused and reply.result == 0, reply.header

            # Every refusal is an error to the page (no "ok" key).
            before = len(page.errors)
            assert (await page.set_clkdiv(10.5)).refused
            assert (await page.send_gains({("1", 0): 99})).refused
            assert (await page.check_trigger("class T(Trigger):\n  pass")).refused
            assert (await page._send({"cmd": "performCmd", "embed": True,
                                      "args": {"cmd": ["reboot"]}})).refused  # fmt: skip
            assert len(page.errors) == before + 4 and all(page.errors[before:])
            assert (await page.read_buffer([0])).channels == []  # no run: refused
            assert page.errors[-1] == "measurement is not running"

            words = 16 * 3000  # the page's time window * channels * kHz
            for run in range(3):
                reply = await page.start(
                    should_upload=True, should_save=True, measurement_name="old page",
                    log=f"run {run}", trigger="three_seconds", logitems={"operator": "kim"},
                    buffer_size=words, downsample=1, channel_list=[0, 1, 2], mod_list=[1],
                )  # fmt: skip
                assert not reply.refused and "result" not in reply.header, reply.header
                if run == 0:
                    buffers, empty = await poll_run(page, [0, 5], want=4)
                    assert len(buffers) == 4 and empty >= 1, "header-only replies in between"
                    firsts = [b.data[0].tobytes() for b in buffers]
                    assert len(set(firsts)) == len(firsts), "a new buffer on every data reply"
                    assert all(b.data[0].size == b.data[5].size > 0 for b in buffers)
                    # Whole run buffers (RUN:BUFFER): the words asked for, in whole samples
                    # of 16 channels and 2 spad words (4 of 16 bits), per channel.
                    assert all(b.data[0].size == -(-words // 20) for b in buffers)
                doc = await page.wait_event("DocUpload")
                upload = await page.wait_event("FileUpload")
                done = await page.wait_event("JobFinished")
                assert done == {"type": "JobFinished", "msg": "Readout job completed"}, done
                assert (await page.read_buffer([0])).done  # 0xdeadbeef
                check_delivery(ioc, doc["id"], upload, run)
            # Stop answers at once; the end comes as announces, the files included.
            reply = await page.start(should_upload=True, should_save=True, mod_list=[1],
                                     buffer_size=words, channel_list=[0])  # fmt: skip
            assert not reply.refused, reply.header
            again = await page.start(should_upload=False, mod_list=[1])
            assert again.refused and "already running" in again.header["error"]
            await poll_run(page, [0], want=1)
            reply = await page.stop()
            assert not reply.refused and set(reply.header) == {"cmd", "ok"}
            doc = await page.wait_event("DocUpload")
            check_delivery(ioc, doc["id"], await page.wait_event("FileUpload"), None)
            assert (await page.wait_event("JobFinished")).get("msg") == "Readout job completed"
            assert page.errors == [e for e in page.errors if e]  # nothing silent
            await page.close()

    asyncio.run(go())
    # Each file reached the file server once: no retry loop.
    names = [p.rsplit("/", 1)[-1] for p in ioc["files"].puts]
    assert len(names) == len(set(names)) >= 3, names


def check_delivery(ioc, doc_id: str, upload: dict, run: int | None) -> None:
    """The name, the document, the file server and the page's link agree, byte for byte."""
    name = upload["file_name"]
    assert re.fullmatch(r"[0-9A-Za-z._-]+\.dig", name), name  # needs no percent-encoding
    assert upload["url"] == f"/_attachments/{COUCH_DB}/{doc_id}/{name}"
    local = next((ioc["dir"] / "data").rglob(name))
    data = local.read_bytes()
    files = ioc["files"].url
    assert httpx.get(files + upload["url"], auth=COUCH_WRITER).content == data
    # pynedm's download_file/open_file: '/'.join([uri, '_attachments', db, docid, name])
    pynedm = "/".join([files, "_attachments", COUCH_DB, doc_id, name])
    head = httpx.get(pynedm, auth=COUCH_WRITER, headers={"Range": "bytes=0-3"}).content
    assert head == data[:4]
    doc = httpx.get(f"{ioc['couch'].url}/{COUCH_DB}/{doc_id}", auth=COUCH_ADMIN).json()
    entry = doc["external_docs"][name]
    assert entry["ondiskname"] == name and entry["size"] == len(data)
    assert doc["type"] == "measurement" and doc["log"] == (f"run {run}" if run is not None else "")
    assert run is None or doc["operator"] == "kim"
    assert DATE.match(doc["date"]), doc["date"]
    assert doc["channels"] == 20  # NCHAN: 16 channels and the spad's 4 words
    assert isinstance(doc["freq_hz"], float) and doc["filename"] == name
    assert sorted(doc["current_gains"]["1"], key=int)[0] == "0"
    header, _ = read_dig(local)  # the .dig header is the posted document
    for key in (
        "type",
        "channels",
        "channel_list",
        "date",
        "current_gains",
        "freq_hz",
        "measurement_name",
        "log",
        "operator",
        "gain_conversion",
        "byte_depth",
    ):
        assert header.get(key) == doc.get(key), key
    assert header["filename"] == name


def test_a_client_from_another_address_cannot_control(ioc):
    """Only the configured write hosts control cards without a token."""

    async def go():
        async with websockets.connect(page_url(ioc), local_addr=("127.0.0.2", 0)) as ws:
            page = OldPage(ws)
            reply = await page.request_control(ioc["host"])
            assert reply.refused and "read-only" in reply.header["error"]
            assert set(reply.header) == {"cmd", "error"}
            await page.close()

    asyncio.run(go())


def test_a_socket_closed_before_its_handshake_ends_cleanly(ioc):
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", ioc["legacy_port"])) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
    # The IOC still serves, and logged nothing about it.

    async def go():
        async with websockets.connect(page_url(ioc)) as ws:
            page = OldPage(ws)
            assert (await page.initialize()).result == {"urls": [ioc["host"]]}
            await page.close()

    asyncio.run(go())
    log = b"".join(ioc["proc"].chunks).decode(errors="replace")
    assert "Traceback" not in log and "AttributeError" not in log


def test_scripts_with_a_token_and_bad_requests(ioc):
    port, host = ioc["port"], ioc["host"]

    async def call(ws, command: str, **args):
        await ws.send(json.dumps({"cmd": command, "args": args, "embed": True}))
        while True:
            header, payload = parse_frame(await asyncio.wait_for(ws.recv(), 30))
            if header.get("cmd") != "announce":
                return header, payload

    async def go():
        async with (
            websockets.connect(f"ws://127.0.0.1:{port}/legacy?token={TOKEN}") as a,
            websockets.connect(f"ws://127.0.0.1:{port}/legacy?token={TOKEN}") as b,
        ):
            h, _ = await call(a, "requestDigitizerControl", ip_addr=host)
            assert h == {"cmd": "requestDigitizerControl", "ok": True}
            h, _ = await call(b, "requestDigitizerControl", ip_addr=host)
            assert "ok" not in h and "controlled by another client" in h["error"]
            h, _ = await call(b, "requestDigitizerControl", ip_addr="10.9.9.9")
            assert "ok" not in h and "not one of the digitizers" in h["error"]
            h, _ = await call(b, "noSuchCommand")
            assert h["cmd"] == "noSuchCommand" and "unknown command" in h["error"]
            await b.send("{not json")
            h, _ = parse_frame(await asyncio.wait_for(b.recv(), 10))
            assert "ok" not in h and "malformed JSON" in h["error"]
            h, _ = await call(a, "performCmd", cmd="gain2=1")
            assert h == {"cmd": "performCmd", "ok": True, "result": ""}
            h, _ = await call(a, "readCurrentGains")
            assert h["result"]["1"]["1"] == 1
            h, _ = await call(a, "releaseDigitizerControl")
            assert h["ok"]
            raw = await asyncio.wait_for(b.recv(), 10)
            h, _ = parse_frame(raw)
            assert h["cmd"] == "announce" and h["ok"] and "released" in h["msg"]
            (length,) = struct.unpack_from("<i", raw)
            assert length % 4 == 0, "the header is padded to a multiple of 4"

    asyncio.run(go())


def test_read_buffer_hands_out_each_run_buffer_once(tmp_path):
    """Against an IOC that publishes RUN:BUFFER (tests/run_buffer_ioc.py): the newest
    buffer not yet handed to this client, channel-major, shifted; the header alone while
    none is new; the counter counts buffers (display frames are not buffers)."""
    import subprocess
    import sys

    import run_buffer_ioc as rb
    from bridge_helpers import bridge_config, bridge_process, ca_env
    from support import ROOT, child_env

    # A CA port of its own: the module's IOC may be serving on this process's port.
    ca_port = free_port()
    ioc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "run_buffer_ioc.py"), "GEN:"],
        env=child_env(PYTHONPATH=str(ROOT / "tests"), **ca_env(ca_port)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    port = free_port()
    try:
        with bridge_process(bridge_config(tmp_path, port), port, ca_port):

            async def go():
                async with websockets.connect(f"ws://127.0.0.1:{port}/legacy") as ws:
                    page = OldPage(ws)
                    await ws.send(json.dumps({"cmd": "requestBufferStream",
                                              "args": {"ip_addr": "127.0.0.1"}}))  # fmt: skip
                    page.settings["readout_size"] = 4
                    seen, empty, counters = [], 0, []
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 60
                    while len(seen) < 4 and loop.time() < deadline:
                        await ws.send(json.dumps({"cmd": "readBuffer", "ip": True, "args": {
                            "channels": [3, 1], "include_counter": True}}))  # fmt: skip
                        reply = await asyncio.wait_for(page._replies_for("readBuffer"), 30)
                        if reply.refused and "not connected" in reply.header["error"]:
                            continue  # the IOC is still starting
                        assert not reply.refused, reply.header
                        head = np.frombuffer(reply.data, "<u4", 4, reply.offset)
                        assert head[0] == 0xFF02 and list(head[1:3]) == [3, 1]
                        data = np.frombuffer(reply.data, "<i4", offset=reply.offset + 16)
                        if data.size == 0:
                            empty += 1
                            continue
                        ch3, ch1 = data.reshape(2, -1)
                        k = int(ch3[0]) // 10000  # which buffer this is
                        assert list(ch3) == rb.expected(k, 3) and list(ch1) == rb.expected(k, 1)
                        seen.append(k)
                        counters.append(int(head[3]))
                    assert len(seen) == 4 and empty >= 1, (seen, empty)
                    assert seen == sorted(set(seen)), "each buffer once, newest first"
                    assert counters == sorted(set(counters))
                    await page.close()

            asyncio.run(go())
    finally:
        from support import stop_process

        stop_process(ioc)


def test_buffer_size_is_words_rounded_up_to_whole_samples():
    from dtacq_ioc.bridge.legacy import SiteView, buffer_bytes

    acq425 = [SiteView(1, 16, 2)]  # 16 channels and the spad's 4 words: 20 words a sample
    assert buffer_bytes(48_000, acq425) == 2400 * 40
    assert buffer_bytes(48_001, acq425) == 2401 * 40
    assert buffer_bytes(1, acq425) == 40
    acq437 = [SiteView(1, 8, 4), SiteView(2, 8, 4)]  # 16 + 2 words of 4 bytes
    assert buffer_bytes(18 * 100, acq437) == 100 * 72
    # The page's largest buffer, 1 Mi words, is kept within the IOC's 2 MiB.
    assert buffer_bytes(1 << 20, acq425, most=2 << 20) == (2 << 20) // 40 * 40
