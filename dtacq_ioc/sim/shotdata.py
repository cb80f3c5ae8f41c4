"""A finished shot's data, served as the card serves it: 53000 raw, 53000+ch one channel.

Nothing is copied per shot: the data is the stream's SignalTable rows for the shot's
sample indices, so a test computes every word with `SignalTable.site_words`. Port
53000 sends whole samples with the spad words (counter = sample index + 1, as on the
stream); port 53000+ch sends channel ch's words alone, and only after a DEMUX=1 shot.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dtacq_ioc.sim.signals import SignalTable
from dtacq_ioc.sim.state import CardState, Faults
from dtacq_ioc.sim.stream import Frames, segments

log = logging.getLogger(__name__)

DATA_PORT = 53000


@dataclass
class ShotData:
    """Sample indices [first, first + count) of `table`, as the shot captured them."""

    table: SignalTable
    first: int  # sample index of the shot's first sample (counted from the start trigger)
    count: int  # PRE + POST samples
    spad: tuple[int, ...]  # the spad words after each sample (word 0 becomes the counter)
    demux: bool  # channel ports serve data only after a demuxed shot
    channels: list[tuple[int, int]]  # AI channel 1..N -> (site, column of the site's table)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _frames: Frames | None = None
    _columns: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def raw_bytes(self) -> int:
        ai = sum(s.spec.nchan * s.word_size for s in self.table.sites)
        return self.count * (ai + 4 * len(self.spad))

    def _runs(self) -> Iterator[tuple[int, int]]:
        """(row in the table, rows) runs covering the shot, none crossing the period."""
        for seg in segments(self.first, self.count, Faults(), self.table.period):
            yield seg.start % self.table.period, seg.count

    def send_raw(self, conn: socket.socket, limit: int) -> int:
        # Frames patch the counter column in place: one 53000 client at a time.
        with self._lock:
            if self._frames is None:
                self._frames = Frames(self.table, self.spad)
            frames = self._frames
            out = _Sender(conn, limit)
            for seg in segments(self.first, self.count, Faults(), self.table.period):
                if not out.send(frames.segment(seg)):
                    break
            return out.sent

    def send_channel(self, conn: socket.socket, channel: int, limit: int) -> int:
        """Channel `channel`'s words (1-based over the aggregated AI channels)."""
        with self._lock:
            column = self._columns.get(channel)
            if column is None:
                site, col = self.channels[channel - 1]
                column = np.ascontiguousarray(self.table.table(site)[:, col])
                self._columns[channel] = column
        out = _Sender(conn, limit)
        view = column.data.cast("B")
        size = column.itemsize
        for row, n in self._runs():
            if not out.send(view[row * size : (row + n) * size]):
                break
        return out.sent


class _Sender:
    """sendall with the shot-cut fault: stop after `limit` bytes (0 = no limit)."""

    def __init__(self, conn: socket.socket, limit: int):
        self.conn = conn
        self.limit = limit
        self.sent = 0

    def send(self, data: memoryview | bytes) -> bool:
        if self.limit and self.sent + len(data) >= self.limit:
            self.conn.sendall(data[: self.limit - self.sent])
            self.sent = self.limit
            return False
        self.conn.sendall(data)
        self.sent += len(data)
        return True


def serve_shot(state: CardState, conn: socket.socket, channel: int) -> None:
    """One connection to 53000 (channel 0) or 53000+channel: the data, then close."""
    with state.lock:
        data = None if state.shot_busy else state.last_shot
        limit = state.faults.shot_cut
    if data is None:
        return  # no finished shot: the card's cat of an empty buffer sends nothing
    if channel == 0:
        sent = data.send_raw(conn, limit)
    elif data.demux and channel <= len(data.channels):
        sent = data.send_channel(conn, channel, limit)
    else:
        return
    log.debug("%s: port %d sent %d bytes", state.card.name, DATA_PORT + channel, sent)
