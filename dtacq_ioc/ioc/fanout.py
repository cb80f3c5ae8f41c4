"""Big array PVs straight to their monitors' sockets: one message built per update.

caproto hands every monitor update through two queues and then, for each client,
makes its own big-endian copy of the array, joins it with the header into one more
copy and sends that. For 16 waveforms of 100 000 samples at 10 Hz to a few clients
that was most of the IOC's CPU. For a plain subscription (no channel filter, the
whole array: what camonitor, pyepics, ophyd and Phoebus ask for) `FanoutArray`
builds the message once per update and data type, and `Fanout` sends it to each
client with one `sendmsg` of the client's header and the shared payload.
Everything else (filters, partial counts, a client that turned events off) takes
caproto's own path, so behaviour is the same as before, only cheaper.

The updates of one event-loop turn reach each client in one `sendmsg`. A slow
client never costs memory: while what waits in its socket would exceed
`max_buffer_bytes`, only the newest update of each of its subscriptions is kept
and sent when the socket drains; older ones are dropped, like caproto's backlog.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtacq_ioc.caproto_adapter import (
    circuit_transport,
    circuit_writer,
    event_add_parts,
    forget_cached_reads,
    read_for_subscription,
    send_by_caproto,
    subscription_queues,
    wanted,
)

log = logging.getLogger(__name__)
timing = logging.getLogger("dtacq_ioc.timing")  # see the CLI's --debug

MAX_BUFFER_BYTES = 8 << 20  # per client: about two frames of 16 x 100k int16
SUBSCRIPTION_ID_OFFSET = 12  # parameter2 in both the short and the extended CA header
SLOW_LOG_INTERVAL_S = 10.0
IOV_MAX = 1024  # buffers per sendmsg (Linux)
PARALLEL_SEND_BYTES = 1 << 20  # below this a frame is sent on the loop: a thread costs more
SENDER_THREADS = 4

Buffers = tuple[bytes, memoryview, bytes]  # header + metadata, data, padding


class Message:
    """One update of one PV as one data type, ready to be addressed to any subscription."""

    def __init__(self, values: Any, metadata: Any, data_type: Any, count: int):
        # caproto's own parts: the same wire format as its normal path.
        header, metadata_part, data, *pad = event_add_parts(values, metadata, data_type, count)
        self._head = bytes(header) + bytes(metadata_part)
        self._data = _byte_view(data)
        self._pad = bytes(pad[0]) if pad else b""
        self.nbytes = len(self._head) + self._data.nbytes + len(self._pad)

    def addressed(self, subscription_id: int) -> Buffers:
        head = bytearray(self._head)
        struct.pack_into(">I", head, SUBSCRIPTION_ID_OFFSET, subscription_id)
        return bytes(head), self._data, self._pad


def _byte_view(data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).view(np.uint8).data)
    return memoryview(bytes(data))


@dataclass(frozen=True)
class _Entry:
    spec: Any
    sub: Any
    buffers: Buffers
    nbytes: int


class Fanout:
    """Sends addressed messages to circuits; one per IOC, shared by all its array PVs.

    The updates of one event-loop turn (a frame: every waveform of every card) go to
    each client in one `sendmsg`, so a client is woken once a frame, not once a PV.
    """

    def __init__(self, max_buffer_bytes: int = MAX_BUFFER_BYTES,
                 sender_threads: int = SENDER_THREADS):  # fmt: skip
        self.max_buffer_bytes = max_buffer_bytes
        self._senders = (ThreadPoolExecutor(sender_threads, thread_name_prefix="ca-send")
                         if sender_threads > 1 else None)  # fmt: skip
        self.sent = 0
        self.dropped = 0  # updates replaced by a newer one before a slow client took them
        # circuit -> subscription id -> newest update: this turn's, and a slow client's
        self._batches: dict[Any, dict[int, _Entry]] = {}
        self._slow: dict[Any, dict[int, _Entry]] = {}
        self._flush: asyncio.Handle | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._slow_logged: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def send(self, spec: Any, sub: Any, message: Message) -> None:
        circuit = sub.circuit
        if not _open(circuit):
            return
        waiting = self._slow.get(circuit)
        if waiting is None:
            waiting = self._batches.get(circuit)
            if waiting is None:
                waiting = self._batches[circuit] = {}
                if self._flush is None:
                    self._flush = asyncio.get_running_loop().call_soon(self._send_batches)
        sid = sub.subscriptionid
        self.dropped += sid in waiting
        waiting[sid] = _Entry(spec, sub, message.addressed(sid), message.nbytes)

    def _send_batches(self) -> None:
        self._flush = None
        batches, self._batches = self._batches, {}
        direct: list[tuple[Any, dict[int, _Entry]]] = []
        for circuit, waiting in batches.items():
            if not _open(circuit):
                continue
            writer = circuit_writer(circuit)
            queued = writer.transport.get_write_buffer_size()
            size = sum(e.nbytes for e in waiting.values())
            if queued and queued + size > self.max_buffer_bytes:
                self._slow[circuit] = waiting
                self._log_slow(circuit)
                task = asyncio.get_running_loop().create_task(self._drain(circuit, writer))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
            elif queued:
                self._write(circuit, waiting, direct=False)
            else:
                direct.append((circuit, waiting))
        self._write_direct(direct)

    def _write_direct(self, batches: list[tuple[Any, dict[int, _Entry]]]) -> None:
        """Send to each circuit whose socket is idle; big frames to several at once.

        A big frame's `sendmsg` is the kernel copying megabytes, one client after
        another. With several clients the copies run on the sender threads side by side
        (sendmsg releases the GIL) while this loop waits for them all, so nothing else
        can write to those sockets meanwhile and the bytes never interleave."""
        if (
            len(batches) < 2
            or self._senders is None
            or all(sum(e.nbytes for e in w.values()) < PARALLEL_SEND_BYTES for _, w in batches)
        ):
            for circuit, waiting in batches:
                self._write(circuit, waiting, direct=True)
            return
        prepared = [(circuit, *self._prepare(circuit, waiting)) for circuit, waiting in batches]
        started = time.time()
        futures = [self._senders.submit(_sendmsg, circuit_transport(c), buffers)
                   for c, _, buffers in prepared]  # fmt: skip
        for (circuit, live, buffers), future in zip(prepared, futures, strict=True):
            self._finish(circuit, live, buffers, future.result(), started)

    def _write(self, circuit: Any, waiting: dict[int, _Entry], direct: bool) -> None:
        live, buffers = self._prepare(circuit, waiting)
        started = time.time()
        sent = _sendmsg(circuit_transport(circuit), buffers) if direct else 0
        self._finish(circuit, live, buffers, sent, started)

    def _prepare(self, circuit: Any, waiting: dict[int, _Entry]) -> tuple[list[_Entry], list[Any]]:
        # A subscription cancelled meanwhile must get nothing more.
        live = [e for e in waiting.values() if e.sub in circuit.subscriptions.get(e.spec, ())]
        return live, [b for e in live for b in e.buffers]

    def _finish(self, circuit: Any, live: list[_Entry], buffers: list[Any], sent: int,
                started: float) -> None:  # fmt: skip
        """Queue on the transport what the socket did not take at once."""
        _queue(circuit_transport(circuit), buffers, sent)
        self.sent += len(live)
        if timing.isEnabledFor(logging.DEBUG):
            total = sum(_size(b) for b in buffers)
            timing.debug("send %s:%d started %.6f ended %.6f bytes %d queued %d",
                         *circuit.circuit.address, started, time.time(), total,
                         total - sent)  # fmt: skip

    async def _drain(self, circuit: Any, writer: asyncio.StreamWriter) -> None:
        """Wait for a slow client to take what is queued, then send its newest updates."""
        try:
            await writer.drain()
            waiting = self._slow.pop(circuit)
            if _open(circuit):
                self._write(circuit, waiting, direct=False)
        except (ConnectionError, OSError):
            self._slow.pop(circuit, None)

    def _log_slow(self, circuit: Any) -> None:
        now = time.monotonic()
        if now - self._slow_logged.get(circuit, -SLOW_LOG_INTERVAL_S) >= SLOW_LOG_INTERVAL_S:
            self._slow_logged[circuit] = now
            log.warning(
                "client %s:%d is slow: keeping only the newest update of each array "
                "(%d updates dropped so far)",
                *circuit.circuit.address,
                self.dropped,
            )

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        self._batches.clear()
        self._slow.clear()
        if self._senders is not None:
            self._senders.shutdown(wait=True)


def _open(circuit: Any) -> bool:
    return circuit.connected and not circuit_transport(circuit).is_closing()


def _sendmsg(transport: asyncio.Transport, buffers: Sequence[Any]) -> int:
    """Send what the socket takes now, without copying; the transport's buffer is empty.

    asyncio (3.11) offers no gather write, so the send goes through a socket object
    on the transport's descriptor, which is detached again so it never closes it.
    """
    fd = transport.get_extra_info("socket").fileno()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    sent = 0
    try:
        for i in range(0, len(buffers), IOV_MAX):
            chunk = buffers[i : i + IOV_MAX]
            n = sock.sendmsg(chunk)
            sent += n
            if n < sum(_size(b) for b in chunk):
                break
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        pass  # the transport sees the error on its next write and closes
    finally:
        sock.detach()
    return sent


def _size(buf: Any) -> int:
    return len(buf) if isinstance(buf, bytes) else buf.nbytes


def _queue(transport: asyncio.Transport, buffers: Sequence[Any], skip: int) -> None:
    """Queue the buffers on the transport, less the first `skip` bytes already sent."""
    for buf in buffers:
        size = _size(buf)
        if skip >= size:
            skip -= size
            continue
        transport.write(buf[skip:] if skip else buf)
        skip = 0


class FanoutArray:
    """Mixed into big read-only array PVs: plain subscriptions are sent by the group's Fanout.

    Without a Fanout on the group (`group.fanout`), or for a subscription with a
    channel filter, a partial count or a sync filter anywhere on the PV, caproto's
    own path is used.
    """

    group: Any

    def _fanout(self) -> Fanout | None:
        return getattr(self.group, "fanout", None)

    async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
        contexts = self.__dict__.setdefault("_contexts", {})
        contexts[queue] = sub.circuit.context
        fanout = self._fanout()
        if fanout is None or not _plain(sub_spec) or not sub.circuit.events_on.is_set():
            await super().subscribe(queue, sub_spec, sub)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO
            return
        subscription_queues(self)[queue][None][sub_spec.data_type_name].add(sub_spec)
        # The first update goes the same way as the later ones, so it cannot overtake them.
        await self._send_one(fanout, sub.circuit.context, sub_spec, sub, 0, {})

    async def publish(self, flags: int) -> None:
        fanout = self._fanout()
        contexts = self.__dict__.get("_contexts", {})
        queues = subscription_queues(self)
        if (
            fanout is None
            or any(sync is not None for syncs in queues.values() for sync in syncs)
            or any(queue not in contexts for queue in queues)
        ):
            await super().publish(flags)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO
            return
        forget_cached_reads(self)  # caproto's cache for new subscriptions: the value changed
        messages: dict[str, tuple[Any, Any, Message | None]] = {}
        for queue, syncs in queues.items():
            context = contexts[queue]
            for specs in syncs.get(None, {}).values():
                for spec in tuple(specs):
                    if not wanted(spec.mask, flags):
                        continue
                    for sub in tuple(context.subscriptions.get(spec, ())):
                        await self._send_one(fanout, context, spec, sub, flags, messages)

    async def _send_one(
        self,
        fanout: Fanout,
        context: Any,
        spec: Any,
        sub: Any,
        flags: int,
        messages: dict[str, tuple[Any, Any, Message | None]],
    ) -> None:
        """One subscription's update: by the Fanout when it can, else caproto's path.

        `messages` caches this update's reading and message per data type."""
        type_name = spec.data_type_name
        if type_name not in messages:
            metadata, values = await read_for_subscription(self, sub.data_type)
            messages[type_name] = (metadata, values, None)
        metadata, values, message = messages[type_name]
        if _plain(spec) and _whole(sub, values) and sub.circuit.events_on.is_set():
            if message is None:
                message = Message(values, metadata, sub.data_type, len(values))
                messages[type_name] = (metadata, values, message)
            fanout.send(spec, sub, message)
        else:
            await send_by_caproto(context, spec, sub, metadata=metadata, values=values, flags=flags)


def _plain(spec: Any) -> bool:
    """No channel filter (a channel without one has ts=False, the rest None)."""
    f = spec.channel_filter
    return not f.ts and f.dbnd is None and f.arr is None and f.sync is None


def _whole(sub: Any, values: Any) -> bool:
    return sub.data_count in (0, len(values))
