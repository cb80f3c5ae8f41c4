"""A fixed rate for the loops that publish PVs (the display, the status)."""

from __future__ import annotations

import asyncio
import time


class Cadence:
    """Waits for the next tick of a fixed period, counted from the first.

    Sleeping "period minus the work's time" loses the sleep's own lateness every
    tick: with eight cards on two cores a 10 Hz display ran at 9.85-9.9 Hz.
    Here a late tick is made up by the next one, so the rate holds on average; a
    loop more than a whole period behind starts afresh rather than bursting.
    """

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._next = time.monotonic() + period_s

    async def wait(self) -> None:
        now = time.monotonic()
        if now > self._next + self.period_s:
            self._next = now
        await asyncio.sleep(max(0.0, self._next - now))
        self._next += self.period_s
