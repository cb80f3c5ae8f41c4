"""The display stage: the latest N samples per channel, their statistics, and on demand
their volts and spectra.

`update` runs on the socket thread for every buffer and writes the newest rows,
channel-major, into a ring of ADC codes. `snapshot` (called at the display rate from
the IOC) copies the ring out and computes min/max/mean/RMS from the integer codes;
volts and the Hann-windowed amplitude spectrum of a channel are computed only when
asked for (`Snapshot.volts`, `Snapshot.spectrum`), because most frames nobody looks
at most channels' volts or spectra and they are most of the arithmetic.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from dtacq_ioc.readout.transform import ChannelMap

# Rows per block of the transposing write into the ring: a block of both layouts stays
# in cache, which makes the strided copy about three times faster than in one piece.
TRANSPOSE_ROWS = 2048


@dataclass(frozen=True)
class Axes:
    """What depends only on the number of samples and the sample rate, so snapshots
    share it (and the IOC republishes the axes only when they change)."""

    timebase_s: np.ndarray  # seconds from the oldest sample shown
    freq_hz: np.ndarray  # frequency of each spectrum bin (bin numbers when the rate is unknown)
    window: np.ndarray  # float32 Hann window for the spectrum

    @classmethod
    def build(cls, n: int, rate_hz: float) -> Axes:
        timebase = np.arange(n) / rate_hz if rate_hz > 0 else np.arange(n, dtype=np.float64)
        spectral = n >= 2
        axes = cls(
            timebase_s=timebase,
            freq_hz=frequency_axis(n, rate_hz) if spectral else np.zeros(0),
            window=hann_window(n) if spectral else np.zeros(0, dtype=np.float32),
        )
        for array in (axes.timebase_s, axes.freq_hz, axes.window):
            array.flags.writeable = False  # shared by every snapshot with these axes
        return axes


@dataclass(frozen=True)
class Snapshot:
    """The latest samples of every channel; statistics per channel, in volts.

    `raw` is a new array each snapshot (PVs keep references to its rows). The
    statistics, `volts` and `spectrum` are computed when first asked for (nobody may
    watch them) and then kept with the snapshot; two threads asking at once may both
    compute them, with the same result.
    """

    raw: np.ndarray  # (channels, samples) ADC codes (bit shift applied), oldest first
    volts_per_code: np.ndarray  # per channel
    axes: Axes
    sample_rate_hz: float
    updates: int  # buffers seen so far
    counter: int = 0  # spad sample counter of the newest sample shown
    _derived: dict[tuple[str, int], np.ndarray] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def samples(self) -> int:
        return int(self.raw.shape[-1])

    @property
    def timebase_s(self) -> np.ndarray:
        return self.axes.timebase_s

    @property
    def minimum(self) -> np.ndarray:
        return self._statistics[0]

    @property
    def maximum(self) -> np.ndarray:
        return self._statistics[1]

    @property
    def mean(self) -> np.ndarray:
        return self._statistics[2]

    @property
    def rms(self) -> np.ndarray:
        return self._statistics[3]

    @cached_property
    def _statistics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per channel minimum, maximum, mean and RMS, all four in one pass over raw."""
        return code_statistics(self.raw, self.volts_per_code)

    @property
    def freq_hz(self) -> np.ndarray:
        return self.axes.freq_hz

    def volts(self, channel: int) -> np.ndarray:
        """One channel's samples in volts (float64)."""
        key = ("volts", channel)
        if key not in self._derived:
            self._derived[key] = _frozen(self.raw[channel] * self.volts_per_code[channel])
        return self._derived[key]

    def spectrum(self, channel: int) -> np.ndarray:
        """One channel's amplitude spectrum in volts, as `amplitude_spectrum` computes it."""
        key = ("spectrum", channel)
        if key not in self._derived:
            if self.samples < 2:
                spec = np.zeros(0)
            else:
                spec = _windowed_spectrum(self.volts(channel), self.axes.window)
            self._derived[key] = _frozen(spec)
        return self._derived[key]


