"""A real `dtacq-ioc run` process on simulated cards, and CA helpers for the tests.

Each IOC gets a prefix of its own, so pyepics' channel cache (one libca context
per test process) never mixes PVs of two tests.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import output, running, sim_card_toml

DEADLINE_S = 30.0


@dataclass
class Ioc:
    proc: subprocess.Popen
    config: Path
    prefix: str
    host: str
    data_dir: Path

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll a condition that an event will make true; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.05)


def caget(name: str, **kw: Any) -> Any:
    """A fresh read from the IOC (pyepics' default answers from its monitor cache, which
    may not yet hold an update that is on its way)."""
    import epics

    kw.setdefault("use_monitor", False)
    return epics.caget(name, timeout=5.0, **kw)


def castr(name: str) -> str:
    """A long-string (CHAR array) PV as text, as `caget -S` prints it."""
    return caget(name, as_string=True) or ""


def ioc_toml(
    tmp_path: Path,
    host: str,
    prefix: str,
    module: str = "ACQ425ELF",
    ioc_extra: str = "",
    site_extra: str = "",
    card_extra: str = "",
    archive_extra: str = "",
    faults: str = "",
    display_samples: int = 1024,
) -> Path:
    """A config with one simulated card at `host`, data and autosave under tmp_path."""
    card = sim_card_toml(
        "C1", host, module=module, prefix=prefix, site_extra=site_extra,
        card_extra=card_extra, faults=faults,
    )  # fmt: skip
    path = tmp_path / "test.toml"
    path.write_text(
        f"""
[ioc]
name = "test"
autosave_dir = "autosave"
display_samples = {display_samples}
{ioc_extra}

[archive]
data_dir = "data"
{archive_extra}
{card}
"""
    )
    return path


def new_prefix() -> str:
    return f"T{secrets.token_hex(3).upper()}:"


@contextlib.contextmanager
def ioc_process(config: Path, prefix: str, host: str, ready_state: str = "IDLE",
                env: dict[str, str] | None = None) -> Iterator[Ioc]:  # fmt: skip
    """Start the IOC; ready once its card reports `ready_state` over CA."""
    with running(["run", str(config)], env=env) as proc:
        ioc = Ioc(proc, config, prefix, host, config.parent / "data")

        def up() -> bool:
            if proc.poll() is not None:
                out = output(proc)
                raise RuntimeError(f"IOC exited with {proc.returncode}:\n{out[-3000:]}")
            return caget(ioc.pv("STATE"), as_string=True) == ready_state

        try:
            wait_for(up, f"{prefix}STATE == {ready_state}")
            yield ioc
        finally:
            # Shown by pytest only when the test fails: the IOC's own account.
            print("".join(output(proc).splitlines(keepends=True)[-80:]))
