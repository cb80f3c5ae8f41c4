"""Big arrays to monitors: the Fanout's messages, and real clients of a real IOC.

The Fanout sends a plain subscription's updates itself (one message built per
update); filtered or partial subscriptions keep caproto's path. Both must look the
same on the wire, and a slow client must cost neither memory nor other clients'
updates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import epics
import numpy as np
import pytest
from caproto import ChannelType, EventAddResponse
from caproto._dbr import DBR_TIME_DOUBLE
from ioc_support import caget, ioc_process, ioc_toml, new_prefix, wait_for

from dtacq_ioc.ioc.fanout import Message

STATUS = "DTACQ:test:"  # the status group of an IOC named "test"
SINE = 'signals = [{kind = "sine", amplitude_v = 5.0, freq_hz = 1000.0}]'


def wire(message_or_command) -> bytes:
    if isinstance(message_or_command, Message):
        return b"".join(bytes(b) for b in message_or_command.addressed(0x01020304))
    cmd = message_or_command
    return bytes(cmd.header) + b"".join(
        b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in cmd.buffers
    )


@pytest.mark.parametrize(
    ("values", "data_type", "metadata"),
    [
        (np.arange(100_000, dtype=">i2"), ChannelType.INT, None),  # extended header
        (np.arange(7, dtype=">i2"), ChannelType.INT, None),  # padded to 8 bytes
        (np.linspace(-1, 1, 3001).astype(">f8"), ChannelType.TIME_DOUBLE, DBR_TIME_DOUBLE()),
        # not yet in the wire's form: converted, as caproto converts them
        (np.arange(1001, dtype=np.int16), ChannelType.INT, None),
        (np.arange(2000, dtype=">i2")[::2], ChannelType.INT, None),
        (np.linspace(-1, 1, 3001), ChannelType.FLOAT, None),
    ],
)
def test_a_message_is_byte_for_byte_what_caproto_sends(values, data_type, metadata):
    message = Message(values, metadata, data_type, len(values))
    expected = EventAddResponse(values, data_type, len(values), 1, 0x01020304, metadata=metadata)
    assert wire(message) == wire(expected)
    assert message.nbytes == len(wire(expected))


@pytest.fixture
def big_ioc(tmp_path, loopback):
    """100 000-sample waveforms at 1 MHz: 3.2 MB a frame, enough to fill a stalled
    client's socket within seconds."""
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=SINE, display_samples=100_000)
    with ioc_process(config, prefix, loopback) as running_ioc:
        yield running_ioc


def test_plain_filtered_and_partial_monitors_all_get_the_current_sine(big_ioc):
    whole = epics.PV(big_ioc.pv("1:AI:WF:01:V"), auto_monitor=True, form="time")
    raw = epics.PV(big_ioc.pv("1:AI:WF:01"), auto_monitor=True, form="ctrl")
    head = epics.PV(big_ioc.pv("1:AI:WF:01.[0:9]"), auto_monitor=True)  # array filter
    first = epics.PV(big_ioc.pv("1:AI:WF:01"), auto_monitor=True, count=10)  # partial count
    counts = {pv.pvname: 0 for pv in (whole, raw, head)} | {"count": 0}
    whole.add_callback(lambda pvname=None, **kw: counts.__setitem__(pvname, counts[pvname] + 1))
    raw.add_callback(lambda pvname=None, **kw: counts.__setitem__(pvname, counts[pvname] + 1))
    head.add_callback(lambda pvname=None, **kw: counts.__setitem__(pvname, counts[pvname] + 1))
    first.add_callback(lambda **kw: counts.__setitem__("count", counts["count"] + 1))
    try:
        wait_for(lambda: min(counts.values()) >= 5, "5 updates on every monitor")
        volts = whole.get(use_monitor=True)
        assert len(volts) == 100_000
        assert volts.max() == pytest.approx(5.0, abs=0.05)
        assert volts.min() == pytest.approx(-5.0, abs=0.05)
        np.testing.assert_allclose(volts[1000:2000], volts[:1000], atol=0.01)  # 1 kHz at 1 MHz
        codes = raw.get(use_monitor=True)
        assert len(codes) == 100_000 and codes.dtype.kind == "i"
        assert int(codes.max()) == pytest.approx(16384, abs=100)  # 5 V on the ±10 V range
        assert len(head.get(use_monitor=True)) == 10
        assert len(first.get(use_monitor=True)) == 10
        # The plain ones went through the Fanout (its counter is published once a second).
        wait_for(lambda: caget(STATUS + "CA:ARRAY_UPDATES") > 0, "updates counted by the Fanout")
    finally:
        for pv in (whole, raw, head, first):
            pv.clear_callbacks()
            pv.disconnect()


