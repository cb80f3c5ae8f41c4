"""The 4210 live stream: raw sample-major words, paced in real time or unthrottled.

One period of whole samples (AI bytes of every aggregated site, then the spad
words) is built once; each block only patches the counter column in place and
sends a memoryview of those rows, so unthrottled streaming costs little more
than the kernel's copy. Faults (drop, corrupt, close after N bytes, NOT READY)
split the blocks where they apply.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dtacq_ioc.sim.signals import SignalTable, TableCache, counters
from dtacq_ioc.sim.state import ARM, IDLE, STREAM_RUN, CardState, Faults

log = logging.getLogger(__name__)

BLOCK_S = 0.01  # throttled: one send per ~10 ms of samples
UNTHROTTLED_BLOCK_BYTES = 4 << 20
CORRUPT_WORD = 0x5A5A5A5A  # written over the first AI word of a corrupted sample
NOT_READY = b"NOT READY\n"
UNCLOCKED_POLL_S = 0.05  # how often an unclocked stream looks for its clock


class StreamClosed(Exception):
    """The client went away, a newer client took over, or the close-after fault fired."""


@dataclass(frozen=True)
class Segment:
    start: int  # sample index of the first sample
    count: int
    corrupt: bool = False


def segments(start: int, n: int, faults: Faults, period: int) -> Iterator[Segment]:
    """Split sample indices [start, start + n) into runs the stream sends as they are.

    A run never crosses the table's period, a dropped range is skipped, and a
    corrupted sample is a run of its own.
    """
    end = start + n
    cycle = faults.drop_every + faults.drop_count if faults.drop_every > 0 else 0
    every = faults.corrupt_every
    i = start
    while i < end:
        stop = end
        if cycle:
            phase = i % cycle
            if phase >= faults.drop_every:  # inside a dropped range: the counter jumps
                i += cycle - phase
                continue
            stop = min(stop, i - phase + faults.drop_every)
        if every > 0:
            nxt = ((i + 1 + every - 1) // every) * every - 1  # next j >= i with (j+1) % every == 0
            if nxt == i:
                yield Segment(i, 1, corrupt=True)
                i += 1
                continue
            stop = min(stop, nxt)
        stop = min(stop, i + period - i % period)
        yield Segment(i, stop - i)
        i = stop


class Frames:
    """One table period of whole samples as bytes, with the spad columns in place."""

    def __init__(self, table: SignalTable, spad: tuple[int, ...]):
        self.table = table
        ai = [table.table(s.site).view(np.uint8).reshape(table.period, -1) for s in table.sites]
        ai_bytes = sum(a.shape[1] for a in ai)
        fields: list[tuple[str, str, int]] = [("ai", "u1", ai_bytes)]
        if spad:
            fields.append(("spad", "<u4", len(spad)))
        self.rows = np.zeros(table.period, dtype=np.dtype(fields))
        self.rows["ai"] = np.concatenate(ai, axis=1) if len(ai) > 1 else ai[0]
        self.nspad = len(spad)
        if spad:
            self.rows["spad"] = np.asarray(spad, dtype=np.uint32)
        self.ssb = self.rows.dtype.itemsize
        self.raw = self.rows.view(np.uint8).reshape(-1).data
        self.word_size = table.sites[0].word_size if table.sites else 2

    def segment(self, seg: Segment) -> memoryview | bytes:
        """The bytes of one run, its counters patched (the rows are reused in place)."""
        row = seg.start % self.table.period
        if self.nspad:
            self.rows["spad"][row : row + seg.count, 0] = counters(seg.start, seg.count)
        if not seg.corrupt:
            return self.raw[row * self.ssb : (row + seg.count) * self.ssb]
        sample = bytearray(self.raw[row * self.ssb : (row + 1) * self.ssb])
        sample[: self.word_size] = (CORRUPT_WORD & ((1 << 8 * self.word_size) - 1)).to_bytes(
            self.word_size, "little"
        )
        return bytes(sample)


class StreamServer:
    """Serves port 4210 for one card: a new client tears down the previous one."""

    def __init__(self, state: CardState, tables: TableCache):
        self.state = state
        self.tables = tables
        self._lock = threading.Lock()
        self._current: StreamSession | None = None

    def handle(self, conn: socket.socket) -> None:
        session = StreamSession(self, conn)
        with self._lock:
            previous, self._current = self._current, session
        if previous is not None:
            previous.cancel()
            previous.done.wait()
        try:
            if not session.cancelled.is_set():  # a still newer client may have come meanwhile
                session.run()
        finally:
            session.done.set()

    def wake(self) -> None:
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel()

    def frames(self) -> Frames | None:
        """Frames for the state's current settings, or None while the card is unclocked."""
        with self.state.lock:
            rate = self.state.sample_rate_hz()
            sites = self.state.stream_sites()
            spad = self.state.spad_words()
        if rate <= 0 or not sites:
            return None
        return Frames(self.tables.get(sites, rate), spad)


