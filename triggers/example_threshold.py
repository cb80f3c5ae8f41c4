"""Example trigger file: copy it, change it, and choose it by name when starting a run.

Every `*.py` file in the directory named by `[ioc] trigger_dir` is read when a run
asks for a trigger that is not built in. Each `Trigger` subclass it defines is a
trigger, named by its `NAME` attribute or else its class name. Only names (and a
small dict of number or string arguments, passed to `__init__`) come from
clients; the code here is the operator's.

`trigger(self, v)` gets `v`, channel index (0-based over the streamed channels)
-> that buffer's ADC codes (bit shift applied), and returns False (write
nothing), True (write the whole buffer) or a list of actions: None (the whole
buffer), OpenNewReadoutFile (start the next file), (start, end) (a sample range),
EndReadoutNow (end after the actions before it). Raising EndReadoutNow ends the
run at once. `self.context` (set in `setup`) holds the sample rate, the channel
list and volts per code.
"""

from __future__ import annotations

import numpy as np

from dtacq_ioc.readout.triggers import OpenNewReadoutFile, Trigger, TriggerError


class PulseWindows(Trigger):
    """Write `before`..`after` samples around every rise of `channel` above `level` volts.

    Each pulse goes to a file of its own. Arguments: channel, level, before, after.
    """

    NAME = "pulse_windows"

    def __init__(self, channel: int = 0, level: float = 1.0, before: int = 100, after: int = 1000):
        super().__init__()
        if before < 0 or after < 1:
            raise TriggerError("pulse_windows: before must be >= 0 and after >= 1")
        self.channel, self.level = int(channel), float(level)
        self.before, self.after = int(before), int(after)
        self.threshold = 0.0

    def setup(self, context):
        super().setup(context)
        if self.channel not in context.channels:
            raise TriggerError(f"pulse_windows: unknown channel {self.channel}")
        self.threshold = self.level / context.volts_per_code[self.channel]

    def trigger(self, v):
        x = v[self.channel]
        above = x > self.threshold
        # Rising edges: above now, not above one sample earlier (vectorised, no loop per sample).
        rises = np.flatnonzero(above[1:] & ~above[:-1]) + 1
        actions = []
        for r in rises:
            actions += [OpenNewReadoutFile, (int(r) - self.before, int(r) + self.after)]
        return actions or False
