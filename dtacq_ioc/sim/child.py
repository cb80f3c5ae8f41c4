"""The config's simulated cards played by a child `dtacq-ioc sim` process.

A child process, so the simulator's streaming never competes with the IOC for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import subprocess
import sys

from dtacq_ioc.config import Config

log = logging.getLogger(__name__)

SIM_READY_TIMEOUT_S = 20.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


async def start_simulator(config: Config) -> subprocess.Popen[bytes] | None:
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


async def stop_simulator(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        await asyncio.to_thread(proc.wait, 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait)
