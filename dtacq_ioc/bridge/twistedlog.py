"""Twisted's and Autobahn's log events into Python logging, one line each.

With no observer of its own, Twisted prints every failure with its traceback to
stderr, and some failures are a client's doing (a broken handshake, a path the
file server cannot stat). Here each event becomes one line in words; the
traceback goes out at DEBUG only, and each kind of event (its format) at most
once a minute, so a client repeating a fault cannot flood the log. Twisted's
routine INFO chatter (a line per HTTP request) is DEBUG.
"""

from __future__ import annotations

import logging
from typing import Any

from dtacq_ioc.bridge.ratelog import RateLimitedLog

log = logging.getLogger("dtacq_ioc.bridge.twisted")


def start_twisted_logging() -> None:
    """Observe Twisted's global log from now on (once per process)."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    levels = {
        LogLevel.debug: logging.DEBUG,
        LogLevel.info: logging.DEBUG,
        LogLevel.warn: logging.WARNING,
        LogLevel.error: logging.ERROR,
        LogLevel.critical: logging.ERROR,
    }

    lines = RateLimitedLog(log, "web server")

    def observe(event: dict[str, Any]) -> None:
        level = levels.get(event.get("log_level"), logging.DEBUG)
        failure = event.get("log_failure")
        if failure is not None:
            level = max(level, logging.WARNING)
        if not log.isEnabledFor(level):
            return
        try:
            text = (formatEvent(event) or "").strip()
            if failure is not None:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s", failure.getTraceback())
                why = failure.getErrorMessage()
                text = f"{text}: {why}" if text else why
        except Exception as exc:  # a log event must never break the reactor
            text = f"unreadable log event ({exc})"
        kind = str(event.get("log_format") or event.get("log_namespace"))[:200]
        lines.note(kind, (text.splitlines() or [""])[0], level)

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)  # type: ignore[list-item]  # a plain callable is an observer
