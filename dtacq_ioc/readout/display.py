"""The display stage: the latest N samples per channel, and on demand their statistics.

`update` runs on the socket thread for every buffer and only copies the newest
rows into a ring; `snapshot` (called at the display rate from the IOC) does the
arithmetic: volts, min/max/mean/RMS, and a Hann-windowed amplitude spectrum.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from dtacq_ioc.readout.transform import ChannelMap


@dataclass(frozen=True)
class Snapshot:
    """Arrays are (channels, samples) or (channels, bins); statistics are per channel."""

    raw: np.ndarray  # ADC codes (bit shift applied), oldest first
    volts: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    rms: np.ndarray
    spectrum: np.ndarray  # amplitude in volts (a sine of amplitude A shows as A)
    freq_hz: np.ndarray  # frequency of each spectrum bin (empty when the rate is unknown)
    timebase_s: np.ndarray  # seconds from the oldest sample shown
    sample_rate_hz: float
    updates: int  # buffers seen so far
    counter: int = 0  # spad sample counter of the newest sample shown
    spectrum_fresh: bool = True  # False: the spectrum is an earlier snapshot's

    @property
    def samples(self) -> int:
        return self.raw.shape[-1]


class DisplayStage:
    def __init__(self, channel_map: ChannelMap, samples: int, sample_rate_hz: float = 0.0):
        if samples < 2:
            raise ValueError(f"display samples must be >= 2, got {samples}")
        self.channel_map = channel_map
        self.size = samples
        self.sample_rate_hz = sample_rate_hz
        self._ring = np.zeros((samples, channel_map.nchan), dtype=np.int32)
        self._pos = 0  # next row to write
        self._filled = 0
        self._updates = 0
        self._counter = 0
        self._spectrum: tuple[np.ndarray, np.ndarray, float] | None = None  # spec, freq, rate
        self._lock = threading.Lock()

    def update(self, ai: np.ndarray, counter: int = 0) -> None:
        """Take the newest rows of a (rows, channels) block; `counter`: its last sample's spad."""
        rows = len(ai)
        if rows == 0:
            return
        tail = ai[-self.size :]
        codes = self.channel_map.shift(tail)
        n = len(codes)
        with self._lock:
            first = min(n, self.size - self._pos)
            self._ring[self._pos : self._pos + first] = codes[:first]
            if n > first:
                self._ring[: n - first] = codes[first:]
            self._pos = (self._pos + n) % self.size
            self._filled = min(self.size, self._filled + n)
            self._updates += 1
            self._counter = counter

    def set_calibration(self, channel_map: ChannelMap, sample_rate_hz: float) -> None:
        """New gains or clock: volts and frequencies follow from the next snapshot."""
        with self._lock:
            if channel_map.nchan != self.channel_map.nchan:
                raise ValueError("channel count changed; make a new DisplayStage")
            self.channel_map = channel_map
            self.sample_rate_hz = sample_rate_hz

    def snapshot(self, spectrum: bool = True) -> Snapshot:
        """The latest samples and their statistics; the spectrum only when `spectrum`
        (it is most of the work), else the last one computed."""
        with self._lock:
            n = self._filled
            # Channel-major from here on: each channel's samples are contiguous, so the
            # statistics, the FFT and the per-channel PVs never walk strided columns.
            raw = np.empty((self._ring.shape[1], n), dtype=self._ring.dtype)
            if n < self.size:
                raw[:] = self._ring[:n].T
            else:
                tail = self.size - self._pos
                raw[:, :tail] = self._ring[self._pos :].T
                raw[:, tail:] = self._ring[: self._pos].T
            vpc = self.channel_map.volts_per_code
            rate = self.sample_rate_hz
            updates = self._updates
            counter = self._counter
        volts = raw * np.asarray(vpc, dtype=np.float64)[:, None]
        nchan = raw.shape[0]
        if n:
            minimum, maximum = volts.min(axis=1), volts.max(axis=1)
            mean = volts.mean(axis=1)
            rms = np.sqrt(np.einsum("ij,ij->i", volts, volts) / n)
        else:
            minimum = maximum = mean = rms = np.zeros(nchan)
        cached = self._spectrum
        fresh = (
            spectrum
            or cached is None
            or cached[0].shape != (nchan, n // 2 + 1 if n >= 2 else 0)
            or cached[2] != rate
        )
        if fresh:
            self._spectrum = cached = (*amplitude_spectrum(volts, rate), rate)
        spec, freq, _ = cached
        timebase = np.arange(n) / rate if rate > 0 else np.arange(n, dtype=np.float64)
        return Snapshot(
            raw=raw,
            volts=volts,
            minimum=minimum,
            maximum=maximum,
            mean=mean,
            rms=rms,
            spectrum=spec,
            freq_hz=freq,
            timebase_s=timebase,
            sample_rate_hz=rate,
            updates=updates,
            counter=counter,
            spectrum_fresh=fresh,
        )


def amplitude_spectrum(volts: np.ndarray, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Single-sided amplitude spectrum per row (channel) with a Hann window, in volts.

    Scaled by the window's sum so a sine of amplitude A peaks at A (DC shows its level).
    """
    n = volts.shape[-1]
    if n < 2:
        return np.zeros((volts.shape[0] if volts.ndim == 2 else 1, 0)), np.zeros(0)
    # float32 arithmetic: half the memory traffic of float64 and ample for 24-bit data.
    window = np.hanning(n).astype(np.float32)
    windowed = volts.astype(np.float32) * window
    spec = np.abs(np.fft.rfft(windowed, axis=-1)).astype(np.float64) * (2.0 / float(window.sum()))
    spec[..., 0] /= 2.0
    if n % 2 == 0:
        spec[..., -1] /= 2.0  # the Nyquist bin has no mirror image either
    bins = spec.shape[-1]
    freq = np.fft.rfftfreq(n, 1.0 / rate_hz) if rate_hz > 0 else np.arange(bins, dtype=float)
    return spec, freq
