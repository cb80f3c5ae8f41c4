"""What both WebSocket protocols share: token at connect, flow control, safe dispatch."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

from dtacq_ioc.bridge.auth import TokenCheck
from dtacq_ioc.bridge.outbox import Outbox
from dtacq_ioc.bridge.ratelog import RateLimitedLog
from dtacq_ioc.bridge.source import PvSource
from dtacq_ioc.config import Config

log = logging.getLogger(__name__)


MAX_JSON_DEPTH = 32  # both protocols nest 3 deep; a trigger's args or logitems a few more

_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


class BadRequest(Exception):
    """A client's message that cannot be served; the text goes back to the client."""


class Malformed(BadRequest):
    """A message that is not a JSON object within the bounds."""


def parse_message(payload: bytes, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A client's JSON text, bounded in size and nesting before the parser sees it
    (the parser recurses once per level: deep nesting would exhaust the stack)."""
    if len(payload) > max_bytes:
        raise Malformed(f"message of {len(payload)} bytes refused: at most {max_bytes}")
    # Brackets inside strings do not nest; an unterminated string keeps its brackets
    # counted, which only errs on the side of refusing.
    text = _JSON_STRINGS.sub(b"", payload)
    if text.count(b"[") + text.count(b"{") > max_depth:  # else it cannot be too deep
        raw = np.frombuffer(text, dtype=np.uint8)
        steps = np.isin(raw, _OPEN).astype(np.int32) - np.isin(raw, _CLOSE)
        if int(np.cumsum(steps).max()) > max_depth:
            raise Malformed(f"JSON nested deeper than {max_depth} levels refused")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Malformed("malformed message: not UTF-8 text") from None
    except ValueError as exc:
        raise Malformed(f"malformed JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


@dataclass
class Services:
    """What every session of one bridge uses."""

    config: Config
    source: PvSource
    tokens: TokenCheck
    tasks: set[asyncio.Task] = field(default_factory=set)
    sessions: set[Any] = field(default_factory=set)
    owners: dict[str, Any] = field(default_factory=dict)  # card host -> legacy session

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_event_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class Session(WebSocketServerProtocol):
    """Base of a client session; subclasses implement `handle(message)`."""

    services: Services  # set by the factory
    kind = "WebSocket"  # the protocol's name in log lines (PVWS, nEDM)

    def onConnect(self, request: Any) -> None:
        self.can_write = False
        self.messages = 0
        self.peer_name = request.peer
        self.refusals = RateLimitedLog(log, self.peer_name)
        token = (request.params.get("token") or [None])[0]
        if token is not None:
            self.can_write = self.services.tokens.check(token)
        return None

    def onOpen(self) -> None:
        self.outbox = Outbox(self, self.services.config.bridge.slow_client_timeout_s)
        self.outbox.attach(self.transport)
        self.services.sessions.add(self)
        log.info("%s: %s client connected (%s)", self.peer_name, self.kind, self._access())

    def _access(self) -> str:
        return "read-write" if self.can_write else "read-only"

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        outbox = getattr(self, "outbox", None)
        if outbox is None:
            return  # the handshake never completed: nothing was opened
        outbox.close()
        self.services.sessions.discard(self)
        self.closed()
        refusals = getattr(self, "refusals", None)
        if refusals is not None:
            refusals.close()

    def closed(self) -> None:
        """Subclasses release what the session held."""

    def sendMessage(  # type: ignore[override]  # autobahn's signature, less its unused options
        self, payload: bytes, isBinary: bool = False, **kwargs: Any
    ) -> None:
        if self.state != self.STATE_OPEN:
            # The client has just gone (its close is under way): nothing to tell anyone.
            self.refusals.note("sends after close", "reply after the close dropped", logging.DEBUG)
            return
        # Autobahn applies maxMessagePayloadSize to outgoing messages too; the limit is
        # meant for what clients send, and waveforms are far larger.
        limit: int = getattr(self, "maxMessagePayloadSize", 0)  # set by autobahn's options
        self.maxMessagePayloadSize = 0
        try:
            super().sendMessage(payload, isBinary, **kwargs)
        finally:
            self.maxMessagePayloadSize = limit

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages += 1
        first = self.messages == 1
        try:
            if isBinary:
                raise Malformed("binary messages are not understood; send JSON text")
            message = parse_message(payload, self.services.config.bridge.max_message_bytes)
            if not isinstance(message, dict):
                raise Malformed("a message must be a JSON object")
            if message.get("type") == "auth":
                self._auth(message, first)
                return
            self.handle(message)
        except Malformed as exc:
            self.refusals.note("malformed messages", f"refused a message: {exc}")
            self.error(str(exc), None)
        except BadRequest as exc:
            self.refusals.note("refused requests", f"refused: {exc}")
            self.error(str(exc), None)
        except Exception as exc:
            self.failed(exc, None)

    def failed(self, exc: Exception, request: Any) -> None:
        """A request that broke on the bridge's side: one line, details only at debug."""
        log.debug("%s: request failed", self.peer_name, exc_info=exc)
        self.refusals.note("failed requests", f"request failed on the bridge: {exc}", logging.ERROR)
        self.error(f"failed on the bridge: {exc}", request)

    def _auth(self, message: dict[str, Any], first: bool) -> None:
        if not first:
            raise BadRequest("auth must be the first message of a connection")
        if self.services.tokens.check(message.get("token")):
            self.can_write = True
            self.ack_auth()
        else:
            raise BadRequest("invalid token; this connection stays read-only")

    def ack_auth(self) -> None:
        """Tell the client writes are allowed (each protocol in its own words)."""

    def require_write(self, what: str) -> None:
        if not self.can_write:
            raise BadRequest(
                f"{what} refused: read-only connection (connect with ?token= or send "
                '{"type":"auth","token":...} first)'
            )

    def run(self, coro: Coroutine[Any, Any, Any], request: Any) -> None:
        """Run an async request; its BadRequest (or failure) becomes an error reply."""

        async def guarded() -> None:
            try:
                await coro
            except BadRequest as exc:
                self.refusals.note("refused requests", f"refused: {exc}")
                self.error(str(exc), request)
            except Exception as exc:
                self.failed(exc, request)

        self.services.spawn(guarded())

    def handle(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def error(self, text: str, request: Any) -> None:
        raise NotImplementedError

    def send_json(self, obj: Any) -> None:
        self.outbox.reply(json.dumps(obj, separators=(",", ":")).encode())


def make_factory(
    protocol: type[Session], services: Services, url: str | None = None
) -> WebSocketServerFactory:
    factory = WebSocketServerFactory(url)
    factory.protocol = type(protocol.__name__, (protocol,), {"services": services})  # type: ignore[assignment]  # a Session subclass
    limit = services.config.bridge.max_message_bytes
    factory.setProtocolOptions(
        maxMessagePayloadSize=limit,
        maxFramePayloadSize=limit,
        failByDrop=False,
        autoPingInterval=0,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=2,
    )
    return factory