@dataclass(frozen=True)
class DisplayMemory:
    """Where a display stage keeps its ring: plain arrays, or views of one shared mapping
    (a readout process writes the ring, the IOC reads it; see `readout.process`).

    `meta` holds the next column, the columns filled, the buffers seen and the newest
    spad counter; `scale` the volts per code of each channel, then the sample rate, so
    a reader in another process sees calibration changes with the samples.
    """

    ring: np.ndarray  # (channels, samples) ADC codes
    meta: np.ndarray  # int64: pos, filled, updates, counter
    scale: np.ndarray  # float64: volts per code per channel, then the sample rate

    @staticmethod
    def nbytes(nchan: int, samples: int, dtype: np.dtype) -> int:
        return META_FIELDS * 8 + (nchan + 1) * 8 + nchan * samples * dtype.itemsize

    @classmethod
    def local(cls, nchan: int, samples: int, dtype: np.dtype) -> DisplayMemory:
        return cls.over(bytearray(cls.nbytes(nchan, samples, dtype)), nchan, samples, dtype)

    @classmethod
    def over(cls, buffer: Any, nchan: int, samples: int, dtype: np.dtype) -> DisplayMemory:
        """Views of `buffer` (an mmap, say), laid out as `nbytes` counts it."""
        meta = np.frombuffer(buffer, np.int64, META_FIELDS, 0)
        scale = np.frombuffer(buffer, np.float64, nchan + 1, META_FIELDS * 8)
        ring = np.frombuffer(
            buffer, dtype, nchan * samples, META_FIELDS * 8 + (nchan + 1) * 8
        ).reshape(nchan, samples)
        return cls(ring=ring, meta=meta, scale=scale)


META_FIELDS = 4
_POS, _FILLED, _UPDATES, _COUNTER = range(META_FIELDS)


class DisplayStage:
    """The ring and its statistics. `memory` and `lock` are given when another process
    shares them: the writer (`update`, `set_calibration`) makes the stage with the sample
    rate, the reader (`snapshot`) with None, leaving the writer's calibration in place."""

    def __init__(
        self,
        channel_map: ChannelMap,
        samples: int,
        sample_rate_hz: float | None = 0.0,
        memory: DisplayMemory | None = None,
        lock: Any = None,
    ):
        if samples < 2:
            raise ValueError(f"display samples must be >= 2, got {samples}")
        self.channel_map = channel_map
        self.size = samples
        dtype = code_dtype(channel_map)
        self._mem = memory or DisplayMemory.local(channel_map.nchan, samples, dtype)
        if self._mem.ring.shape != (channel_map.nchan, samples) or self._mem.ring.dtype != dtype:
            raise ValueError("display memory does not fit the channel map")
        self._ring = self._mem.ring
        self._axes: tuple[int, float, Axes] | None = None  # n, rate, axes
        self._lock = lock if lock is not None else threading.Lock()
        if sample_rate_hz is not None:  # None: a reader, the writer keeps the calibration
            self._set_scale(channel_map, sample_rate_hz)

    @property
    def sample_rate_hz(self) -> float:
        return float(self._mem.scale[-1])

    def _set_scale(self, channel_map: ChannelMap, sample_rate_hz: float) -> None:
        self._mem.scale[:-1] = channel_map.volts_per_code
        self._mem.scale[-1] = sample_rate_hz

    def update(self, ai: np.ndarray, counter: int = 0) -> None:
        """Take the newest rows of a (rows, channels) block; `counter`: its last sample's spad."""
        if len(ai) == 0:
            return
        codes = self.channel_map.shift(ai[-self.size :])
        n = len(codes)
        meta = self._mem.meta
        with self._lock:
            pos = int(meta[_POS])
            first = min(n, self.size - pos)
            _write_columns(self._ring, pos, codes[:first])
            if n > first:
                _write_columns(self._ring, 0, codes[first:])
            meta[_POS] = (pos + n) % self.size
            meta[_FILLED] = min(self.size, int(meta[_FILLED]) + n)
            meta[_UPDATES] += 1
            meta[_COUNTER] = counter

    def set_calibration(self, channel_map: ChannelMap, sample_rate_hz: float) -> None:
        """New gains or clock: volts and frequencies follow from the next snapshot."""
        with self._lock:
            if channel_map.nchan != self.channel_map.nchan:
                raise ValueError("channel count changed; make a new DisplayStage")
            self.channel_map = channel_map
            self._set_scale(channel_map, sample_rate_hz)

    def snapshot(self) -> Snapshot:
        """The latest samples (a copy) and their statistics."""
        meta = self._mem.meta
        with self._lock:
            raw = self._copy_out(int(meta[_POS]), int(meta[_FILLED]))
            vpc = self._mem.scale[:-1].copy()
            rate = float(self._mem.scale[-1])
            updates = int(meta[_UPDATES])
            counter = int(meta[_COUNTER])
        return Snapshot(
            raw=raw,
            volts_per_code=vpc,
            axes=self._axes_for(raw.shape[-1], rate),
            sample_rate_hz=rate,
            updates=updates,
            counter=counter,
        )

    def _copy_out(self, pos: int, n: int) -> np.ndarray:
        """The ring's samples, oldest first, in a new array (call with the lock held)."""
        raw = np.empty((self._ring.shape[0], n), dtype=self._ring.dtype)
        if n < self.size:
            raw[:] = self._ring[:, :n]
        else:
            tail = self.size - pos
            raw[:, :tail] = self._ring[:, pos:]
            raw[:, tail:] = self._ring[:, :pos]
        return raw

    def _axes_for(self, n: int, rate: float) -> Axes:
        cached = self._axes
        if cached is None or cached[:2] != (n, rate):
            cached = self._axes = (n, rate, Axes.build(n, rate))
        return cached[2]


