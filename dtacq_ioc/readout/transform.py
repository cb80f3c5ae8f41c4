"""Stream words -> ADC codes -> volts, and downsampling; numpy only, no per-sample Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dtacq_ioc.card.models import ModuleSpec


def site_bit_shift(spec: ModuleSpec, word_size: int) -> int:
    """Right shift turning one stream word of this site into its ADC code.

    A 16-bit module run with data32=1 sends its code in the upper half of a
    32-bit word, so the extra bytes add to the module's own shift.
    """
    return spec.bit_shift + 8 * max(0, word_size - spec.word_size)


def shift_codes(words: np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """Arithmetic right shift (numpy shifts signed ints arithmetically); no copy for 0."""
    if np.isscalar(shift) or np.ndim(shift) == 0:
        shift = int(shift)
        if shift == 0:
            return words
    elif not np.any(shift):
        return words
    shifted: np.ndarray = np.right_shift(words, shift)
    return shifted


def to_volts(codes: np.ndarray, volts_per_code: float | np.ndarray) -> np.ndarray:
    volts: np.ndarray = np.multiply(codes, volts_per_code, dtype=np.float64)
    return volts


def downsample_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of each whole block of `n` samples along axis 0, as float64 (a tail is dropped)."""
    if n < 1:
        raise ValueError(f"downsample must be >= 1, got {n}")
    blocks = len(x) // n
    shaped = x[: blocks * n].reshape(blocks, n, *x.shape[1:])
    means: np.ndarray = shaped.mean(axis=1, dtype=np.float64)
    return means


class Downsampler:
    """Block means over a stream of buffers: a partial block waits for the next buffer."""

    def __init__(self, n: int, nchan: int):
        if n < 1:
            raise ValueError(f"downsample must be >= 1, got {n}")
        self.n = n
        self._tail = np.empty((n, nchan), dtype=np.float64)
        self._held = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Means of the whole blocks completed by `x` (rows, channels), float64."""
        out_parts = []
        start = 0
        if self._held:
            take = min(self.n - self._held, len(x))
            self._tail[self._held : self._held + take] = x[:take]
            self._held += take
            start = take
            if self._held == self.n:
                out_parts.append(self._tail.mean(axis=0, keepdims=True))
                self._held = 0
        body = x[start:]
        whole = len(body) // self.n * self.n
        if whole:
            out_parts.append(downsample_mean(body[:whole], self.n))
        rest = len(body) - whole
        if rest:
            self._tail[:rest] = body[whole:]
            self._held = rest
        if not out_parts:
            return np.empty((0, self._tail.shape[1]), dtype=np.float64)
        return out_parts[0] if len(out_parts) == 1 else np.concatenate(out_parts)

    @property
    def held(self) -> int:
        """Samples waiting for their block to complete."""
        return self._held

    def reset(self) -> None:
        self._held = 0


@dataclass(frozen=True)
class SiteChannels:
    """One aggregated site as the readout sees it."""

    site: int
    spec: ModuleSpec
    nchan: int
    word_size: int
    gains: tuple[int, ...] = ()  # per channel; empty = the module has none (or unknown)


class ChannelMap:
    """Per aggregated channel (0-based, site order): site, shift and volts per code."""

    def __init__(self, sites: Sequence[SiteChannels]):
        self.sites = tuple(sites)
        shifts: list[int] = []
        vpc: list[float] = []
        self.site_of: list[int] = []
        self.index_in_site: list[int] = []
        for s in self.sites:
            shift = site_bit_shift(s.spec, s.word_size)
            for ch in range(s.nchan):
                gain = s.gains[ch] if ch < len(s.gains) else None
                shifts.append(shift)
                vpc.append(s.spec.volts_per_code(gain if s.spec.gain_codes else None))
                self.site_of.append(s.site)
                self.index_in_site.append(ch)
        self.nchan = len(shifts)
        self.shifts = np.array(shifts, dtype=np.int32)
        self.volts_per_code = np.array(vpc, dtype=np.float64)
        # Most cards run one module type: a scalar shift avoids a broadcast per buffer.
        self.uniform_shift: int | None = int(shifts[0]) if len(set(shifts)) == 1 else None

    def shift(
        self, ai: np.ndarray, channels: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """ADC codes of a (rows, channels) block of stream words (columns = `channels`)."""
        if self.uniform_shift is not None:
            return shift_codes(ai, self.uniform_shift)
        shifts = self.shifts if channels is None else self.shifts[list(channels)]
        return shift_codes(ai, shifts)

    def channel_shift(self, channel: int) -> int:
        return int(self.shifts[channel])
