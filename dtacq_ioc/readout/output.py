"""What a run keeps of each buffer: the chosen channels, downsampled or not, copied into
the writer's pool buffers (never waiting for the disk: a full pool is a counted overrun).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from dtacq_ioc.readout.integrity import COUNTER_MODULUS
from dtacq_ioc.readout.transform import ChannelMap, Downsampler
from dtacq_ioc.readout.writer import Chunk, RunWriter

log = logging.getLogger(__name__)


class RunOutput:
    """Rows of one run on their way to its writer (or only counted, with no files)."""

    def __init__(
        self,
        channels: tuple[int, ...],
        channel_map: ChannelMap,
        downsample: int,
        word_size: int,
        on_overrun: Callable[[int, int], None],
    ):
        self.channels = channels
        self.channel_map = channel_map
        self.downsample = downsample
        self.is_float = downsample > 1
        self.byte_depth = 8 if self.is_float else word_size
        self.out_dtype = np.dtype("<f8") if self.is_float else np.dtype(f"<i{word_size}")
        self.row_bytes = len(channels) * self.byte_depth
        self.on_overrun = on_overrun  # (rows lost, overruns so far): the 1st, then every 100th
        self._idx = np.array(channels, dtype=np.intp)
        self._all_channels = channels == tuple(range(channel_map.nchan))
        self._downsampler = Downsampler(downsample, len(channels)) if self.is_float else None
        self.writer: RunWriter | None = None
        self.samples_written = 0  # raw samples selected for the files (some may be lost)
        self.overruns = 0
        self.new_file = False  # the next rows start a new file

    @property
    def samples(self) -> int:
        """Samples in the files: what reading them gives (times `downsample`, as each
        downsampled row stands for that many). Without files, those selected."""
        if self.writer is None:
            return self.samples_written
        return self.writer.rows_written * self.downsample

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written if self.writer else 0

    @property
    def current_file(self) -> str:
        return self.writer.current_file if self.writer else ""

    def write(self, block: np.ndarray, first_counter: int) -> None:
        rows = len(block)
        if self.writer is None:
            self.samples_written += rows
            return
        if self._downsampler is not None:
            held = self._downsampler.held
            codes = self.channel_map.shift(block[:, self._idx], self._idx)
            out = self._downsampler(codes)
            first_counter = (first_counter - held) % COUNTER_MODULUS
            done = self._submit(out, first_counter)
            self.samples_written += rows if done == len(out) else done * self.downsample
        else:
            idx = None if self._all_channels else self._idx
            self.samples_written += self._submit(block, first_counter, idx)

    def _submit(self, rows: np.ndarray, first_counter: int, idx: np.ndarray | None = None) -> int:
        """Copy rows (selecting columns `idx`) into pool buffers and queue them.

        Returns the rows queued; the rest are lost to an overrun.
        """
        assert self.writer is not None
        per_buf = self.writer.pool.nbytes // self.row_bytes
        start = 0
        while start < len(rows):
            buf = None if self._waiting_for_room() else self.writer.acquire()
            if buf is None:
                self._overrun(len(rows) - start)
                break
            take = min(per_buf, len(rows) - start)
            dest = buf[: take * self.row_bytes].view(self.out_dtype).reshape(take, -1)
            part = rows[start : start + take]
            if idx is None:
                np.copyto(dest, part, casting="no")
            else:
                np.take(part, idx, axis=1, out=dest, mode="clip")
            self.writer.submit(Chunk(buf, take * self.row_bytes, self.new_file, first_counter))
            self.new_file = False
            start += take
            first_counter = (first_counter + take * self.downsample) % COUNTER_MODULUS
        return start

    def _waiting_for_room(self) -> bool:
        """After an overrun, drop until half the pool is free again.

        Resuming with the first free buffer would make a writer that stays behind start
        a new file (close, fsync, catalog row) for every buffer it gets, which slows it
        further; waiting gives it long unbroken stretches while it still has half the
        pool queued, so it never idles and loses no more than it must.
        """
        assert self.writer is not None
        if self.new_file and self.overruns:
            return self.writer.pool.free < max(1, self.writer.pool.count // 2)
        return False

    def _overrun(self, rows: int) -> None:
        self.overruns += 1
        # The next data starts a new file, so every file stays one unbroken stretch.
        self.new_file = True
        if self._downsampler is not None:
            self._downsampler.reset()
        # A slow disk overruns every buffer: report the first and then every 100th.
        if self.overruns == 1 or self.overruns % 100 == 0:
            self.on_overrun(rows, self.overruns)
