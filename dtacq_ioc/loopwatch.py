"""Warns when the event loop stops turning, and says where it is stuck.

Everything the process serves (CA searches and reads, the bridge, the cards' links)
waits while one callback holds the loop; clients see that only as timeouts. A thread
beside the loop notices a stall as it happens and logs the loop thread's innermost
frames in one line, so the log names the cause.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

FRAMES_SHOWN = 4


@dataclass
class LoopWatch:
    """Run `beat()` as a task on the loop to watch; cancelling it ends the watching thread."""

    threshold_s: float = 2.0
    beat_s: float = 0.25
    _last_beat: float = field(default_factory=time.monotonic, init=False)
    _loop_thread: int = field(default=0, init=False)
    _stalled_since: float | None = field(default=None, init=False)
    _closed: threading.Event = field(default_factory=threading.Event, init=False)

    async def beat(self) -> None:
        self._loop_thread = threading.get_ident()
        watcher = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        watcher.start()
        try:
            while True:
                now = time.monotonic()
                self._last_beat = now
                stalled_since, self._stalled_since = self._stalled_since, None
                if stalled_since is not None:
                    log.warning("event loop turned again after %.1f s", now - stalled_since)
                await asyncio.sleep(self.beat_s)
        finally:
            self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(self.beat_s):
            last = self._last_beat
            blocked = time.monotonic() - last
            if blocked < self.threshold_s or self._stalled_since is not None:
                continue
            self._stalled_since = last
            log.warning(
                "event loop blocked for %.1f s, in %s", blocked, self.where(self._loop_thread)
            )

    @staticmethod
    def where(thread_id: int) -> str:
        """The thread's innermost frames, innermost first, as 'file:line function; ...'."""
        frame = sys._current_frames().get(thread_id)
        if frame is None:
            return "an unknown place"
        stack = traceback.extract_stack(frame)[-FRAMES_SHOWN:]
        return "; ".join(
            f"{entry.filename.rsplit('/', 1)[-1]}:{entry.lineno} {entry.name}"
            for entry in reversed(stack)
        )
