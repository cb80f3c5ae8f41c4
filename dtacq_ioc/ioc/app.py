"""`dtacq-ioc run`: one asyncio loop with the caproto server, every card, and the bridge.

Simulated cards (a `[cards.sim]` table) are played by a child `dtacq-ioc sim`
process, so the simulator's streaming never competes with the IOC for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
from pathlib import Path

from caproto.asyncio.server import start_server

from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.config import Config
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.autosave import Autosave
from dtacq_ioc.ioc.controller import CardController
from dtacq_ioc.ioc.fanout import Fanout
from dtacq_ioc.ioc.notify import Notifier
from dtacq_ioc.ioc.status import IocStatus
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)

SIM_READY_TIMEOUT_S = 20.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20


def run_ioc(config: Config, list_pvs: bool = False, with_sim: bool = True) -> int:
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


def autosave_path(config: Config) -> Path | None:
    if config.ioc.autosave_dir is None:
        return None
    return config.ioc.autosave_dir / f"{config.ioc.name}.json"


async def serve(config: Config, list_pvs: bool = False, with_sim: bool = True) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    sim = await start_simulator(config) if with_sim else None
    catalog = open_catalog(config.archive)
    recovered = await asyncio.to_thread(catalog.recover_interrupted)
    for record in recovered:
        log.warning("run %s was interrupted (the IOC stopped mid-run); marked so", record.run_id)
    autosave = Autosave(autosave_path(config))
    autosave.load()
    triggers = TriggerRegistry(config.ioc.trigger_dir)
    access = pvs.AccessRules(config.ioc.access.write_hosts, config.ioc.access.write_users)
    controllers = [
        CardController(card, config.ioc, config.archive, catalog, autosave, triggers, access)
        for card in config.cards
    ]
    fanout = Fanout()
    for c in controllers:
        c.pvs.group.fanout = fanout
    notifier = Notifier()
    status = IocStatus(config, controllers, catalog, notifier, fanout)
    pvdb: dict = dict(status.pvdb)
    for c in controllers:
        pvdb.update(c.pvs.pvdb)
        if autosave.load_error:
            c.last_error = autosave.load_error
        await c.restore()
    log.info("serving %d PVs for %d cards", len(pvdb), len(controllers))
    if list_pvs:
        for name in pvdb:
            log.info("PV %s", name)

    async def serving(_async_lib) -> None:
        # caproto calls this once its sockets are bound: clients can connect from now on.
        notifier.ready(f"serving {len(pvdb)} PVs for {len(controllers)} cards")

    server = start_server(pvdb, interfaces=list(config.ioc.interfaces), startup_hook=serving)
    tasks = [
        loop.create_task(server, name="ca-server"),
        loop.create_task(status.run(), name="status"),
    ]
    if notifier.watchdog_s is not None:
        tasks.append(loop.create_task(notifier.watchdog_loop(), name="watchdog"))
    for c in controllers:
        tasks.append(loop.create_task(c.run(), name=f"card-{c.name}"))
        tasks.append(loop.create_task(c.publish_loop(), name=f"publish-{c.name}"))
    bridge = None
    if config.bridge.enabled:
        from dtacq_ioc.bridge.app import start_bridge

        bridge = await start_bridge(config, loop)

    stopped = loop.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopped and t.exception() is not None]
    for t in failed:
        log.error("task %s failed: %r", t.get_name(), t.exception())
    log.info("shutting down: closing runs and cards")
    notifier.stopping()
    if bridge is not None:
        await bridge.stop()
    await asyncio.gather(*(c.stop() for c in controllers), return_exceptions=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await fanout.close()
    autosave.flush()
    await asyncio.to_thread(catalog.close)
    if sim is not None:
        await stop_simulator(sim)
    notifier.close()
    log.info("stopped")
    return 1 if failed else 0


async def start_simulator(config: Config) -> subprocess.Popen | None:
    """Play the config's simulated cards in a child process; wait until they answer."""
    simulated = [c for c in config.cards if c.sim is not None]
    if not simulated:
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtacq_ioc", "sim", str(config.path)],
        stdin=subprocess.DEVNULL,
        # Its own process group: a Ctrl-C or a group SIGTERM reaches the IOC only, which
        # closes its runs first and then stops the cards (a real card outlives its IOC).
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SIM_READY_TIMEOUT_S
    for card in simulated:
        port = card.knob_port_base + card.sites[0]
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {proc.returncode} at start")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(card.host, port)
                writer.close()
                break
            if loop.time() > deadline:
                proc.terminate()
                raise RuntimeError(f"simulated card {card.name} did not open {card.host}:{port}")
            await asyncio.sleep(0.1)
    log.info("simulator running (pid %d) for %s", proc.pid, ", ".join(c.name for c in simulated))
    return proc


def _die_with_parent() -> None:
    """In the child: SIGTERM when the IOC dies, even by SIGKILL, so no card outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def stop_simulator(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        await asyncio.to_thread(proc.wait, 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait)
