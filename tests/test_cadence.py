"""The publishing loops' rate: a late tick is made up, a loop far behind starts afresh.

A fake clock stands in for time, so the test checks the arithmetic, not the machine's speed.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from dtacq_ioc.ioc import cadence as cadence_module
from dtacq_ioc.ioc.cadence import Cadence


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    # The cadence module's own names only: asyncio's event loop keeps the real clock.
    fake = FakeClock()
    monkeypatch.setattr(cadence_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr(cadence_module, "asyncio", SimpleNamespace(sleep=fake.sleep))
    return fake


def ticks(clock: FakeClock, cadence: Cadence, work_s: list[float]) -> list[float]:
    """Run one tick per entry of `work_s` (the work's time before each wait)."""

    async def loop() -> None:
        for work in work_s:
            clock.now += work
            await cadence.wait()

    asyncio.run(loop())
    return clock.slept


def test_the_work_time_is_taken_from_the_sleep(clock):
    assert ticks(clock, Cadence(0.1), [0.02, 0.03, 0.0]) == [0.08, 0.07, 0.1]


def test_a_late_tick_is_made_up_by_the_next(clock):
    # 0.15 s of work overruns the first tick (due at 0.1 s) by 0.05 s: it goes at once,
    # and the next ones are back on the 0.1 s grid, at 0.2 and 0.3 s after the start.
    cadence = Cadence(0.1)
    assert ticks(clock, cadence, [0.15, 0.0, 0.0]) == [0.0, 0.05, 0.1]
    assert clock.now == pytest.approx(100.3)


def test_a_loop_more_than_a_period_behind_starts_afresh(clock):
    # 0.35 s late: no burst of three ticks to catch up, the grid restarts from now.
    assert ticks(clock, Cadence(0.1), [0.45, 0.0, 0.02]) == [0.0, 0.1, 0.08]
