"""Bit shift, volts, downsampling and the display stage, on arrays built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dtacq_ioc.card.models import MODULES
from dtacq_ioc.readout.display import DisplayStage, amplitude_spectrum, code_statistics, code_sums
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
    peak = int(np.argmax(snap.spectrum(0)))
    assert snap.freq_hz[peak] == pytest.approx(500.0)
    assert snap.spectrum(0)[peak] == pytest.approx(3.0, rel=1e-2)
    assert snap.spectrum(1)[0] == pytest.approx(1.25, rel=1e-3)


def stream_words(site: SiteChannels, rows: int, seed: int) -> np.ndarray:
    """Random stream words of a site (codes across the full range, extremes included)."""
    rng = np.random.default_rng(seed)
    full = site.spec.full_scale_code
    codes = rng.integers(-full, full, size=(rows, site.nchan), endpoint=False)
    codes[:2] = [[-full], [full - 1]]  # both extremes in every channel
    words = codes << site_bit_shift(site.spec, site.word_size)
    return words.astype(np.int16 if site.word_size == 2 else np.int32)


@pytest.mark.parametrize(
    "site",
    [SiteChannels(1, ACQ425, 4, 2, (0, 1, 2, 3)), SiteChannels(1, ACQ437, 3, 4, (0, 2, 3))],
    ids=["16-bit codes", "24-bit codes"],
)
def test_display_statistics_from_codes_equal_a_float64_reference(site):
    cmap = ChannelMap([site])
    size = 1000
    stage = DisplayStage(cmap, size, sample_rate_hz=1e5)
    words = stream_words(site, 2600, seed=site.word_size)
    # Uneven buffers, so the ring wraps mid-buffer and the last buffer is partly old data.
    for a, b in [(0, 700), (700, 1300), (1300, 1301), (1301, 2600)]:
        stage.update(words[a:b])
    snap = stage.snapshot()
    codes = cmap.shift(words[-size:])
    assert snap.raw.dtype == (np.int16 if site.word_size == 2 else np.int32)
    np.testing.assert_array_equal(snap.raw, codes.T)
    volts = codes.T * cmap.volts_per_code[:, None]  # the float64 reference
    np.testing.assert_array_equal(snap.minimum, volts.min(axis=1))
    np.testing.assert_array_equal(snap.maximum, volts.max(axis=1))
    np.testing.assert_allclose(snap.mean, volts.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(snap.rms, np.sqrt((volts**2).mean(axis=1)), rtol=1e-12)


def test_code_sums_of_16_bit_codes_are_exact():
    raw = np.full((2, 5000), -32768, dtype=np.int16)
    raw[1, ::2] = 32767
    sums, squares = code_sums(raw)
    assert sums.dtype == squares.dtype == np.int64
    wide = raw.astype(np.int64)
    assert sums.tolist() == wide.sum(axis=1).tolist()
    assert squares.tolist() == (wide * wide).sum(axis=1).tolist()


def test_a_negative_scale_keeps_minimum_below_maximum():
    raw = np.array([[-2, 5, 1]], dtype=np.int16)
    lo, hi, mean, rms = code_statistics(raw, np.array([-0.5]))
    assert (lo[0], hi[0], mean[0]) == (-2.5, 1.0, pytest.approx(-2 / 3))
    assert rms[0] == pytest.approx(0.5 * np.sqrt(30 / 3))


def test_volts_and_spectra_on_demand_equal_the_whole_frame_computation():
    site = SiteChannels(1, ACQ425, 3, 2, (0, 1, 3))
    cmap, rate = ChannelMap([site]), 20000.0
    stage = DisplayStage(cmap, 512, sample_rate_hz=rate)
    stage.update(stream_words(site, 700, seed=3))
    snap = stage.snapshot()
    volts = to_volts(snap.raw, cmap.volts_per_code[:, None])
    spectra, freq = amplitude_spectrum(volts, rate)
    for ch in range(3):
        np.testing.assert_array_equal(snap.volts(ch), volts[ch])
        np.testing.assert_allclose(snap.spectrum(ch), spectra[ch], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(snap.freq_hz, freq)
    assert snap.spectrum(1) is snap.spectrum(1)  # computed once per snapshot
    assert not snap.volts(0).flags.writeable  # shared with PVs: never changed in place


def test_snapshots_are_copies_and_share_their_axes():
    stage = DisplayStage(ramp_map(), 8, sample_rate_hz=1000.0)
    stage.update(np.arange(16, dtype=np.int16).reshape(8, 2))
    first = stage.snapshot()
    stage.update(np.full((3, 2), 99, dtype=np.int16))
    second = stage.snapshot()
    assert first.raw[0].tolist() == list(range(0, 16, 2))  # the ring moved on, the copy not
    assert second.timebase_s is first.timebase_s and second.freq_hz is first.freq_hz
    stage.set_calibration(ramp_map(), 2000.0)
    third = stage.snapshot()
    assert third.timebase_s is not first.timebase_s
    assert third.timebase_s[1] == pytest.approx(1 / 2000) and third.freq_hz[-1] == 1000.0


def test_spectrum_without_rate_uses_bin_numbers():
    spec, freq = amplitude_spectrum(np.ones((1, 16)), 0.0)
    assert freq.tolist() == list(range(9)) and spec[0, 0] == pytest.approx(1.0)
