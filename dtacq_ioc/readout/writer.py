"""A run's writer thread: buffers from a preallocated pool go to .dig files off the socket thread.

The socket thread takes a free pool buffer, copies the samples it wants written
into it and queues it. When every pool buffer is still waiting for the disk, the
socket thread does not wait: the caller counts an overrun. So memory is bounded
by the pool, and a slow disk costs data that is counted, never the stream.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtacq_ioc.archive.dig import DigWriter, Opener, dig_name
from dtacq_ioc.archive.records import RunFile

log = logging.getLogger(__name__)


class BufferPool:
    """A fixed set of byte buffers; acquire() never blocks and never allocates."""

    def __init__(self, count: int, nbytes: int):
        if count < 1 or nbytes < 1:
            raise ValueError(f"pool needs count >= 1 and nbytes >= 1, got {count}, {nbytes}")
        self.count = count
        self.nbytes = nbytes
        # deque append/pop are atomic, so two threads share it without a lock.
        self._free = collections.deque(np.empty(nbytes, dtype=np.uint8) for _ in range(count))

    def acquire(self) -> np.ndarray | None:
        try:
            return self._free.pop()
        except IndexError:
            return None

    def release(self, buf: np.ndarray) -> None:
        self._free.append(buf)

    @property
    def free(self) -> int:
        return len(self._free)


@dataclass
class Chunk:
    """Bytes to append: `buf[:nbytes]`, whole samples; `new_file` closes the file first."""

    buf: np.ndarray
    nbytes: int
    new_file: bool
    first_counter: int


class Hasher:
    """A thread that runs queued calls in order: sha256 updates, then buffer releases.

    The writer thread hands each chunk here after write() and moves on, so hashing
    one chunk overlaps writing the next; a pool buffer goes back to the pool only
    after its bytes are hashed.
    """

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], None], Any] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[Any], None], arg: Any) -> None:
        self._queue.put((fn, arg))

    def digest(self) -> LaggedDigest:
        return LaggedDigest(self)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, arg = item
            try:
                fn(arg)
            except Exception:
                log.exception("hasher call failed")


class LaggedDigest:
    """sha256 computed on the Hasher thread; hexdigest() waits for it to catch up."""

    def __init__(self, hasher: Hasher):
        self._hasher = hasher
        self._sha = hashlib.sha256()

    def update(self, data: Any, /) -> None:
        self._hasher.call(self._sha.update, data)

    def hexdigest(self) -> str:
        caught_up = threading.Event()
        self._hasher.call(lambda _: caught_up.set(), None)
        caught_up.wait()
        return self._sha.hexdigest()


HeaderFor = Callable[[int, int], dict[str, Any]]  # (file index, first counter) -> header
OnDone = Callable[[list[RunFile], str], None]  # (files, error or "")


class RunWriter:
    """Writes one run's files on its own thread.

    Files are `<date>-<k>.dig` in `directory`, opened when their first bytes
    arrive (so rotating twice never leaves an empty file). `finish(on_done)`
    drains the queue, closes the last file and calls `on_done` on the writer
    thread, so the caller's bookkeeping never blocks the socket thread.
    """

    def __init__(
        self,
        directory: Path,
        date: str,
        header_for: HeaderFor,
        pool: BufferPool,
        opener: Opener | None = None,
        on_error: Callable[[str], None] | None = None,
        on_file: Callable[[RunFile], None] | None = None,
    ):
        self.directory = directory
        self.on_file = on_file  # each file once closed (on the closing thread)
        self.date = date
        self.header_for = header_for
        self.pool = pool
        self.opener = opener
        self.on_error = on_error
        self.files: list[RunFile] = []
        self.bytes_written = 0  # data bytes, headers excluded
        self.rows_written = 0  # whole rows in the files: what reading them gives
        self.current_file = ""
        self.error = ""
        # Chunks never outnumber pool buffers; the extra slot is the finish marker.
        self._queue: queue.Queue[Chunk | OnDone] = queue.Queue(maxsize=pool.count + 1)
        self._dig: DigWriter | None = None
        self._finishing = False
        self._hasher = Hasher(f"sha256-{date}")
        # Closing means fsync, seconds for a big file: a thread of its own, in order.
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"close-{date}")
        self._closing: list[Future[RunFile]] = []
        self._thread = threading.Thread(target=self._run, name=f"writer-{date}", daemon=True)
        self._thread.start()

    def acquire(self) -> np.ndarray | None:
        """A free buffer to fill, or None when the writer is behind (an overrun)."""
        if self._finishing:
            return None
        return self.pool.acquire()

    def submit(self, chunk: Chunk) -> None:
        self._queue.put_nowait(chunk)

    def finish(self, on_done: OnDone) -> None:
        """Write what is queued, close, then call on_done(files, error) on this thread."""
        if self._finishing:
            return
        self._finishing = True
        self._queue.put(on_done)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, Chunk):
                try:
                    if not self.error:
                        self._write(item)
                except Exception as exc:  # disk full, permissions, a bad opener: all fatal
                    self._fail(exc)
                finally:
                    # Released after the hasher has read it (its queue is in order).
                    self._hasher.call(self.pool.release, item.buf)
                continue
            try:
                self._close()
                self._collect()
            except Exception as exc:
                self._fail(exc)
            self._closer.shutdown()
            self._hasher.stop()
            try:
                item(list(self.files), self.error)
            except Exception:
                log.exception("run finish callback failed")
            return

    def _write(self, chunk: Chunk) -> None:
        if chunk.new_file or self._dig is None:
            self._close()
            index = len(self.files) + len(self._closing)
            path = self.directory / dig_name(self.date, index)
            header = self.header_for(index, chunk.first_counter)
            try:
                self._dig = DigWriter(path, header, self.opener, self._hasher.digest())
            except FileExistsError:
                raise  # not ours to remove
            except BaseException:
                # Its header never got out (a full disk): a file without samples, never left.
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
            self.current_file = path.name
            log.debug("writing %s", path)
        rows = self._dig.write(chunk.buf.data[: chunk.nbytes]) // self._dig.sample_bytes
        self.bytes_written += chunk.nbytes
        self.rows_written += rows

    def _close(self) -> None:
        dig, self._dig = self._dig, None
        if dig is not None:
            future = self._closer.submit(dig.close)
            if self.on_file is not None:
                future.add_done_callback(self._file_closed)
            self._closing.append(future)

    def _file_closed(self, future: Future[RunFile]) -> None:
        if future.exception() is None and self.on_file is not None:
            try:
                self.on_file(future.result())
            except Exception:
                log.exception("file-closed callback failed")

    def _collect(self) -> None:
        """The closed files, in order, once their fsync is done (raises what close raised)."""
        closing, self._closing = self._closing, []
        for i, future in enumerate(closing):
            try:
                self.files.append(future.result())
            except Exception:
                self._closing = closing[i + 1 :]
                raise

    def _fail(self, exc: Exception) -> None:
        where = self._dig.path if self._dig is not None else self.directory
        reason = f"writing {where}: {getattr(exc, 'strerror', None) or exc}"
        log.error("%s", reason, exc_info=not isinstance(exc, OSError))
        if not self.error:
            self.error = reason
            if self.on_error is not None:
                self.on_error(reason)
        while self._closing:
            try:
                self._collect()
            except OSError:
                log.exception("closing a file of %s after a write error", self.directory)
        dig, self._dig = self._dig, None
        if dig is not None:
            self._close_failed(dig)

    def _close_failed(self, dig: DigWriter) -> None:
        """Close the file a write failed in, so that it holds exactly what was counted.

        A write cut short by a full disk may leave part of a chunk: the file is cut back
        to the bytes its size, digest and row count include. A file left without a
        sample is removed, as if never opened.
        """
        try:
            os.truncate(dig.path, dig.size)
        except OSError as exc:
            log.warning("cutting %s back to %d bytes: %s", dig.path, dig.size, exc.strerror)
        try:
            closed = dig.close()
        except OSError as exc:
            log.warning("closing %s after a write error: %s", dig.path, exc.strerror or exc)
            closed = RunFile(dig.path.name, str(dig.path), dig.size, dig.sha256)
        if dig.samples:
            self.files.append(closed)
            return
        with contextlib.suppress(OSError):
            dig.path.unlink()
