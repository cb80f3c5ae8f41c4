"""Signal tables, counters and fault segmentation: the arithmetic behind the stream."""

from __future__ import annotations

import numpy as np
import pytest

from dtacq_ioc.card.models import MODULES
from dtacq_ioc.config import SignalConfig
from dtacq_ioc.sim.signals import SignalTable, SiteSignals, counters
from dtacq_ioc.sim.state import Faults
from dtacq_ioc.sim.stream import segments


def site(module: str, signals=(), gains=(), data32=None, number=1) -> SiteSignals:
    spec = MODULES[module]
    return SiteSignals(
        site=number,
        spec=spec,
        signals=tuple(signals),
        gains=tuple(gains) or (0,) * spec.nchan if spec.gain_codes else (),
        data32=spec.word_size == 4 if data32 is None else data32,
    )


def test_counter_starts_at_one_and_wraps_at_2_32():
    assert counters(0, 3).tolist() == [1, 2, 3]
    assert counters(2**32 - 2, 4).tolist() == [2**32 - 1, 0, 1, 2]
    assert counters(0, 1).dtype == np.uint32


def test_codes_follow_volts_gain_and_clip():
    sigs = [SignalConfig(kind="dc", offset_v=v) for v in (1.25, -20.0, 20.0, 0.0)]
    t = SignalTable([site("ACQ425ELF", sigs, gains=(0, 0, 0, 3) + (0,) * 12)], 1000.0)
    row = t.site_words(1, 0, 1)[0]
    assert row[:4].tolist() == [4096, -32768, 32767, 0]
    t2 = SignalTable([site("ACQ425ELF", sigs, gains=(1,) * 16)], 1000.0)
    assert t2.site_words(1, 5, 1)[0, 0] == 8192


def test_acq437_words_carry_code_and_channel():
    sigs = [SignalConfig(kind="dc", offset_v=-5.0)]
    t = SignalTable([site("ACQ437ELF", sigs)], 1000.0)
    row = t.site_words(1, 0, 1)[0]
    assert row.dtype == np.int32
    assert row[0] >> 8 == -(2**22) and row[0] & 0xFF == 0
    assert (row & 0xFF).tolist() == list(range(16))


def test_unconfigured_channels_get_distinct_default_sines():
    t = SignalTable([site("ACQ425ELF")], 10_000.0)
    words = t.site_words(1, 0, 10_000).astype(float)
    spectra = np.abs(np.fft.rfft(words, axis=0))
    peaks = spectra.argmax(axis=0)  # 1 s of data: bin = Hz
    assert peaks.tolist() == [100 * (ch + 1) for ch in range(16)]
    assert words.max() == pytest.approx(3277, abs=2)  # 1 V at ±10 V


def test_table_is_deterministic_and_periodic():
    sigs = [SignalConfig(kind="noise", noise_v=1.0), SignalConfig(kind="chirp", freq_hz=10.0)]
    a = SignalTable([site("ACQ425ELF", sigs)], 2000.0)
    b = SignalTable([site("ACQ425ELF", sigs)], 2000.0)
    assert a.period == 2000
    np.testing.assert_array_equal(a.site_words(1, 0, 4000), b.site_words(1, 0, 4000))
    np.testing.assert_array_equal(a.site_words(1, 2000, 10), a.site_words(1, 0, 10))
    assert a.site_words(1, 0, 2000)[:, 0].std() == pytest.approx(3277, rel=0.1)


def test_table_size_is_capped():
    t = SignalTable([site("ACQ425ELF")], 2_000_000.0, max_bytes=1 << 20)
    assert t.period == (1 << 20) // 32


def test_segments_split_at_drops_corruption_and_the_period():
    f = Faults(drop_every=10, drop_count=2)
    segs = [(s.start, s.count) for s in segments(0, 30, f, period=1000)]
    assert segs == [(0, 10), (12, 10), (24, 6)]
    f = Faults(corrupt_every=5)
    segs = [(s.start, s.count, s.corrupt) for s in segments(0, 12, f, period=7)]
    assert segs == [(0, 4, False), (4, 1, True), (5, 2, False), (7, 2, False), (9, 1, True),
                    (10, 2, False)]  # fmt: skip
