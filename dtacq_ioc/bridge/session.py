"""What both WebSocket protocols share: token at connect, flow control, safe dispatch."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

from dtacq_ioc.bridge.auth import TokenCheck
from dtacq_ioc.bridge.outbox import Outbox
from dtacq_ioc.bridge.source import PvSource
from dtacq_ioc.config import Config

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A client's message that cannot be served; the text goes back to the client."""


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

    def onConnect(self, request: Any) -> None:
        self.can_write = False
        self.messages = 0
        self.peer_name = request.peer
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
        if outbox is not None:
            outbox.close()
        self.services.sessions.discard(self)
        self.closed()

    def closed(self) -> None:
        """Subclasses release what the session held."""

    def sendMessage(self, payload: bytes, isBinary: bool = False, **kwargs: Any) -> None:
        # Autobahn applies maxMessagePayloadSize to outgoing messages too; the limit is
        # meant for what clients send, and waveforms are far larger.
        limit = self.maxMessagePayloadSize
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
                raise BadRequest("binary messages are not understood; send JSON text")
            try:
                message = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise BadRequest(f"malformed JSON: {exc}") from None
            if not isinstance(message, dict):
                raise BadRequest("a message must be a JSON object")
            if message.get("type") == "auth":
                self._auth(message, first)
                return
            self.handle(message)
        except BadRequest as exc:
            self.error(str(exc), None)
        except Exception:
            log.exception("%s: request failed", self.peer_name)
            self.error("internal error (logged by the bridge)", None)

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
                self.error(str(exc), request)
            except Exception as exc:
                log.exception("%s: request failed", self.peer_name)
                self.error(f"failed: {type(exc).__name__}: {exc}", request)

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
    factory.protocol = type(protocol.__name__, (protocol,), {"services": services})
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
