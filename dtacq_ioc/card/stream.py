"""Stream client: a card's aggregated raw data (TCP 4210) into preallocated buffers.

The reader thread receives with ``recv_into`` straight into a small pool of
buffers, each viewed once as a structured numpy array of whole samples, so no
Python runs per sample and nothing is allocated per read. A buffer goes to
``on_buffer`` when it is full; a sample split by a flush (silence, or the
latency limit) is carried to the start of the next buffer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from dtacq_ioc.card.errors import CardError, CardNotReady, StreamError
from dtacq_ioc.contract import StreamLayout

log = logging.getLogger(__name__)

NOT_READY = b"NOT READY"
_POOL_SIZE = 3  # one being filled, one being delivered, one spare for the carry copy


OnBuffer = Callable[[np.ndarray], None]
OnEnd = Callable[[Exception | None], None]


class _CallbackFailed(Exception):
    pass


class StreamClient:
    """Reads one card's stream on its own thread and hands out whole samples.

    ``on_buffer(samples)`` gets a structured array (``layout.sample_dtype``) that is a
    view of a pool buffer, valid only during the call. ``on_end(exc)`` is called once,
    after every whole sample received has been delivered: None after stop(),
    CardNotReady for "NOT READY", StreamError for anything else.
    ``timeout`` bounds the connect; a stream silent for that long delivers what it
    holds. ``flush_s`` (optional) bounds how long a received sample may wait.
    """

    def __init__(
        self,
        card: str,
        host: str,
        port: int,
        layout: StreamLayout,
        buffer_samples: int,
        on_buffer: OnBuffer,
        on_end: OnEnd,
        timeout: float,
        flush_s: float | None = None,
    ):
        if buffer_samples < 1:
            raise ValueError(f"buffer_samples {buffer_samples} must be >= 1")
        self.card = card
        self.host = host
        self.port = port
        self.layout = layout
        self.buffer_samples = buffer_samples
        self.on_buffer = on_buffer
        self.on_end = on_end
        self.timeout = timeout
        self.flush_s = flush_s
        self.bytes_received = 0
        self.buffers = 0
        self.samples = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ended = threading.Event()
        nbytes = buffer_samples * layout.sample_bytes
        self._pool = [bytearray(nbytes) for _ in range(_POOL_SIZE)]
        self._views = [memoryview(b) for b in self._pool]
        self._arrays = [np.frombuffer(b, dtype=layout.sample_dtype) for b in self._pool]

    def __repr__(self) -> str:
        return f"StreamClient({self.card!r}, {self.host}:{self.port})"

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._ended.is_set()

    def start(self) -> None:
        """Connect and start the reader thread; CardError if the port does not accept."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} already started")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise CardError(
                self.card,
                f"{self.card}: cannot connect to stream {self.host}:{self.port}: "
                f"{exc.strerror or exc}",
            ) from None
        wait = self.timeout if self.flush_s is None else min(self.timeout, self.flush_s)
        # A Python-level timeout polls before every recv; the kernel's receive timeout
        # costs nothing per read and surfaces as EAGAIN on a blocking socket.
        sock.settimeout(None)
        sec = int(wait)
        usec = int((wait - sec) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", sec, usec))
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.card}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the stream from any thread; on_end(None) follows the last delivery."""
        self._stopping.set()
        sock = self._sock
        if sock is not None:
            # shutdown, not close: it wakes the blocked recv_into on the reader thread
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for on_end to have run; True if it has (returns at once on the reader)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return self._ended.is_set()

    # -- reader thread ----------------------------------------------------------------

    def _run(self) -> None:
        result: Exception | None = None
        try:
            result = self._read()
        except _CallbackFailed as exc:
            cause = exc.__cause__
            result = StreamError(self.card, f"{self.card}: stream stopped: on_buffer: {cause!r}")
            result.__cause__ = cause
            log.error("%s", result)
        except Exception as exc:  # a bug here must still end the stream properly
            log.exception("%s: stream reader failed", self.card)
            result = StreamError(self.card, f"{self.card}: stream reader failed: {exc!r}")
        finally:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
        try:
            self.on_end(result)
        except Exception:
            log.exception("%s: on_end failed", self.card)
        finally:
            self._ended.set()

    def _read(self) -> Exception | None:
        sock = self._sock
        assert sock is not None
        sb = self.layout.sample_bytes
        cap = self.buffer_samples * sb
        idx = 0
        view = self._views[idx]
        fill = 0
        started = 0.0  # when the current buffer got its first byte
        flush_s = self.flush_s
        reason = ""
        while True:
            try:
                n = sock.recv_into(view[fill:], cap - fill)
            except (BlockingIOError, TimeoutError):
                n = -1
            except OSError as exc:
                reason = f"connection lost: {exc.strerror or exc}"
                break
            if n == 0:
                reason = "closed by the card"
                break
            if n > 0:
                if fill == 0:
                    started = time.monotonic()
                fill += n
                self.bytes_received += n
                if fill < cap and (
                    flush_s is None or fill < sb or time.monotonic() - started < flush_s
                ):
                    continue
            elif fill < sb:
                continue  # silence with no whole sample to hand out
            idx, fill = self._deliver(idx, fill)
            view = self._views[idx]
            started = time.monotonic()

        whole = fill // sb
        # "NOT READY" is shorter than any sample, so nothing was delivered before it.
        if (
            not self._stopping.is_set()
            and self.bytes_received == fill
            and bytes(self._views[idx][: len(NOT_READY)]) == NOT_READY
        ):
            log.warning("%s: stream answered NOT READY", self.card)
            return CardNotReady(self.card, f"{self.card}: stream port answered NOT READY")
        if whole:
            self._deliver(idx, fill)
        if self._stopping.is_set():
            return None
        dropped = fill - whole * sb
        return StreamError(
            self.card,
            f"{self.card}: stream {reason} after {self.bytes_received} bytes"
            + (f" ({dropped} bytes of an incomplete sample dropped)" if dropped else ""),
        )

    def _deliver(self, idx: int, fill: int) -> tuple[int, int]:
        """Hand out the whole samples of buffer idx; return the next buffer and its fill."""
        sb = self.layout.sample_bytes
        whole = fill // sb
        rest = fill - whole * sb
        nxt = (idx + 1) % len(self._pool)
        if rest:
            self._views[nxt][:rest] = self._views[idx][whole * sb : fill]
        try:
            self.on_buffer(self._arrays[idx][:whole])
        except Exception as exc:
            raise _CallbackFailed() from exc
        self.buffers += 1
        self.samples += whole
        return nxt, rest
