"""Write tokens: the bridge is read-only unless a client shows a configured token.

A bridge that listens on loopback only and has no token configured makes one for
its own lifetime (as Jupyter does) and logs the page's URL with it: whoever can
read the log of a process on this host may control it; nobody else can reach it.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Iterable

from dtacq_ioc.config import BridgeConfig, Secret


def loopback_only(host: str) -> bool:
    """Whether an interface address reaches this host only ('localhost', 127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or '' (every interface): never assume loopback


class TokenCheck:
    """Constant-time comparison against every configured token; tokens are never logged."""

    def __init__(self, secrets_: Iterable[Secret], one_time: str | None = None):
        values = [s.get() for s in secrets_]
        self._tokens = tuple(v.encode() for v in [*values, one_time] if v)
        self.one_time = one_time

    @classmethod
    def for_bridge(cls, cfg: BridgeConfig) -> TokenCheck:
        """The configured tokens; with none on a loopback-only bridge, a one-time token."""
        configured = cls(cfg.tokens)
        if configured.enabled or not loopback_only(cfg.host):
            return configured
        return cls((), one_time=secrets.token_urlsafe(24))

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check(self, token: object) -> bool:
        if not isinstance(token, str) or not token:
            return False
        given = token.encode()
        ok = False
        for expected in self._tokens:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(given, expected)
        return ok
