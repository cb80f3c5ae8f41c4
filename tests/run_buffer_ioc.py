"""A Channel Access server with just the PVs the nEDM protocol's readBuffer reads, and a
``RUN:BUFFER`` holding whole run buffers as the IOC is asked to publish them: the AI
words of every sample (sample-major), as the card sent them (before the bit shift).

Buffer k holds, for sample s and channel c, ``((k * 1000 + s) * 10 + c) << SHIFT``, so
a reader can tell which buffer it got and that its channels and shift are right.

Run as a script: ``python tests/run_buffer_ioc.py PREFIX``.
"""

from __future__ import annotations

import asyncio
import sys
import time

NCHAN, SAMPLES, SHIFT, RATE_HZ = 4, 50, 8, 5.0


def expected(k: int, channel: int) -> list[int]:
    return [(k * 1000 + s) * 10 + channel for s in range(SAMPLES)]


def main(prefix: str) -> None:
    import numpy as np
    from caproto import ChannelType
    from caproto.asyncio.server import start_server
    from caproto.server import PVGroup, pvproperty

    def text(value: str) -> pvproperty:
        return pvproperty(value=value, dtype=ChannelType.CHAR, max_length=128)

    body = {
        "SITES": text("1"),
        "SITELIST": text("1"),
        "1:NCHAN": pvproperty(value=NCHAN, dtype=int),
        "1:WORD_SIZE": pvproperty(value=4, dtype=int),
        "1:BIT_SHIFT": pvproperty(value=SHIFT, dtype=int),
        "RUN:STATE_RBV": pvproperty(
            value="RUNNING", dtype=ChannelType.ENUM,
            enum_strings=["IDLE", "STARTING", "RUNNING", "STOPPING", "FAULT"],
        ),
        "RUN:ID_RBV": text("run-1"),
        "AI:COUNTER": pvproperty(value=0.0, dtype=float),  # display frames: not buffers
        "RUN:BUFFER": pvproperty(
            value=np.zeros(0, dtype=np.int32), dtype=ChannelType.LONG,
            max_length=NCHAN * SAMPLES,
        ),
    }  # fmt: skip
    for key, prop in body.items():
        prop.pvspec = prop.pvspec._replace(name=key)  # names with ':' as the IOC has them
    group = type("RunBuffer", (PVGroup,), {k.replace(":", "_"): v for k, v in body.items()})
    pvs = group(prefix=prefix)
    buffer = pvs.RUN_BUFFER
    counter = pvs.AI_COUNTER

    async def tick() -> None:
        k = 0
        s = np.arange(SAMPLES)[:, None]
        c = np.arange(NCHAN)[None, :]
        while True:
            words = (((k * 1000 + s) * 10 + c) << SHIFT).astype(np.int32).reshape(-1)
            await buffer.write(words, timestamp=time.time())
            for _ in range(3):  # display frames come faster than buffers
                await counter.write(float(k), timestamp=time.time())
                await asyncio.sleep(1.0 / RATE_HZ / 3)
            k += 1

    async def serve() -> None:
        await asyncio.gather(start_server(pvs.pvdb, interfaces=["127.0.0.1"]), tick())

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1])
