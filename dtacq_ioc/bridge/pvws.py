"""The PVWS protocol (ORNL's PV Web Socket, spoken by pvws.js and dbwr).

Client -> bridge: subscribe/monitor, clear, list, write, ping, echo (and our
`auth`). Bridge -> client: `update` messages (metadata first, then what
changed), `list`, `error`. Arrays go at the IOC's rate; a client that cannot
keep up gets the latest value per PV (see outbox.py).

Each client may hold `max_subscriptions` PVs and have `max_pending_searches` of
them still being looked up; past either, names are refused in one error line. A
name no server answers is reported, stays in the client's list, and is otherwise
forgotten (subscribing to it again searches again).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dtacq_ioc.bridge.session import BadRequest, Session
from dtacq_ioc.bridge.source import Delta, PvEntry, WriteRefused

log = logging.getLogger(__name__)

MAX_NAME = 256


class PvwsSession(Session):
    kind = "PVWS"

    def onOpen(self) -> None:
        self.subs: dict[str, bool] = {}  # PV name -> first (full) update sent
        self.searching: set[str] = set()  # subscribed names no server has answered yet
        self.missing: set[str] = set()  # subscribed names nobody served: the source forgot them
        super().onOpen()

    def closed(self) -> None:
        for name in list(getattr(self, "subs", {})):
            if name not in self.missing:
                self.services.source.unsubscribe(name, self)
        self.subs = {}
        self.searching = set()
        self.missing = set()

    def encode_update(self, name: str, fields: dict[str, Any]) -> bytes:
        return json.dumps({"type": "update", "pv": name, **fields}, separators=(",", ":")).encode()

    def error(self, text: str, request: Any) -> None:
        msg: dict[str, Any] = {"type": "error", "message": text}
        if isinstance(request, str):
            msg["pv"] = request
        self.send_json(msg)

    # -- from the PV source --

    def pv_update(self, entry: PvEntry, delta: Delta) -> None:
        if entry.name not in self.subs:
            return
        self.searching.discard(entry.name)
        if not self.subs[entry.name]:
            self._send_full(entry)
        else:
            self.outbox.update(entry.name, delta.fields, delta.json())

    def pv_missing(self, entry: PvEntry) -> None:
        name = entry.name
        if name not in self.subs:
            return
        self.searching.discard(name)
        if self.services.source.entries.get(name) is not entry:
            self.missing.add(name)  # forgotten by the source: no more news of it
        text = f"PV {name} not found: no Channel Access server answered"
        self.refusals.note("names not found", text)
        self.error(text, name)
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
                    self.searching.discard(name)
                    if name in self.missing:
                        self.missing.discard(name)
                    else:
                        self.services.source.unsubscribe(name, self)
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
        cfg = self.services.config.bridge
        source = self.services.source
        full = soon = 0  # names refused: too many PVs, too many still being looked up
        for name in dict.fromkeys(names):
            if name in self.subs and name not in self.missing:
                continue
            if name not in self.subs and len(self.subs) >= cfg.max_subscriptions:
                full += 1
                continue
            entry = source.entries.get(name)
            searches = entry is None or entry.searching
            if searches and len(self.searching) >= cfg.max_pending_searches:
                soon += 1
                continue
            self.missing.discard(name)
            self.subs[name] = False
            entry = source.subscribe(name, self)
            if entry.searching:
                self.searching.add(name)
            self._send_full(entry)
        why = []
        if full:
            why.append(f"at most {cfg.max_subscriptions} PVs per connection (clear some first)")
        if soon:
            why.append(
                f"at most {cfg.max_pending_searches} names may be looked up at once "
                "(subscribe again once those are answered)"
            )
        if why:
            raise BadRequest(f"{full + soon} PV names refused: {'; '.join(why)}")

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
