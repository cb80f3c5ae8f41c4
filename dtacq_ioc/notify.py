"""systemd's notify protocol without a dependency: datagrams to $NOTIFY_SOCKET.

Under `Type=notify` systemd waits for `READY=1` before it calls the service
started, shows `STATUS=` in `systemctl status`, restarts the service when
`WATCHDOG=1` stops arriving within `WatchdogSec=`, and knows a stop is under
way after `STOPPING=1`. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET as an AF_UNIX address; '@' names the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """WatchdogSec in seconds when systemd asks this process for pings, else None."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    # A WATCHDOG_PID naming another process (our parent's) is not meant for us.
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


class Notifier:
    """Sends notify messages; never raises (a lost message must not stop the IOC)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.path = path
        self.address = socket_address(path) if path else None
        self.watchdog_s = watchdog_interval(env) if path else None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; True when it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket would otherwise flood the log
                log.warning("cannot notify systemd at %s: %s", self.path, exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str = "") -> None:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        if self.send(*lines):
            log.info("told systemd: ready")

    def status(self, text: str) -> None:
        self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog period from the loop: a wedged loop stops the pings."""
        if self.watchdog_s is None:
            return
        log.info("systemd watchdog: %.1f s, pinging every %.1f s", self.watchdog_s,
                 self.watchdog_s / 2)  # fmt: skip
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
