"""CardPVs, the one writer of a card's readbacks: updates land whole and in order.

caproto's write awaits its subscribers' sends after storing each value; two updates
published at once (the shot's status lines come from a thread, a put's readback from
its handler, the frame from the publisher) must not interleave, or an older value stays
in a PV — and in the change cache the newer one, which then hides every later write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from support import ROOT

from dtacq_ioc.config import load_config
from dtacq_ioc.ioc.cardgroup import CardPVs, Update, unbound_handlers

STATE, PRE = "MODE:TRANS_ACT:STATE", "MODE:TRANS_ACT:PRE"


def card_pvs() -> CardPVs:
    config = load_config(ROOT / "ioc_configs" / "sim.toml")
    return CardPVs(config.cards[0], config.ioc, unbound_handlers(), None)


def slow_first_send(pv: Any, yields: int) -> None:
    """The PV's first send waits a few turns of the loop, as one to a busy client does."""
    send = pv.publish
    calls = 0

    async def publish(flags: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            for _ in range(yields):
                await asyncio.sleep(0)
        await send(flags)

    pv.publish = publish


def test_two_updates_published_at_once_land_in_the_order_they_came() -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        pvs = card_pvs()
        slow_first_send(pvs.pv(STATE), yields=5)
        older = Update(values={STATE: "ARM", PRE: 0})
        newer = Update(values={STATE: "RUN_PRE", PRE: 2000})
        await asyncio.gather(pvs.publish(older), pvs.publish(newer))
        after = (pvs.value(STATE), pvs.value(PRE))
        # the change cache agrees with the PVs: the next state is written, not skipped
        await pvs.publish(Update(values={STATE: "IDLE", PRE: 2000}))
        return after, pvs.value(STATE), pvs.value(PRE)

    after, state, pre = asyncio.run(scenario())
    assert after == ("RUN_PRE", 2000)
    assert (state, pre) == ("IDLE", 2000)
