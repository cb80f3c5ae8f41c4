"""Cards of one IOC armed together: one trigger, one shot on each, one shot number.

As D-TACQ's host API does it, the cards waiting for a front-panel line are armed first
and the card that fires the soft trigger last, so no card misses the edge; each card's
shot counter is set first, so the shots all carry the same number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from dtacq_ioc.contract import ACTION
from dtacq_ioc.ioc.pvs import PutRefused
from dtacq_ioc.ioc.shots import ShotControl

log = logging.getLogger(__name__)

WHAT = "SHOTS:ARM"


class ShotGroup:
    """The handler of the IOC's SHOTS:ARM: every card in TRANSIENT mode armed at once."""

    def __init__(self, shots: Sequence[ShotControl]):
        self.shots = list(shots)

    async def arm(self, value: Any) -> str:
        if value != ACTION[1]:
            return ACTION[0]
        cards = [s for s in self.shots if s.transient]
        if not cards:
            raise PutRefused(f"{WHAT}: no card is in TRANSIENT mode")
        for s in cards:
            s.check_can_arm(WHAT)  # all or none: refuse before any card is armed
        last = max([await s.shot_counter() for s in cards])
        followers = [s for s in cards if not s.holds_trigger]
        leaders = [s for s in cards if s.holds_trigger]
        for s in (*followers, *leaders):
            await s.arm_shot(WHAT, after_shot=last)
        log.info("%s: %d cards armed for shot %d", WHAT, len(cards), last + 1)
        return ACTION[0]