CLIENT = textwrap.dedent(
    """
    import sys, epics
    names = [f"{sys.argv[1]}1:AI:WF:{i:02d}" for i in range(1, 17)]
    def seen(pvname=None, **kw):
        if pvname == names[0]:
            print("update", flush=True)
    pvs = [epics.PV(n, auto_monitor=True, callback=seen) for n in names]
    sys.stdin.read()  # until the test closes stdin
    """
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def test_a_stalled_client_costs_neither_memory_nor_other_clients_updates(big_ioc):
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, big_ioc.prefix],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    updates = threading.Semaphore(0)

    def read_client() -> None:
        for line in client.stdout:
            if line.startswith("update"):
                updates.release()

    threading.Thread(target=read_client, daemon=True).start()
    mine: list[float] = []
    pv = epics.PV(big_ioc.pv("1:AI:WF:02"), auto_monitor=True)
    pv.add_callback(lambda **kw: mine.append(time.monotonic()))
    try:
        assert updates.acquire(timeout=30), "the client never got an update"
        client.send_signal(signal.SIGSTOP)  # it stops reading; its socket fills up
        wait_for(lambda: caget(STATUS + "CA:ARRAY_DROPS") > 0, "updates dropped for the client")
        rss_at_drop = rss_mb(big_ioc.proc.pid)
        dropped = caget(STATUS + "CA:ARRAY_DROPS")
        wait_for(lambda: caget(STATUS + "CA:ARRAY_DROPS") >= dropped + 16 * 20,
                 "20 more frames dropped")  # fmt: skip
        # 20 frames of 3.2 MB would be 64 MB had they been queued for the client.
        assert rss_mb(big_ioc.proc.pid) - rss_at_drop < 30
        recent = [t for t in mine if t > time.monotonic() - 2.0]
        assert len(recent) >= 10, f"the other client got {len(recent)} updates in 2 s"
        while updates.acquire(timeout=0):  # what it had read before it stopped
            pass
        client.send_signal(signal.SIGCONT)
        assert updates.acquire(timeout=30), "the client got nothing after it resumed"
    finally:
        pv.clear_callbacks()
        pv.disconnect()
        client.send_signal(signal.SIGCONT)
        client.stdin.close()
        client.terminate()
        client.wait(timeout=10)


CHECKING_CLIENT = textwrap.dedent(
    """
    import sys, epics
    names = [f"{sys.argv[1]}1:AI:WF:{i:02d}" for i in range(1, 17)]
    whole = set()  # PVs past the start: their zeros from before the stream, then frames
    # that grow while the display fills its first 100 000 samples
    updated = set()
    def connected(pvname=None, conn=None, **kw):
        print(f"{'connected' if conn else 'disconnected'} {pvname}", flush=True)
    def seen(pvname=None, value=None, **kw):
        if pvname not in updated:
            updated.add(pvname)
            print(f"first {pvname} len {len(value)}", flush=True)
        # Channel 1 plays a 1 kHz sine at 1 MHz: a whole array of it repeats every 1000
        # samples, so bytes of another message in it would show. Once a PV has had one
        # full frame of the stream, every array is whole.
        good = len(value) == 100_000
        if pvname not in whole:
            if not (good and value.any()):
                return
            whole.add(pvname)
        if good and pvname == names[0]:
            good = abs(int(value.max()) - 16384) < 100 and \
                abs(value[1000:2000].astype(int) - value[:1000]).max() < 50
        what = "" if good else f" len {len(value)} max {value.max() if len(value) else '-'}"
        print(f"{'ok' if good else 'bad'} {pvname}{what}", flush=True)
    pvs = [epics.PV(n, auto_monitor=True, callback=seen, connection_callback=connected)
           for n in names]
    sys.stdin.read()  # until the test closes stdin
    """
)


def test_several_clients_of_big_frames_each_get_every_array_intact(big_ioc):
    """Three clients of all 16 waveforms (3.2 MB a frame each): the frames go to them
    side by side (the Fanout's sender threads), and every array each client gets is
    whole and unmixed, over at least 20 frames."""
    clients = [subprocess.Popen([sys.executable, "-c", CHECKING_CLIENT, big_ioc.prefix],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ))
               for _ in range(3)]  # fmt: skip
    ok: list[dict[str, int]] = [{} for _ in clients]  # whole arrays per PV, per client
    history: list[dict[str, list[str]]] = [{} for _ in clients]  # connections, first update
    bad: list[str] = []  # the bad arrays, as the clients described them
    started = time.monotonic()

    def read(i: int) -> None:
        for line in clients[i].stdout:
            verdict, _, rest = line.strip().partition(" ")
            name = rest.split(" ")[0].removeprefix(big_ioc.prefix)
            if verdict == "ok":
                ok[i][name] = ok[i].get(name, 0) + 1
            elif verdict == "bad":
                bad.append(f"client {i}: {rest}")
            else:
                at = time.monotonic() - started
                history[i].setdefault(name, []).append(f"{verdict} at {at:.1f} s")

    def every_pv_had_20_frames() -> bool:
        return all(len(counts) == 16 and min(counts.values()) >= 20 for counts in ok)

    for i in range(len(clients)):
        threading.Thread(target=read, args=(i,), daemon=True).start()
    try:
        try:
            wait_for(lambda: bad or every_pv_had_20_frames(), "20 whole frames of every PV",
                     timeout=90)  # fmt: skip
        except TimeoutError:
            short = {f"client {i} {name}": (counts.get(name, 0), history[i].get(name, []))
                     for i, counts in enumerate(ok)
                     for name in (f"1:AI:WF:{n:02d}" for n in range(1, 17))
                     if counts.get(name, 0) < 20}  # fmt: skip
            pytest.fail(f"PVs short of 20 whole frames (count, events): {short}")
        assert not bad, bad[:5]
    finally:
        for client in clients:
            client.stdin.close()
            client.terminate()
            client.wait(timeout=10)
