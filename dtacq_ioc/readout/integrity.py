"""The spad sample counter check: every jump in the counter is found, counted and logged.

The card's spad word 0 counts samples (+1 per sample, unsigned 32-bit, wrapping
at 2^32). A difference other than 1 between neighbouring samples, including
across buffer boundaries, means lost or corrupt data; it is never hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

COUNTER_MODULUS = 1 << 32
LOG_PER_BUFFER = 5


@dataclass(frozen=True)
class Gap:
    """A counter jump: sample `position` of the buffer did not follow the one before it.

    `size` is how many counts the counter skipped (negative when it went back);
    `expected` and `got` are the counter values. Position 0 means the jump is
    between the previous buffer's last sample and this buffer's first.
    """

    position: int
    size: int
    expected: int
    got: int


@dataclass
class CounterCheck:
    """Checks buffer after buffer; state carries over so jumps between buffers are seen."""

    enabled: bool = True
    name: str = ""
    errors: int = 0  # jumps seen since creation (or reset)
    samples: int = 0
    last: int | None = field(default=None)

    def reset(self) -> None:
        """Forget the previous buffer: the next one starts a new stream."""
        self.last = None

    def check(self, counter: np.ndarray) -> list[Gap]:
        """Check one buffer's counter column (uint32); returns its jumps, in order."""
        n = len(counter)
        if not self.enabled or n == 0:
            self.samples += n
            return []
        counter = np.asarray(counter, dtype=np.uint32)
        gaps: list[Gap] = []
        if self.last is not None:
            first = int(counter[0])
            expected = (self.last + 1) % COUNTER_MODULUS
            if first != expected:
                gaps.append(_gap(0, expected, first))
        # uint32 subtraction wraps exactly like the counter, so 0xffffffff -> 0 gives 1.
        step = counter[1:] - counter[:-1]
        bad = step != 1
        if bad.any():
            for i in np.flatnonzero(bad):
                pos = int(i) + 1
                expected = (int(counter[pos - 1]) + 1) % COUNTER_MODULUS
                gaps.append(_gap(pos, expected, int(counter[pos])))
        self.last = int(counter[-1])
        self.samples += n
        if gaps:
            self.errors += len(gaps)
            # A corrupt stream can jump on every sample: log a few, then a summary.
            for g in gaps[:LOG_PER_BUFFER]:
                log.warning(
                    "%scounter jump at sample %d of buffer: expected %d, got %d (skipped %d)",
                    f"{self.name}: " if self.name else "",
                    g.position,
                    g.expected,
                    g.got,
                    g.size,
                )
            if len(gaps) > LOG_PER_BUFFER:
                log.warning("%d more counter jumps in the same buffer", len(gaps) - LOG_PER_BUFFER)
        return gaps


def _gap(position: int, expected: int, got: int) -> Gap:
    size = (got - expected) % COUNTER_MODULUS
    if size >= COUNTER_MODULUS // 2:  # a counter that went back reads as a negative skip
        size -= COUNTER_MODULUS
    return Gap(position=position, size=size, expected=expected, got=got)
