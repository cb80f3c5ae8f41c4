"""The PVWS protocol (ORNL's PV Web Socket, spoken by pvws.js and dbwr).

Client -> bridge: subscribe/monitor, clear, list, write, ping, echo (and our
`auth`). Bridge -> client: `update` messages (metadata first, then what
changed), `list`, `error`. Arrays go at the IOC's rate; a client that cannot
keep up gets the latest value per PV (see outbox.py).

Each client may hold `max_subscriptions` PVs (past it, names are refused in one
error line), of which `max_pending_searches` are looked up at once; the others
wait their turn as names only, so what a client asks for costs the bridge and
caproto a bounded amount whatever it asks. A name no server answers within
`search_timeout_s` is reported, stays in the client's list, and is otherwise
forgotten (subscribing to it again searches again).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dtacq_ioc.bridge.session import BadRequest, Session
from dtacq_ioc.bridge.source import Delta, PvEntry, WriteRefused, pvws_update

log = logging.getLogger(__name__)

MAX_NAME = 256


class PvwsSession(Session):
    kind = "PVWS"

    def onOpen(self) -> None:
        self.subs: dict[str, bool] = {}  # PV name -> first (full) update sent
        # Every name in subs is in at most one of these (else it is simply subscribed):
        self.waiting: dict[str, None] = {}  # not yet asked of the source (in order)
        self.searching: set[str] = set()  # asked; no server has answered yet
        self.missing: set[str] = set()  # nobody served it: the source forgot it
        super().onOpen()

    def closed(self) -> None:
        for name in list(getattr(self, "subs", {})):
            if name not in self.missing and name not in self.waiting:
                self.services.source.unsubscribe(name, self)
        self.subs = {}
        self.waiting = {}
        self.searching = set()
        self.missing = set()

    def encode_update(self, name: str, fields: dict[str, Any]) -> bytes:
        return pvws_update(name, fields)

    def error(self, text: str, request: Any) -> None:
        msg: dict[str, Any] = {"type": "error", "message": text}
        if isinstance(request, str):
            msg["pv"] = request
        self.send_json(msg)

    # -- from the PV source --

    def pv_update(self, entry: PvEntry, delta: Delta) -> None:
        if entry.name not in self.subs:
            return
        if entry.name in self.searching:
            self.searching.discard(entry.name)
            self._ask_waiting()
        if not self.subs[entry.name]:
            self._send_full(entry)
        else:
            self.outbox.update(entry.name, delta.fields, delta.json())

    def pv_missing(self, entry: PvEntry) -> None:
        name = entry.name
        if name not in self.subs:
            return
        if name in self.searching:
            self.searching.discard(name)
            self._ask_waiting()
        if self.services.source.entries.get(name) is not entry:
            self.missing.add(name)  # forgotten by the source: no more news of it
        text = f"PV {name} not found: no Channel Access server answered"
        self.refusals.note("names not found", text)
        notice = {"type": "error", "message": text, "pv": name}
        self.outbox.notice(name, json.dumps(notice, separators=(",", ":")).encode())
        self.outbox.update(name, {"severity": "UNDEFINED", "connected": False})

    def _send_full(self, entry: PvEntry) -> None:
        if not entry.connected or not entry.fields:
            if entry.missing:
                self.pv_missing(entry)
            return
        fields = entry.full()
        fields["readonly"] = not (self.can_write and entry.writable)
        self.subs[entry.name] = True
        self.outbox.update(entry.name, fields)

    # -- requests --

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("subscribe", "monitor"):
            self._subscribe(_names(message))
        elif kind == "clear":
            for name in _names(message):
                if self.subs.pop(name, None) is not None:
                    self.outbox.forget(name)
                    if name in self.missing:
                        self.missing.discard(name)
                    elif name in self.waiting:
                        del self.waiting[name]  # never asked of the source
                    else:
                        self.searching.discard(name)
                        self.services.source.unsubscribe(name, self)
            self._ask_waiting()
        elif kind == "list":
            self.send_json({"type": "list", "pvs": sorted(self.subs)})
        elif kind == "write":
            self._write(message)
        elif kind == "ping":
            self.sendPing()
        elif kind == "echo":
            self.send_json(message)
        elif not isinstance(kind, str):
            raise BadRequest('a message needs a string "type"')
        else:
            raise BadRequest(f"unknown message type {kind[:64]!r}")

    def _subscribe(self, names: list[str]) -> None:
        limit = self.services.config.bridge.max_subscriptions
        refused = 0
        for name in dict.fromkeys(names):
            if name in self.missing:
                self.missing.discard(name)  # asked again: search again
            elif name in self.subs:
                continue
            elif len(self.subs) >= limit:
                refused += 1
                continue
            self.subs[name] = False
            self.waiting[name] = None
        self._ask_waiting()
        if refused:
            raise BadRequest(
                f"{refused} PV names refused: at most {limit} PVs per connection (clear some first)"
            )

    def _ask_waiting(self) -> None:
        """Ask the source for waiting names, in order, while fewer than the limit are being
        looked up (a name the source already has, found or being searched, costs nothing).

        Refilled only once half the searches have ended: caproto re-sends every unanswered
        search whenever one starts, so names started one by one would each cost a burst."""
        source = self.services.source
        limit = self.services.config.bridge.max_pending_searches
        if len(self.searching) > limit // 2:
            return
        while self.waiting:
            name = next(iter(self.waiting))
            new = name not in source.entries
            if new and len(self.searching) >= limit:
                return
            del self.waiting[name]
            entry = source.subscribe(name, self)
            if new:
                self.searching.add(name)
            self._send_full(entry)

    def _write(self, message: dict[str, Any]) -> None:
        name = message.get("pv")
        if not isinstance(name, str):
            raise BadRequest('write needs "pv" (a string)')
        self.require_write(f"write to {name}")
        if name not in self.subs:
            raise BadRequest(f"write to {name} refused: subscribe to it first")
        if "value" not in message:
            raise BadRequest(f'write to {name} needs a "value"')
        value = message["value"]
        if not isinstance(value, int | float | str | list) or value is None:
            raise BadRequest(f"write to {name}: value must be a number, string or list")

        async def write() -> None:
            try:
                await self.services.source.write(name, value)
            except WriteRefused as exc:
                raise BadRequest(str(exc)) from None

        self.run(write(), name)


def _names(message: dict[str, Any]) -> list[str]:
    pvs = message.get("pvs")
    if not isinstance(pvs, list) or not all(
        isinstance(n, str) and 0 < len(n) <= MAX_NAME and n.isprintable() and " " not in n
        for n in pvs
    ):
        raise BadRequest(f'"pvs" must be a list of PV names (strings of 1..{MAX_NAME} characters)')
    return pvs
