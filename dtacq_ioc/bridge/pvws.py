"""The PVWS protocol (ORNL's PV Web Socket, spoken by pvws.js and dbwr).

Client -> bridge: subscribe/monitor, clear, list, write, ping, echo (and our
`auth`). Bridge -> client: `update` messages (metadata first, then what
changed), `list`, `error`. Arrays go at the IOC's rate; a client that cannot
keep up gets the latest value per PV (see outbox.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dtacq_ioc.bridge.session import BadRequest, Session
from dtacq_ioc.bridge.source import Delta, PvEntry, WriteRefused

log = logging.getLogger(__name__)

MAX_PVS_PER_CLIENT = 5000
MAX_NAME = 256


class PvwsSession(Session):
    kind = "PVWS"

    def onOpen(self) -> None:
        self.subs: dict[str, bool] = {}  # PV name -> first (full) update sent
        super().onOpen()

    def closed(self) -> None:
        for name in list(getattr(self, "subs", {})):
            self.services.source.unsubscribe(name, self)
        self.subs = {}

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
        if not self.subs[entry.name]:
            self._send_full(entry)
        else:
            self.outbox.update(entry.name, delta.fields, delta.json())

    def pv_missing(self, entry: PvEntry) -> None:
        if entry.name in self.subs:
            self.error(f"PV {entry.name} not found: no Channel Access server answered", entry.name)
            self.outbox.update(entry.name, {"severity": "UNDEFINED", "connected": False})

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
        new = [n for n in dict.fromkeys(names) if n not in self.subs]
        if len(self.subs) + len(new) > MAX_PVS_PER_CLIENT:
            raise BadRequest(f"at most {MAX_PVS_PER_CLIENT} PVs per connection")
        for name in new:
            self.subs[name] = False
            entry = self.services.source.subscribe(name, self)
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