class StreamSession:
    def __init__(self, server: StreamServer, conn: socket.socket):
        self.server = server
        self.state = server.state
        self.conn = conn
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.bytes_sent = 0

    def cancel(self) -> None:
        self.cancelled.set()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        st = self.state
        with st.lock:
            # A card with a transient shot armed does not stream.
            ready = not st.faults.not_ready and bool(st.agg_sites) and not st.shot_busy
            gen = st.stream_gen
        if not ready:
            self.conn.sendall(NOT_READY)
            return
        st.samples_sent = 0
        st.stream_state(ARM, elapsed=0)
        try:
            self._stream(gen)
        except (StreamClosed, OSError) as exc:
            log.debug("%s stream ended: %s", st.card.name, exc)
        finally:
            st.stream_state(IDLE, elapsed=st.samples_sent)

    def _send(self, data: memoryview | bytes, limit: int, ssb: int) -> None:
        cut = bool(limit) and self.bytes_sent + len(data) >= limit
        if cut:
            data = data[: limit - self.bytes_sent]
        self.conn.sendall(data)
        self.bytes_sent += len(data)
        self.state.samples_sent = self.bytes_sent // ssb  # whole samples only
        if cut:
            raise StreamClosed(f"close-after fault at {limit} bytes")

    def _stream(self, gen: int) -> None:
        st = self.state
        index = 0  # sample index since the stream started (counter = index + 1)
        version = -1
        frames: Frames | None = None
        running = False
        pace_t0 = pace_index = pace_rate = 0.0
        throttled = True
        while not self.cancelled.is_set():
            if st.stream_gen != gen:
                raise StreamClosed("run0 or set_arm tore the stream down")
            faults = st.faults
            if st.version != version or (not faults.unthrottled) != throttled:
                version = st.version
                frames = self.server.frames()
                rate = frames.table.rate_hz if frames else 0.0
                if throttled != (not faults.unthrottled) or rate != pace_rate:
                    # A new clock or throttle paces from now on. With the same clock the
                    # schedule stands, so a pause to rebuild the table is caught up.
                    pace_t0, pace_index = time.monotonic(), index
                throttled, pace_rate = not faults.unthrottled, rate
            if frames is None:  # not clocked: nothing to send until a clock appears
                self.cancelled.wait(UNCLOCKED_POLL_S)
                version = -1
                continue
            silent = faults.hang_left()
            if silent > 0:  # network loss: the socket stays open but nothing arrives
                if self.cancelled.wait(silent):
                    break
                continue
            if not running:
                st.stream_state(STREAM_RUN)
                running = True
            rate = frames.table.rate_hz
            if throttled:
                n = max(1, round(rate * BLOCK_S))
                due = pace_t0 + (index + n - pace_index) / rate
                delay = due - time.monotonic()
                if delay > 0 and self.cancelled.wait(delay):
                    break
            else:
                n = max(1, UNTHROTTLED_BLOCK_BYTES // frames.ssb)
                if faults.mbps > 0:  # a byte-rate cap, for benchmarks of a given load
                    per_s = faults.mbps * 1e6 / frames.ssb
                    due = pace_t0 + (index + n - pace_index) / per_s
                    delay = due - time.monotonic()
                    if delay > 0 and self.cancelled.wait(delay):
                        break
            for seg in segments(index, n, faults, frames.table.period):
                self._send(frames.segment(seg), faults.close_after, frames.ssb)
            index += n