def code_dtype(channel_map: ChannelMap) -> np.dtype:
    """The dtype of the codes `channel_map.shift` makes from the stream's words.

    16-bit words give codes that fit int16 (even when a per-channel shift array
    promotes them to int32); 32-bit words (24-bit modules, data32) need int32.
    """
    wide = any(s.word_size > 2 for s in channel_map.sites)
    return np.dtype(np.int32 if wide else np.int16)


def _write_columns(ring: np.ndarray, start: int, codes: np.ndarray) -> None:
    """Write (rows, channels) `codes` into the (channels, size) ring from column `start`."""
    for first in range(0, len(codes), TRANSPOSE_ROWS):
        block = codes[first : first + TRANSPOSE_ROWS]
        ring[:, start + first : start + first + len(block)] = block.T


def code_statistics(
    raw: np.ndarray, volts_per_code: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per channel (row) minimum, maximum, mean and RMS in volts, from integer codes.

    The sums are taken over the codes, so no float64 copy of the samples is made;
    only the per-channel results are scaled.
    """
    nchan, n = raw.shape
    if n == 0:
        zeros = np.zeros(nchan)
        return zeros, zeros, zeros, zeros
    low = raw.min(axis=1) * volts_per_code
    high = raw.max(axis=1) * volts_per_code
    sums, squares = code_sums(raw)
    mean = sums / n * volts_per_code
    rms = np.sqrt(squares / n) * np.abs(volts_per_code)
    # A negative scale would swap the extremes; the modules' scales are positive today.
    return np.minimum(low, high), np.maximum(low, high), mean, rms


def code_sums(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row sum and sum of squares of integer codes.

    16-bit codes are summed exactly: a square fits int32 and 2**33 squares fit int64.
    Wider codes (24-bit) go through float64: a square is exact, its sum rounds at the
    1e-16 level. One row at a time, so the scratch row stays small (in cache, and far
    below the IOC's mmap threshold, which would make every frame fault in new pages).
    """
    exact = raw.dtype.itemsize <= 2
    acc = np.dtype(np.int64 if exact else np.float64)
    square = np.empty(raw.shape[-1], dtype=np.int32 if exact else np.float64)
    sums = np.empty(len(raw), dtype=acc)
    squares = np.empty(len(raw), dtype=acc)
    for i, row in enumerate(raw):
        sums[i] = row.sum(dtype=acc)
        np.multiply(row, row, out=square, dtype=square.dtype)
        squares[i] = square.sum(dtype=acc)
    return sums, squares


def hann_window(n: int) -> np.ndarray:
    # float32 arithmetic: half the memory traffic of float64 and ample for 24-bit data.
    return np.hanning(n).astype(np.float32)


def frequency_axis(n: int, rate_hz: float) -> np.ndarray:
    """The frequency of each bin of an n-sample spectrum (bin numbers without a rate)."""
    if rate_hz > 0:
        return np.fft.rfftfreq(n, 1.0 / rate_hz)
    return np.arange(n // 2 + 1, dtype=float)


def amplitude_spectrum(volts: np.ndarray, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Single-sided amplitude spectrum per row (channel) with a Hann window, in volts.

    Scaled by the window's sum so a sine of amplitude A peaks at A (DC shows its level).
    """
    n = volts.shape[-1]
    if n < 2:
        return np.zeros((volts.shape[0] if volts.ndim == 2 else 1, 0)), np.zeros(0)
    return _windowed_spectrum(volts, hann_window(n)), frequency_axis(n, rate_hz)


def _windowed_spectrum(volts: np.ndarray, window: np.ndarray) -> np.ndarray:
    windowed = volts.astype(np.float32) * window
    spec = np.abs(np.fft.rfft(windowed, axis=-1)).astype(np.float64) * (2.0 / float(window.sum()))
    spec[..., 0] /= 2.0
    if volts.shape[-1] % 2 == 0:
        spec[..., -1] /= 2.0  # the Nyquist bin has no mirror image either
    return spec


def _frozen(array: np.ndarray) -> np.ndarray:
    """Cached results are shared with PVs: nobody may change them in place."""
    array.flags.writeable = False
    return array
