"""SSH to a card (paramiko): admin commands and reboot.

Credentials come from the config's secrets, looked up only when connecting and
never logged. Host keys are checked by the configured policy: ``reject`` (the
default) accepts only keys already in the known_hosts file or the system's
host keys, ``warn`` logs and accepts an unknown key, ``auto-add`` accepts it
and records it in the known_hosts file when one is configured.
"""

from __future__ import annotations

import logging
import time

import paramiko

from dtacq_ioc.card.errors import CardError
from dtacq_ioc.config import SshConfig

log = logging.getLogger(__name__)


class _SaveNewKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # paramiko is untyped
    """auto-add that also writes the key, so the next connection checks against it."""

    def __init__(self, path: str | None):
        self.path = path

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("%s: accepted new host key %s", hostname, key.get_name())
        if self.path:
            client.save_host_keys(self.path)


class _LogUnknownKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # paramiko is untyped
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        log.warning("%s: unknown host key %s accepted (policy warn)", hostname, key.get_name())


class SshClient:
    """One SSH login per call: cards are rebooted or administered rarely."""

    def __init__(self, host: str, config: SshConfig, card: str = ""):
        self.host = host
        self.config = config
        self.card = card or host

    def _policy(self) -> paramiko.MissingHostKeyPolicy:
        known = str(self.config.known_hosts) if self.config.known_hosts else None
        if self.config.host_key_policy == "auto-add":
            return _SaveNewKey(known)
        if self.config.host_key_policy == "warn":
            return _LogUnknownKey()
        return paramiko.RejectPolicy()

    def _client(self) -> paramiko.SSHClient:
        cfg = self.config
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        if cfg.known_hosts and cfg.known_hosts.exists():
            client.load_host_keys(str(cfg.known_hosts))
        client.set_missing_host_key_policy(self._policy())
        password = cfg.password.get()
        user = cfg.user.get()
        if not user:
            raise CardError(self.card, f"{self.card}: ssh: no user name ({cfg.user!r} is unset)")
        try:
            client.connect(
                self.host,
                port=cfg.port,
                username=user,
                password=password,
                key_filename=str(cfg.key_file) if cfg.key_file else None,
                timeout=cfg.timeout_s,
                banner_timeout=cfg.timeout_s,
                auth_timeout=cfg.timeout_s,
                allow_agent=False,
                look_for_keys=False,
            )
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            # exc texts from paramiko never hold the password; name the failure kind too
            raise CardError(
                self.card,
                f"{self.card}: ssh {user}@{self.host}:{cfg.port}: {type(exc).__name__}: {exc}",
            ) from None
        return client

    def run(self, command: str) -> tuple[int, str]:
        """Run a command; return its exit status and its output (stdout and stderr)."""
        client = self._client()
        try:
            log.info("%s: ssh run %r", self.card, command)
            _, stdout, _ = client.exec_command(command, timeout=self.config.timeout_s)
            stdout.channel.set_combine_stderr(True)
            output = stdout.read().decode("utf-8", "replace")
            return stdout.channel.recv_exit_status(), output
        except (paramiko.SSHException, OSError) as exc:
            raise CardError(self.card, f"{self.card}: ssh {command!r}: {exc}") from None
        finally:
            client.close()

    def _exit_status(self, channel: paramiko.Channel) -> int | None:
        """The exit status, or None when a card going down drops the session first."""
        deadline = time.monotonic() + self.config.timeout_s
        while not channel.status_event.wait(0.05):
            transport = channel.get_transport()
            if channel.closed or not transport.is_active() or time.monotonic() > deadline:
                return None
        status: int = channel.recv_exit_status()
        return status

    def reboot(self) -> None:
        """Ask the card to reboot; the connection may drop before any reply."""
        client = self._client()
        try:
            log.warning("%s: rebooting over ssh", self.card)
            _, stdout, _ = client.exec_command("reboot", timeout=self.config.timeout_s)
            status = self._exit_status(stdout.channel)
            if status:
                raise CardError(self.card, f"{self.card}: reboot exited with {status}")
        except (paramiko.SSHException, OSError) as exc:
            raise CardError(self.card, f"{self.card}: ssh reboot: {exc}") from None
        finally:
            client.close()
