"""Shared helpers of the tests/test_card_*.py files (no tests here).

A simulated card gets the test's own loopback address; most tests run the
simulator in-process (it starts in well under a second), the stream rate test
runs it as a separate process so the two sides don't share one interpreter.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from support import sim_card_toml, write_config

from dtacq_ioc.card.card import Card
from dtacq_ioc.config import Config, load_config


def card_config(tmp_path: Path, host: str, **card_kw: str) -> Config:
    """A config with one simulated card named DIG on `host` (see support.sim_card_toml)."""
    return load_config(write_config(tmp_path, sim_card_toml("DIG", host, **card_kw)))


@contextlib.contextmanager
def simulated(config: Config) -> Iterator[object]:
    """The config's simulated cards, in this process, stopped on exit."""
    from dtacq_ioc.sim.server import Simulator

    sim = Simulator(config)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


@contextlib.contextmanager
def connected(config: Config) -> Iterator[Card]:
    card = Card(config.cards[0], config.ioc.min_sample_rate_hz)
    try:
        card.connect()
        yield card
    finally:
        card.close()


@dataclass
class Collector:
    """on_buffer/on_end pair that keeps the spad counters and signals the end."""

    keep_ai: bool = False
    counters: list[np.ndarray] = field(default_factory=list)
    ai: list[np.ndarray] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    ends: list[Exception | None] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    first: threading.Event = field(default_factory=threading.Event)

    def on_buffer(self, samples: np.ndarray) -> None:
        # The view is only valid during the call: copy what the test looks at later.
        self.counters.append(samples["spad"][:, 0].copy())
        if self.keep_ai:
            self.ai.append(samples["ai"].copy())
        self.sizes.append(len(samples))
        self.first.set()

    def on_end(self, exc: Exception | None) -> None:
        self.ends.append(exc)
        self.ended.set()

    def all_counters(self) -> np.ndarray:
        return np.concatenate(self.counters) if self.counters else np.empty(0, np.uint32)


def gaps(counters: np.ndarray) -> np.ndarray:
    """Sizes of the counter jumps (samples missing at each), 32-bit wrap included."""
    step = np.diff(counters.astype(np.int64)) % (1 << 32)
    return step[step != 1] - 1
