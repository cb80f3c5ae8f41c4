"""The composition root: `dtacq-ioc run` builds the process from its config.

One asyncio loop runs the IOC (caproto), the browser bridge (Autobahn on Twisted's
asyncio reactor) and systemd's notifications; the config's simulated cards run in a
child process. `ioc` and `bridge` know nothing of each other: the bridge reads the
IOC's PVs over Channel Access like any client.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from typing import Any

from dtacq_ioc.config import Config
from dtacq_ioc.ioc.app import Ioc
from dtacq_ioc.loopwatch import LoopWatch
from dtacq_ioc.notify import Notifier
from dtacq_ioc.preflight import ca_port_caveat
from dtacq_ioc.sim.child import start_simulator, stop_simulator

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20


def run_service(config: Config, list_pvs: bool = False, with_sim: bool = True) -> int:
    _big_arrays_to_the_os()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(config, list_pvs=list_pvs, with_sim=with_sim))
    finally:
        loop.close()


def _big_arrays_to_the_os() -> None:
    """Keep multi-MB arrays in mmap'd memory that goes back to the OS when freed.

    Display frames allocate such arrays at the display rate; glibc's adaptive mmap
    threshold would soon move them onto the heap, where fragmentation keeps the
    memory: measured, a fixed threshold cut the IOC's RSS by a third.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        log.debug("not glibc: malloc left as it is")


async def serve(config: Config, list_pvs: bool = False, with_sim: bool = True) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    caveat = ca_port_caveat(os.environ)
    if caveat:
        log.warning(caveat)
    sim = await start_simulator(config) if with_sim else None
    notifier = Notifier()
    ioc = Ioc(config, status_sink=notifier)
    await ioc.start()
    notifier.ready(f"serving {len(ioc.pvdb)} PVs for {len(ioc.controllers)} cards")
    if list_pvs:
        for name in ioc.pvdb:
            log.info("PV %s", name)
    tasks: list[asyncio.Task[Any]] = [
        *ioc.tasks,
        loop.create_task(LoopWatch().beat(), name="loop-watch"),
    ]
    if notifier.watchdog_s is not None:
        tasks.append(loop.create_task(notifier.watchdog_loop(), name="watchdog"))
    bridge = None
    if config.bridge.enabled:
        from dtacq_ioc.bridge.app import start_bridge

        bridge = await start_bridge(config, loop)

    stopped = loop.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopped and t.exception() is not None]
    for t in failed:
        log.error("task %s failed: %s", t.get_name(), t.exception())
    log.info("shutting down: closing runs and cards")
    notifier.stopping()
    if bridge is not None:
        await bridge.stop()
    await ioc.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if sim is not None:
        await stop_simulator(sim)
    notifier.close()
    log.info("stopped")
    return 1 if failed else 0
