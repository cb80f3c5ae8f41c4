"""Bit shift, volts, downsampling and the display stage, on arrays built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dtacq_ioc.card.models import MODULES
from dtacq_ioc.readout.display import DisplayStage, amplitude_spectrum
from dtacq_ioc.readout.transform import (
    ChannelMap,
    Downsampler,
    SiteChannels,
    downsample_mean,
    shift_codes,
    site_bit_shift,
    to_volts,
)

ACQ425 = MODULES["ACQ425ELF"]
ACQ437 = MODULES["ACQ437ELF"]


def test_shift_is_arithmetic_and_free_when_zero():
    words = np.array([-256, -1, 255, 0x7FFFFF00], dtype=np.int32)
    assert shift_codes(words, 8).tolist() == [-1, -1, 0, 0x7FFFFF]
    assert shift_codes(words, 0) is words


def test_site_shift_follows_the_word_size():
    assert site_bit_shift(ACQ437, 4) == 8
    assert site_bit_shift(ACQ425, 2) == 0
    assert site_bit_shift(ACQ425, 4) == 16  # data32: the code sits in the upper half


def test_channel_map_shifts_and_scales_per_site():
    cmap = ChannelMap([SiteChannels(1, ACQ437, 3, 4, (0, 1, 3))])
    assert cmap.uniform_shift == 8
    assert cmap.volts_per_code.tolist() == [10 / 2**23, 5 / 2**23, 1 / 2**23]
    words = np.array([[2**30, -(2**30), 2**8 + 0x5A]], dtype=np.int32)
    codes = cmap.shift(words)
    assert codes.tolist() == [[2**22, -(2**22), 1]]
    assert to_volts(codes, cmap.volts_per_code).tolist() == [[5.0, -2.5, 1 / 2**23]]
    mixed = ChannelMap([SiteChannels(1, ACQ437, 1, 4), SiteChannels(2, ACQ425, 1, 4, (2,))])
    assert mixed.uniform_shift is None
    assert mixed.shift(np.array([[256, 65536]], dtype=np.int32)).tolist() == [[1, 1]]
    assert mixed.site_of == [1, 2] and mixed.volts_per_code[1] == 2.5 / 32768


def test_module_without_gains_uses_its_fixed_range():
    cmap = ChannelMap([SiteChannels(1, MODULES["ACQ424ELF"], 2, 2)])
    assert cmap.volts_per_code.tolist() == [10.24 / 32768] * 2


def test_downsample_mean_whole_blocks_float64():
    x = np.arange(20, dtype=np.int16).reshape(10, 2)
    out = downsample_mean(x, 3)
    assert out.dtype == np.float64
    assert out.tolist() == [[2.0, 3.0], [8.0, 9.0], [14.0, 15.0]]
    with pytest.raises(ValueError, match="downsample must be >= 1"):
        downsample_mean(x, 0)


def test_downsampler_carries_partial_blocks_across_buffers():
    x = np.random.default_rng(1).integers(-1000, 1000, size=(1000, 3)).astype(np.int32)
    ds = Downsampler(7, 3)
    parts = [ds(x[a:b]) for a, b in [(0, 3), (3, 5), (5, 400), (400, 401), (401, 1000)]]
    got = np.concatenate(parts)
    np.testing.assert_allclose(got, downsample_mean(x, 7))
    assert ds.held == 1000 % 7


def ramp_map(nchan: int = 2) -> ChannelMap:
    return ChannelMap([SiteChannels(1, ACQ425, nchan, 2, (0,) * nchan)])


def test_display_keeps_the_latest_samples_in_order():
    stage = DisplayStage(ramp_map(), 8, sample_rate_hz=1000.0)
    assert stage.snapshot().samples == 0
    data = np.arange(40, dtype=np.int16).reshape(20, 2)
    stage.update(data[:5])
    snap = stage.snapshot()
    assert snap.raw[0].tolist() == [0, 2, 4, 6, 8]
    stage.update(data[5:11])  # wraps the ring
    stage.update(data[11:12])
    snap = stage.snapshot()
    assert snap.raw[0].tolist() == list(range(8, 24, 2))
    stage.update(data[12:])  # a buffer of exactly N rows
    assert stage.snapshot().raw[1].tolist() == list(range(25, 40, 2))
    assert snap.timebase_s.tolist() == [i / 1000 for i in range(8)]
    assert stage.snapshot().updates == 4


def test_display_statistics_and_spectrum_in_volts():
    rate, n = 10000.0, 1000
    t = np.arange(n) / rate
    vpc = 10 / 32768
    sine = np.round(3.0 * np.sin(2 * np.pi * 500.0 * t) / vpc)
    dc = np.full(n, round(1.25 / vpc))
    stage = DisplayStage(ramp_map(), n, sample_rate_hz=rate)
    stage.update(np.stack([sine, dc], axis=1).astype(np.int16))
    snap = stage.snapshot()
    assert snap.maximum[0] == pytest.approx(3.0, abs=1e-3)
    assert snap.minimum[0] == pytest.approx(-3.0, abs=1e-3)
    assert snap.mean[1] == pytest.approx(1.25, abs=1e-3)
    assert snap.rms[0] == pytest.approx(3.0 / np.sqrt(2), rel=1e-3)
    peak = int(np.argmax(snap.spectrum[0]))
    assert snap.freq_hz[peak] == pytest.approx(500.0)
    assert snap.spectrum[0, peak] == pytest.approx(3.0, rel=1e-2)
    assert snap.spectrum[1, 0] == pytest.approx(1.25, rel=1e-3)


def test_spectrum_without_rate_uses_bin_numbers():
    spec, freq = amplitude_spectrum(np.ones((1, 16)), 0.0)
    assert freq.tolist() == list(range(9)) and spec[0, 0] == pytest.approx(1.0)
