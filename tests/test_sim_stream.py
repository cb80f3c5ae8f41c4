"""The simulated 4210 stream: framing, counter, exact data, pacing and every stream fault."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from sim_helpers import (
    TIMEOUT,
    Knobs,
    read_samples,
    recv_all,
    recv_exact,
    signal_table,
    sim_card,
    stream_dtype,
)
from test_sim_knobs import SECOND_SITE

from dtacq_ioc.sim.stream import CORRUPT_WORD

SIGNALS = """
signals = [
  { kind = "dc", offset_v = 1.25 },
  { kind = "sine", amplitude_v = 5.0, freq_hz = 1000.0 },
  { kind = "noise", amplitude_v = 0.0, noise_v = 0.5 },
]
"""


@pytest.fixture
def card(tmp_path, loopback):
    with sim_card(tmp_path, loopback, site_extra=SIGNALS) as c:
        yield c


def test_acq425_framing_counter_and_exact_words(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("spad1", "0xdeadbeef")
        k.set("run0", "1 1,2,0")
    with Knobs(loopback, 1) as k1:
        k1.set("clkdiv", 1000)  # 100 kHz keeps the test short
    dtype = stream_dtype(card)
    assert dtype.itemsize == 40
    n = 20_000
    got = read_samples(loopback, dtype, n)
    table = signal_table(card)
    np.testing.assert_array_equal(got["spad"][:, 0], np.arange(1, n + 1, dtype=np.uint32))
    assert (got["spad"][:, 1] == 0xDEADBEEF).all()
    np.testing.assert_array_equal(got["s1"], table.site_words(1, 0, n))
    # The configured signals, coded for ±10 V: 1.25 V DC is 4096 counts.
    assert (got["s1"][:, 0] == 4096).all()
    assert abs(int(got["s1"][:, 1].max()) - 16384) <= 1
    assert 1000 < got["s1"][:, 2].std() < 2000  # 0.5 V rms noise = 1638 counts


def test_16_bit_spad_words_take_two_slots_low_half_first(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("spad1", "0x12345678")
    with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
        raw = np.frombuffer(recv_exact(s, 40 * 3), dtype="<u2").reshape(3, 20)
    assert raw[:, 16].tolist() == [1, 2, 3] and raw[:, 17].tolist() == [0, 0, 0]
    assert raw[0, 18:].tolist() == [0x5678, 0x1234]


def test_acq437_words_are_left_justified_with_the_channel_in_the_low_byte(tmp_path, loopback):
    with sim_card(tmp_path, loopback, module="ACQ437ELF", site_extra=SIGNALS) as card:
        dtype = stream_dtype(card)
        assert dtype.itemsize == 72
        got = read_samples(loopback, dtype, 2000)
        table = signal_table(card)
    words = got["s1"]
    np.testing.assert_array_equal(words, table.site_words(1, 0, 2000))
    assert ((words & 0xFF) == np.arange(16)).all()
    assert ((words[:, 0] >> 8) == round(1.25 / 10 * 2**23)).all()
    np.testing.assert_array_equal(got["spad"][:, 0], np.arange(1, 2001, dtype=np.uint32))


def test_data32_puts_16_bit_codes_in_the_upper_half(card, loopback):
    with Knobs(loopback, 1) as k1:
        k1.set("data32", 1)
        assert k1.value("word_size") == "4"
    with Knobs(loopback, 0) as k:
        k.set("run0", "1")
        assert (k.value("NCHAN"), k.value("ssb")) == ("18", "72")
    dtype = stream_dtype(card)
    got = read_samples(loopback, dtype, 1000)
    assert ((got["s1"][:, 0] >> 16) == 4096).all() and ((got["s1"] & 0xFFFF) == 0).all()


def test_two_sites_stream_in_site_order(tmp_path, loopback):
    second = SECOND_SITE + 'signals = [{ kind = "dc", offset_v = -2.5 }]\n'
    with sim_card(tmp_path, loopback, site_extra=SIGNALS + second) as card:
        dtype = stream_dtype(card)
        assert dtype.names == ("s1", "s2", "spad") and dtype.itemsize == 72
        got = read_samples(loopback, dtype, 1000)
    assert (got["s1"][:, 0] == 4096).all() and (got["s2"][:, 0] == -8192).all()
    np.testing.assert_array_equal(got["spad"][:, 0], np.arange(1, 1001, dtype=np.uint32))


def test_gain_scales_the_codes(card, loopback):
    with Knobs(loopback, 1) as k1:
        k1.set("gain1", 1)  # ±5 V: 1.25 V is now 8192 counts
    got = read_samples(loopback, stream_dtype(card), 100)
    assert (got["s1"][:, 0] == 8192).all()


def test_rate_follows_clkdiv_in_real_time(card, loopback):
    with Knobs(loopback, 1) as k1:
        k1.set("clkdiv", 2000)  # 100 MHz / 2000 = 50 kHz
    dtype = stream_dtype(card)
    chunk = 500  # one ~10 ms block at 50 kHz

    def last_counter(s: socket.socket) -> int:
        return int(np.frombuffer(recv_exact(s, chunk * dtype.itemsize), dtype)["spad"][-1, 0])

    points = []  # (arrival time, counter): a fit over all of them shrugs off a late read
    with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
        last_counter(s)
        t0 = time.monotonic()
        while not points or points[-1][0] - t0 < 3.0:
            c = last_counter(s)
            points.append((time.monotonic(), c))
    t, c = np.array(points).T
    assert np.polyfit(t - t0, c, 1)[0] == pytest.approx(50_000, rel=0.01)


def test_drop_fault_skips_the_counter_and_the_samples(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("SIM:DROP", "1000,5")
    got = read_samples(loopback, stream_dtype(card), 5000)
    counter = got["spad"][:, 0].astype(np.int64)
    jumps = np.flatnonzero(np.diff(counter) != 1)
    assert jumps.tolist() == [999, 1999, 2999, 3999]
    assert (np.diff(counter)[jumps] == 6).all()
    table = signal_table(card)
    # Each sample carries the data of its counter's index: the dropped ones were never sent.
    np.testing.assert_array_equal(got["s1"], table.site_words(1, 0, 6000)[counter - 1])


def test_corrupt_fault_overwrites_one_word_and_keeps_the_counter(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("SIM:CORRUPT", 500)
    got = read_samples(loopback, stream_dtype(card), 2000)
    counter = got["spad"][:, 0]
    np.testing.assert_array_equal(counter, np.arange(1, 2001, dtype=np.uint32))
    expected = signal_table(card).site_words(1, 0, 2000)
    bad = np.flatnonzero((got["s1"] != expected).any(axis=1))
    assert (counter[bad] % 500 == 0).all() and len(bad) == 4
    assert (got["s1"][bad, 0].view(np.uint16) == CORRUPT_WORD & 0xFFFF).all()
    np.testing.assert_array_equal(got["s1"][bad, 1:], expected[bad, 1:])


def test_close_after_fault_cuts_the_stream_at_that_byte(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("SIM:CLOSE_AFTER", 100_001)
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            data = recv_all(s)
        assert len(data) == 100_001
        assert k.value("SIM:SENT") == "SIM:SENT 2500"  # whole samples only


def test_not_ready_fault(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("SIM:NOT_READY", 1)
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            assert recv_all(s) == b"NOT READY\n"
        k.set("SIM:NOT_READY", 0)
    assert read_samples(loopback, stream_dtype(card), 10)["spad"][0, 0] == 1


def test_a_new_client_tears_down_the_previous_one(card, loopback):
    dtype = stream_dtype(card)
    with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as a:
        recv_exact(a, 4000)
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as b:
            recv_all(a, limit=1 << 30)  # returns only when the card closes the old stream
            got = np.frombuffer(recv_exact(b, dtype.itemsize * 5), dtype=dtype)
            assert got["spad"][:, 0].tolist() == [1, 2, 3, 4, 5]


def test_run0_tears_the_stream_down(card, loopback):
    with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
        recv_exact(s, 4000)
        with Knobs(loopback, 0) as k:
            k.set("run0", "1")
        recv_all(s, limit=1 << 30)


def test_unclocked_card_sends_nothing_until_clocked(tmp_path, loopback):
    with sim_card(tmp_path, loopback) as card, Knobs(loopback, 0) as k0, Knobs(loopback, 1) as k1:
        k0.set("fpmux", "fpclk")
        k1.set("clk", "1,0,1")  # external clock selected, and none is wired (ext_clock_hz = 0)
        with socket.create_connection((loopback, 4210), timeout=0.5) as s:
            with pytest.raises(TimeoutError):
                s.recv(1)
            k1.set("clk", "0,0,0")
            s.settimeout(TIMEOUT)
            got = np.frombuffer(recv_exact(s, 40 * 3), dtype=stream_dtype(card))
        assert got["spad"][:, 0].tolist() == [1, 2, 3]


def test_unthrottled_outruns_real_time_and_sent_counts(tmp_path, loopback):
    with sim_card(tmp_path, loopback, module="ACQ437ELF") as card, Knobs(loopback, 0) as k:
        k.set("SIM:UNTHROTTLED", 1)
        dtype = stream_dtype(card)
        n = 500_000  # about 31 s of samples at the 16.3 kHz default rate
        t0 = time.monotonic()
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            tail = np.frombuffer(recv_exact(s, n * dtype.itemsize)[-dtype.itemsize :], dtype)
        assert time.monotonic() - t0 < 15
        assert tail["spad"][0, 0] == n
        sent = int(k.value("SIM:SENT").split()[1])
        assert sent >= n
