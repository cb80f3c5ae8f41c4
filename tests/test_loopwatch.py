"""The loop watch names a stall while it lasts, and its end."""

from __future__ import annotations

import asyncio
import logging
import threading

from dtacq_ioc.loopwatch import LoopWatch


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.arrived = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.arrived:
            self.messages.append(record.getMessage())
            self.arrived.notify_all()

    def wait_for(self, words: str, timeout: float = 20.0) -> str:
        def found() -> str | None:
            return next((m for m in self.messages if words in m), None)

        with self.arrived:
            assert self.arrived.wait_for(found, timeout), (words, self.messages)
            return found() or ""


def _hold_the_loop(recorder: _Recorder) -> str:
    """A callback that keeps the loop until the watch has reported it."""
    return recorder.wait_for("_hold_the_loop")


def test_a_stall_is_reported_with_its_place_and_its_end() -> None:
    recorder = _Recorder()
    logger = logging.getLogger("dtacq_ioc.loopwatch")
    logger.addHandler(recorder)
    try:

        async def main() -> str:
            watch = asyncio.create_task(LoopWatch(threshold_s=0.5, beat_s=0.05).beat())
            await asyncio.sleep(0.1)  # the watch is beating
            report = _hold_the_loop(recorder)
            await asyncio.to_thread(recorder.wait_for, "turned again")
            watch.cancel()
            return report

        report = asyncio.run(main())
    finally:
        logger.removeHandler(recorder)
    assert "_hold_the_loop" in report and "test_loopwatch.py" in report, report
    assert report.startswith("event loop blocked for ")
    assert report.index("wait_for") < report.index("_hold_the_loop")  # innermost first
