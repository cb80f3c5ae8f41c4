"""What the IOC, the bridge and the card driver share: names, states and the sample layout.

The ground floor: this module imports nothing of the project's, so every package
can use it, and a change here is a change of the contract between the faces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# -- states, as the enum PVs STATE and RUN:STATE_RBV serve them (index = enum value) -------

CARD_STATES = ("DISCONNECTED", "CONNECTING", "IDLE", "RUNNING", "FAULT")
RUN_STATES = ("IDLE", "STARTING", "RUNNING", "STOPPING", "FAULT")
RUN_IDLE = RUN_STATES.index("IDLE")
RUN_RUNNING = RUN_STATES.index("RUNNING")
RUN_FAULT = RUN_STATES.index("FAULT")
NO_YES = ("No", "Yes")
CLOCKS = ("Internal", "External")
ACTION = ("Idle", "Go")  # RUN:START, RUN:STOP, RESET, REBOOT

# -- PVs whose values are text longer than a DBR_STRING (CHAR arrays, `caget -S`) ------------

TEXT_SUFFIXES = (
    "LAST_ERROR", "FW:FPGA", "RUN:NAME", "RUN:LOG", "RUN:TRIGGER_ARGS", "RUN:CHANNELS",
    "RUN:LOGITEMS", "RUN:FILE_RBV", "RUN:FAULT_RBV", "RUN:LAST_RESULT",
    "RUN:RECENT", "TRIGGERS",
)  # fmt: skip

# -- the aggregated stream's sample layout ------------------------------------------------

SPAD_WORDS = 2  # "spad 1,2,0": the sample counter, then spad1
SPAD_BYTES = 4  # each spad word is 32 bits, whatever the AI word size


@dataclass(frozen=True)
class StreamLayout:
    """What one sample of the aggregated stream holds, in order: AI words, then spad words."""

    sites: tuple[int, ...]
    nchan: tuple[int, ...]  # AI channel words per site, in the order of ``sites``
    word_size: int  # bytes per AI word: 2 (data32=0) or 4 (data32=1)
    spad_words: int = SPAD_WORDS  # 32-bit spad words after the AI words

    def __post_init__(self) -> None:
        if self.word_size not in (2, 4):
            raise ValueError(f"word_size {self.word_size} must be 2 or 4")
        if len(self.sites) != len(self.nchan) or not self.sites:
            raise ValueError(f"sites {self.sites} and nchan {self.nchan} must pair up")
        if any(n <= 0 for n in self.nchan) or self.spad_words < 0:
            raise ValueError(f"bad channel counts {self.nchan} or spad words {self.spad_words}")

    @property
    def ai_channels(self) -> int:
        return sum(self.nchan)

    @property
    def sample_bytes(self) -> int:
        """The card's ssb: AI words plus 32-bit spad words."""
        return self.ai_channels * self.word_size + SPAD_BYTES * self.spad_words

    @property
    def card_nchan(self) -> int:
        """The site-0 NCHAN the card reports for this layout (spad counted in data words)."""
        return self.ai_channels + self.spad_words * (SPAD_BYTES // self.word_size)

    @cached_property
    def sample_dtype(self) -> np.dtype:
        ai = "<i2" if self.word_size == 2 else "<i4"
        return np.dtype([("ai", ai, (self.ai_channels,)), ("spad", "<u4", (self.spad_words,))])

    def site_slice(self, site: int) -> slice:
        """The columns of ``samples["ai"]`` that belong to ``site``."""
        i = self.sites.index(site)
        start = sum(self.nchan[:i])
        return slice(start, start + self.nchan[i])
