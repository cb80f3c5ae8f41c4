"""Log lines that a client (or a flood of anything) cannot multiply.

At most one line per kind per interval; the lines not written are counted and
the count rides on the next line of that kind (or on `close()`). Kinds are a
few fixed words or format strings, never client text, so the table stays small.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

INTERVAL_S = 60.0


@dataclass
class RateLimitedLog:
    logger: logging.Logger
    prefix: str
    interval_s: float = INTERVAL_S
    _last: dict[str, float] = field(default_factory=dict)
    _quiet: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str, text: str, level: int = logging.INFO) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._quiet.pop(kind, 0)
        tail = f" (and {more} more like it not logged)" if more else ""
        self.logger.log(level, "%s: %s%s", self.prefix, text, tail)

    def close(self) -> None:
        """Say what was left unsaid (one line per kind)."""
        for kind, more in self._quiet.items():
            self.logger.info("%s: %d more %s not logged", self.prefix, more, kind)
        self._quiet.clear()
