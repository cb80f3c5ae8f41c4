"""Transient shots on the simulator, over real sockets: states, triggers, data, faults."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from sim_helpers import (
    TIMEOUT,
    Knobs,
    StatusLines,
    recv_all,
    signal_table,
    sim_card,
    stream_dtype,
    wait_refused,
)
from support import wait_for_port

from dtacq_ioc.sim.signals import counters

IDLE, ARM, RUN_PRE, RUN_POST, POST_PROCESS = range(5)


@pytest.fixture
def card(tmp_path, loopback):
    with sim_card(tmp_path, loopback, faults="reboot_s = 0.5") as c:
        yield c


def shot_bytes(host: str, channel: int = 0) -> bytes:
    with socket.create_connection((host, 53000 + channel), timeout=TIMEOUT) as s:
        return recv_all(s)


def run_shot(k: Knobs, status: StatusLines, settings: str) -> list[int]:
    """Arm with these transient settings, soft-trigger, return the final IDLE line."""
    k.set("transient", settings)
    k.ask("set_arm")
    status.until(ARM)
    k.set("soft_trigger", 1)
    return status.until(IDLE)


def test_transient_settings_are_clamped_as_the_card_does(card, loopback):
    with Knobs(loopback, 0) as k:
        assert k.value("transient") == "PRE=0 POST=2000 OSAM=1 DEMUX=1 SOFT_TRIGGER=1"
        k.set("transient", "POST=9000000 OSAM=999 DEMUX=-7 SOFT_TRIGGER=5")
        assert k.value("transient") == "PRE=0 POST=4000000 OSAM=256 DEMUX=-1 SOFT_TRIGGER=1"
        assert k.ask("transient PRE=x") == "ERROR: PRE=x not supported"


def test_a_soft_triggered_shot_serves_every_word_the_signals_give(card, loopback):
    post = 20_000
    with Knobs(loopback, 0) as k, StatusLines(loopback) as status:
        k.set("spad1", "0xabcd")
        final = run_shot(k, status, f"PRE=0 POST={post} SOFT_TRIGGER=0")
        assert final == [IDLE, 0, post, post, 1]
        assert k.value("state") == f"0 0 {post} {post} 1"
        assert k.value("TRANS_ACT:STATE") == "TRANS_ACT:STATE IDLE"
        assert k.value("TRANS_ACT:POST") == f"TRANS_ACT:POST {post}"
        assert k.value("TRANS_ACT:TOTSAM") == f"TRANS_ACT:TOTSAM {post}"
        assert k.value("shot") == "1"
        assert k.value("SIM:SHOT_START") == "SIM:SHOT_START 0"
        assert k.value("raw_data_size") == "0"  # demuxed on the card
    with Knobs(loopback, 1) as k1:
        assert k1.value("shot") == "1"
        assert k1.value("ch_data_size") == str(2 * post)  # bytes per demuxed channel
    table = signal_table(card)
    raw = np.frombuffer(shot_bytes(loopback), dtype=stream_dtype(card))
    assert len(raw) == post
    np.testing.assert_array_equal(raw["s1"], table.site_words(1, 0, post))
    np.testing.assert_array_equal(raw["spad"][:, 0], counters(0, post))
    assert (raw["spad"][:, 1] == 0xABCD).all()
    for ch in (1, 7, 16):
        words = np.frombuffer(shot_bytes(loopback, ch), dtype="<i2")
        np.testing.assert_array_equal(words, table.site_words(1, 0, post)[:, ch - 1])
    with pytest.raises(ConnectionRefusedError):
        shot_bytes(loopback, 17)  # no 17th AI channel, no port


def test_pre_trigger_shot_on_an_external_event(card, loopback):
    pre, post = 30_000, 10_000
    with Knobs(loopback, 0) as k, Knobs(loopback, 1) as k1, StatusLines(loopback) as status:
        k1.set("trg", "1,1,1")  # start: the soft trigger (fired by SOFT_TRIGGER=1 at arm)
        k1.set("event0", "1,0,1")  # event: d0 rising
        k.set("transient", f"PRE={pre} POST={post} SOFT_TRIGGER=1")
        assert status.next()[0] == IDLE  # the line at connect
        k.ask("set_arm")
        assert status.states(2) == [ARM, RUN_PRE]
        k.set("soft_trigger", 1)  # not what the event listens to
        k.set("SIM:EXT_TRIGGER", "0,0")  # d0, the wrong edge
        assert k.value("TRANS_ACT:STATE") == "TRANS_ACT:STATE RUN_PRE"
        # Wait until the pre-trigger samples are in, then fire d0 (a whole pulse).
        while status.next()[3] < pre:
            pass
        k.set("SIM:EXT_TRIGGER", "d0")
        assert status.states(3) == [RUN_POST, POST_PROCESS, IDLE]
        state = [int(f) for f in k.value("state").split()]
        assert state[:3] == [IDLE, pre, post]
        first = int(k.value("SIM:SHOT_START").split()[1])
        assert first == state[3] - post - pre  # the event sample is pre after the first
        assert first > 0
    table = signal_table(card)
    raw = np.frombuffer(shot_bytes(loopback), dtype=stream_dtype(card))
    assert len(raw) == pre + post
    np.testing.assert_array_equal(raw["s1"], table.site_words(1, first, pre + post))
    np.testing.assert_array_equal(raw["spad"][:, 0], counters(first, pre + post))
    words = np.frombuffer(shot_bytes(loopback, 3), dtype="<i2")
    np.testing.assert_array_equal(words, table.site_words(1, first, pre + post)[:, 2])


def test_auto_soft_trigger_and_undemuxed_data(card, loopback):
    with Knobs(loopback, 0) as k, StatusLines(loopback) as status:
        k.set("transient", "PRE=0 POST=5000 DEMUX=0 SOFT_TRIGGER=1")
        assert status.next()[0] == IDLE  # the line at connect
        k.ask("set_arm")
        assert status.states(4) == [ARM, RUN_POST, POST_PROCESS, IDLE]
        assert k.value("state").endswith(" 0")  # the demux field
        ssb = card.state.ssb
        assert k.value("raw_data_size") == str(5000 * ssb)
    assert len(shot_bytes(loopback)) == 5000 * ssb
    assert shot_bytes(loopback, 1) == b""  # channel ports serve demuxed shots only


def test_abort_at_any_point_and_the_never_triggering_shot(card, loopback):
    with Knobs(loopback, 0) as k, StatusLines(loopback) as status:
        k.set("transient", "PRE=0 POST=20000000 SOFT_TRIGGER=0")  # clamped to 4 M: 4 s
        k.ask("set_arm")
        status.until(ARM)
        k.ask("set_abort")
        assert status.next()[0] == IDLE
        k.ask("set_arm")
        status.until(ARM)
        k.set("soft_trigger", 1)
        status.until(RUN_POST)
        k.ask("set_abort")
        assert status.until(IDLE)[0] == IDLE
        assert k.value("shot") == "0"
        assert shot_bytes(loopback) == b""  # an aborted shot has no data
        k.set("SIM:NO_TRIGGER", 1)
        k.set("transient", "POST=100 SOFT_TRIGGER=1")
        k.ask("set_arm")
        status.until(ARM)
        k.set("soft_trigger", 1)
        k.set("SIM:EXT_TRIGGER", 0)
        assert k.value("TRANS_ACT:STATE") == "TRANS_ACT:STATE ARM"  # still waiting
        assert k.ask("SIM:EXT_TRIGGER=d9") == "ERROR: SIM:EXT_TRIGGER: 'd9' is not dN[,edge]"
        assert k.ask("SIM:EXT_TRIGGER=2,3") == "ERROR: SIM:EXT_TRIGGER: edge 3 is not 0 or 1"
        k.ask("set_abort")
        status.until(IDLE)


def test_arming_ends_the_stream_and_the_stream_refuses_while_armed(card, loopback):
    with Knobs(loopback, 0) as k, StatusLines(loopback) as status:
        k.set("transient", "PRE=0 POST=1000 SOFT_TRIGGER=0")
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            assert len(s.recv(4096)) > 0
            status.until(2)  # the stream runs
            k.ask("set_arm")
            assert status.until(ARM)[0] == ARM
            s.settimeout(TIMEOUT)
            while s.recv(1 << 20):
                pass  # the card closes the stream
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            assert recv_all(s) == b"NOT READY\n"
        assert k.ask("CONTINUOUS=1").startswith("ERROR: CONTINUOUS: a transient shot is armed")
        assert k.value("TRANS_ACT:STATE") == "TRANS_ACT:STATE ARM"  # the stream left it alone
        k.set("soft_trigger", 1)
        status.until(IDLE)
    with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
        assert len(s.recv(4096)) > 0  # streams again after the shot


def test_a_card_that_reboots_mid_shot_comes_back_idle_without_data(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("transient", "PRE=0 POST=4000000 SOFT_TRIGGER=1")
        k.ask("set_arm")
        assert k.ask("SIM:REBOOT=0.5") == ""
    wait_refused(loopback, 53000)
    wait_for_port(loopback, 53000, timeout=TIMEOUT)
    wait_for_port(loopback, 4220, timeout=TIMEOUT)
    with Knobs(loopback, 0) as k:
        assert k.value("state") == "0 0 0 0 0"
        assert k.value("shot") == "0"
    assert shot_bytes(loopback) == b""


def test_shot_cut_fault_sends_fewer_bytes(card, loopback):
    with Knobs(loopback, 0) as k, StatusLines(loopback) as status:
        run_shot(k, status, "PRE=0 POST=1000 SOFT_TRIGGER=0")
        k.set("SIM:SHOT_CUT", 1234)
    assert len(shot_bytes(loopback)) == 1234
    assert len(shot_bytes(loopback, 2)) == 1234


def test_get_site_and_set_site_from_site_0(card, loopback):
    with Knobs(loopback, 0) as k, Knobs(loopback, 1) as k1:
        assert k.ask("get.site 1 NCHAN") == "16"
        assert k.ask("set.site 1 gain3 2") == ""
        assert k1.value("gain3") == "2"
        assert k.ask("set.site 1 gain3=1") == ""
        assert k1.value("gain3") == "1"
        assert k.ask("get.site 1 NOPE") == 'ERROR:NOPE" not found'
        assert k.status == 1
        assert k.ask("get.site 9 NCHAN") == "ERROR: get.site: no site 9"
        assert k.ask("get.site") == "ERROR: get.site: usage get.site SITE KNOB"
        assert k.ask("set.site 1 gain3") == "ERROR: set.site: usage set.site SITE KNOB VALUE"
