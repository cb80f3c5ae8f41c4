"""The card's SSH login (paramiko): password auth, `reboot`, and stub answers to the rest."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
from typing import TYPE_CHECKING

import paramiko

from dtacq_ioc.sim.net import TcpService

if TYPE_CHECKING:
    from dtacq_ioc.sim.card import SimCard

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a session looks whether its transport is still up
HANDSHAKE_S = 10.0
# paramiko's answers, typed here (paramiko has no type information)
_AUTH_FAILED: int = paramiko.AUTH_FAILED
_AUTH_SUCCESSFUL: int = paramiko.AUTH_SUCCESSFUL
_OPEN_SUCCEEDED: int = paramiko.OPEN_SUCCEEDED
_OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED: int = paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def new_host_key() -> paramiko.PKey:
    """A host key for this process only, never written to disk."""
    return paramiko.ECDSAKey.generate()


class _Server(paramiko.ServerInterface):  # type: ignore[misc]  # paramiko is untyped
    def __init__(self, user: str | None, password: str | None):
        self.user = user
        self.password = password
        self.requests: queue.Queue[tuple[paramiko.Channel, str]] = queue.Queue()

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        if self.user is None or self.password is None:
            return _AUTH_FAILED  # credentials not configured: nobody gets in
        if username == self.user and password == self.password:
            return _AUTH_SUCCESSFUL
        return _AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return _OPEN_SUCCEEDED
        return _OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.requests.put((channel, command.decode("utf-8", "replace").strip()))
        return True


class SshService:
    def __init__(self, card: SimCard, host_key: paramiko.PKey):
        self.card = card
        self.host_key = host_key
        self._service: TcpService | None = None

    def service(self) -> TcpService:
        cfg = self.card.config
        self._service = TcpService(f"{cfg.name}:ssh", cfg.host, cfg.ssh.port, self.handle)
        return self._service

    def handle(self, conn: socket.socket) -> None:
        ssh = self.card.config.ssh
        user, password = ssh.user.get(), ssh.password.get()
        if user is None or password is None:
            log.warning("%s: ssh user or password not set: every login fails", self.card.name)
        server = _Server(user, password)
        transport = paramiko.Transport(conn)
        transport.add_server_key(self.host_key)
        try:
            transport.start_server(server=server)
            while transport.is_active() and not (self._service and self._service.stopping):
                try:
                    channel, command = server.requests.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if self._run(channel, command):
                    break
        except (paramiko.SSHException, EOFError) as exc:
            log.debug("%s: ssh session ended: %s", self.card.name, exc)
        finally:
            transport.close()

    def _run(self, channel: paramiko.Channel, command: str) -> bool:
        """Answer one exec request; True when it was `reboot` (the session ends)."""
        log.info("%s: ssh: %s", self.card.name, command)
        name = command.split()[0] if command.split() else ""
        reboot = name in ("reboot", "/sbin/reboot")
        status, out, err = 0, self._stub(name), ""
        if out is None:
            status, out, err = 127, "", f"sh: {name}: not found\n"
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            if out:
                channel.sendall(out.encode())
            if err:
                channel.sendall_stderr(err.encode())
            channel.send_exit_status(status)
            channel.close()
        if reboot:
            self.card.reboot()  # runs on its own thread, which stops this service
        return reboot

    def _stub(self, name: str) -> str | None:
        st = self.card.state
        answers = {
            "reboot": "",
            "/sbin/reboot": "",
            "hostname": f"{st.hostname}\n",
            "uptime": " 12:00:00 up 1 min,  load average: 0.00, 0.00, 0.00\n",
            "uname": "Linux\n",
        }
        return answers.get(name)
