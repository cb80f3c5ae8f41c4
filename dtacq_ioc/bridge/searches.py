"""Forgetting a Channel Access name search nobody answered (caproto 1.3 client internals).

caproto's asyncio client keeps every name it was asked for: the PV object
(`Context.pvs`, ~7 KB with its events, locks and callback tables), its search
item (`SearchResults._searches`, kept even after an answer), an empty address
map (`name_to_addrs` is a defaultdict, filled by each cache lookup) and the
unanswered search itself, re-sent for 8 minutes and then every minute forever.
Each new search re-sends *all* unanswered ones at once, so a few thousand
unknown names overflow the server's UDP receive buffer (about 200 KB here) and
the newest names, at the end of every burst, are never heard: nothing new
resolves for minutes. `SearchResults.cancel()` does not help: it looks the
search id up under the search item, so it removes nothing.

`forget_search` removes all of that for one name whose search is unanswered,
so a name nobody serves costs nothing once its caller has given up.
"""

from __future__ import annotations

from typing import Any


def forget_search(context: Any, name: str, priority: int = 0) -> bool:
    """Drop `name`'s PV and unanswered search from caproto's client; False if it was found.

    A PV whose search was answered is left alone (it has a circuit, and may be shared).
    """
    with context.pv_cache_lock:
        pv = context.pvs.get((name, priority))
        if pv is not None and pv.circuit_ready.is_set():
            return False
        context.pvs.pop((name, priority), None)
        context.pvs_needing_circuits.pop(name, None)
    results = context.broadcaster.results
    with results._lock:
        item = results._searches_by_name.pop(name, None)
        if item is not None:
            # Only the unanswered ones are scanned: they are few once callers give up.
            cids = [cid for cid, it in results._unanswered_searches.items() if it is item]
            for cid in cids:
                del results._unanswered_searches[cid]
                results._searches.pop(cid, None)
        if not results.name_to_addrs.get(name):
            results.name_to_addrs.pop(name, None)
    return True
