"""Deterministic simulated signals: the exact raw words each site streams.

A `SignalTable` holds one period of raw words per site (whole seconds of
samples, capped in size), so the stream only copies rows and patches the spad
counter. Sample index i (counter i + 1) always carries row ``i % period``, which
lets a test compute exactly what the simulator sent.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dtacq_ioc.card.models import ModuleSpec
from dtacq_ioc.config import SignalConfig

DEFAULT_BASE_FREQ_HZ = 100.0  # unconfigured channel n (1-based) gets a 1 V sine at n * this
DEFAULT_TABLE_BYTES = 64 << 20  # cap on the raw words a table holds across its sites


@dataclass(frozen=True)
class SiteSignals:
    """What one aggregated site contributes to the stream."""

    site: int
    spec: ModuleSpec
    signals: tuple[SignalConfig, ...]  # per channel; missing channels get defaults
    gains: tuple[int, ...]  # current gain code per channel (ignored without gain select)
    data32: bool  # 32-bit words: ACQ43x always, 16-bit modules when data32=1

    @property
    def word_size(self) -> int:
        return 4 if self.data32 else 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<i4" if self.data32 else "<i2")


def default_signal(channel: int) -> SignalConfig:
    """The signal of a channel (0-based) the config leaves out: visible and distinct."""
    return SignalConfig(kind="sine", amplitude_v=1.0, freq_hz=DEFAULT_BASE_FREQ_HZ * (channel + 1))


def signal_volts(sig: SignalConfig, channel: int, t: np.ndarray, seed: Sequence[int]) -> np.ndarray:
    """Volts at times t for one channel; noise is seeded so the same call gives the same data."""
    # A configured signal without freq_hz reads 0 Hz: it takes the channel's default frequency.
    freq = sig.freq_hz or DEFAULT_BASE_FREQ_HZ * (channel + 1)
    if sig.kind == "sine":
        v = sig.offset_v + sig.amplitude_v * np.sin(2 * np.pi * freq * t)
    elif sig.kind == "square":
        v = sig.offset_v + sig.amplitude_v * np.where(np.sin(2 * np.pi * freq * t) >= 0, 1.0, -1.0)
    elif sig.kind == "chirp":
        tau = np.mod(t, sig.sweep_s)
        k = (sig.freq_end_hz - freq) / sig.sweep_s
        v = sig.offset_v + sig.amplitude_v * np.sin(2 * np.pi * (freq * tau + 0.5 * k * tau**2))
    else:  # "dc" and "noise": a level, with noise_v on top like every kind
        v = np.full(t.shape, sig.offset_v)
    if sig.noise_v > 0:
        v = v + np.random.default_rng(seed).normal(0.0, sig.noise_v, t.shape)
    return v


def raw_words(site: SiteSignals, volts: np.ndarray, channel: int) -> np.ndarray:
    """Volts -> the stream words of one channel, as the module's ADC would code them."""
    spec = site.spec
    gain = site.gains[channel] if channel < len(site.gains) else None
    full = spec.full_scale_code
    code = np.clip(np.rint(volts / spec.range_v(gain) * full), -full, full - 1).astype(np.int64)
    if spec.word_size == 4:
        # ACQ43x: 24-bit code left-justified, the low byte carries the channel index.
        return ((code << 8) | (channel & 0xFF)).astype(np.int32)
    if site.data32:
        return (code << 16).astype(np.int32)  # 16-bit codes in the upper half
    return code.astype(np.int16)


class SignalTable:
    """One period of raw words per site, for a given sample rate and settings."""

    def __init__(
        self,
        sites: Sequence[SiteSignals],
        rate_hz: float,
        seconds: int = 1,
        max_bytes: int = DEFAULT_TABLE_BYTES,
        seed: int = 0,
    ):
        if rate_hz <= 0:
            raise ValueError(f"sample rate must be > 0, got {rate_hz}")
        self.sites = tuple(sites)
        self.rate_hz = rate_hz
        row_bytes = sum(s.spec.nchan * s.word_size for s in self.sites) or 1
        self.period = max(1, min(round(rate_hz * seconds), max_bytes // row_bytes))
        t = np.arange(self.period, dtype=np.float64) / rate_hz
        self._words: dict[int, np.ndarray] = {}
        for s in self.sites:
            words = np.empty((self.period, s.spec.nchan), dtype=s.dtype)
            for ch in range(s.spec.nchan):
                sig = s.signals[ch] if ch < len(s.signals) else default_signal(ch)
                volts = signal_volts(sig, ch, t, seed=(seed, s.site, ch))
                words[:, ch] = raw_words(s, volts, ch)
            self._words[s.site] = words

    def table(self, site: int) -> np.ndarray:
        """The whole period of one site, shape (period, nchan); do not modify."""
        return self._words[site]

    def site_words(self, site: int, start: int, n: int) -> np.ndarray:
        """Raw words of one site for sample indices [start, start + n), shape (n, nchan)."""
        rows = (np.arange(start, start + n, dtype=np.int64)) % self.period
        return self._words[site][rows]


class TableCache:
    """The latest SignalTable, shared by a card's stream and its shots (built once per setting)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: object = None
        self._table: SignalTable | None = None

    def get(self, sites: Sequence[SiteSignals], rate_hz: float) -> SignalTable:
        key = (rate_hz, tuple(sites))
        with self._lock:
            if self._table is None or key != self._key:
                self._table = SignalTable(sites, rate_hz, seed=0)
                self._key = key
            return self._table


def counters(start: int, n: int) -> np.ndarray:
    """spad[0] for sample indices [start, start + n): index + 1, wrapping at 2**32."""
    return ((np.arange(start, start + n, dtype=np.uint64) + 1) & 0xFFFFFFFF).astype(np.uint32)
