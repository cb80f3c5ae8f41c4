"""Per-client sending with flow control: latest value per PV while the socket is full.

The outbox is the push producer Twisted pauses when about 64 KiB wait unsent.
While paused, updates for a PV merge into one pending update (latest value wins,
fields that changed meanwhile kept), so memory per client is bounded by the
number of PVs it watches; a client paused longer than the timeout is dropped.
Notices about one PV (it was not found) are kept the same way, one per PV:
a thousand names not found at once must not count as a thousand unread replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

log = logging.getLogger(__name__)


@implementer(IPushProducer)
class Outbox:
    def __init__(self, protocol: Any, slow_timeout_s: float, max_replies: int = 256):
        self.protocol = protocol
        self.slow_timeout_s = slow_timeout_s
        self.max_replies = max_replies
        self.paused = False
        self.closed = False
        self.pending: dict[str, dict[str, Any]] = {}
        self.replies: deque[tuple[bytes, bool]] = deque()
        self.notices: dict[str, bytes] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.sent_updates = 0
        self.merged_updates = 0

    def attach(self, transport: Any) -> None:
        # Under WebSocketResource the HTTP channel is still registered as the producer.
        transport.unregisterProducer()
        transport.registerProducer(self, True)

    # -- sending --

    def update(self, name: str, fields: dict[str, Any], encoded: bytes | None = None) -> None:
        """Send an update now, or merge it into the pending one for this PV."""
        if self.closed:
            return
        if not self.paused and name not in self.pending:
            self.sent_updates += 1
            self.protocol.sendMessage(encoded or self.protocol.encode_update(name, fields))
            return
        pending = self.pending.get(name)
        if pending is None:
            self.pending[name] = dict(fields)
        else:
            self.merged_updates += 1
            pending.update(fields)

    def reply(self, payload: bytes, binary: bool = False) -> None:
        """A reply to a request: never merged; too many unread ones drop the client."""
        if self.closed:
            return
        if not self.paused and not self.replies:
            self.protocol.sendMessage(payload, isBinary=binary)
            return
        if len(self.replies) >= self.max_replies:
            log.warning(
                "%s: %d replies unread; dropping the client", self.protocol.peer, len(self.replies)
            )
            self.drop()
            return
        self.replies.append((payload, binary))

    def notice(self, name: str, payload: bytes) -> None:
        """A message about one PV: while the client is not reading, the latest per PV."""
        if self.closed:
            return
        if not self.paused and not self.replies and not self.notices:
            self.protocol.sendMessage(payload)
            return
        self.notices.pop(name, None)  # re-inserted last: notices keep their order
        self.notices[name] = payload

    def _flush(self) -> None:
        while self.replies and not self.paused and not self.closed:
            payload, binary = self.replies.popleft()
            self.protocol.sendMessage(payload, isBinary=binary)
        while self.notices and not self.paused and not self.closed:
            name = next(iter(self.notices))
            self.protocol.sendMessage(self.notices.pop(name))
        while self.pending and not self.paused and not self.closed:
            name = next(iter(self.pending))
            fields = self.pending.pop(name)
            self.sent_updates += 1
            self.protocol.sendMessage(self.protocol.encode_update(name, fields))

    def forget(self, name: str) -> None:
        self.pending.pop(name, None)
        self.notices.pop(name, None)

    # -- IPushProducer --

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        loop = asyncio.get_event_loop()
        self._timer = loop.call_later(self.slow_timeout_s, self._too_slow)

    def resumeProducing(self) -> None:
        self.paused = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()

    def stopProducing(self) -> None:
        self.close()

    def _too_slow(self) -> None:
        log.warning(
            "%s: not reading for %.1f s; dropping the client",
            self.protocol.peer,
            self.slow_timeout_s,
        )
        self.drop()

    def drop(self) -> None:
        self.close()
        self.protocol.dropConnection(abort=True)

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        self.replies.clear()
        self.notices.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
