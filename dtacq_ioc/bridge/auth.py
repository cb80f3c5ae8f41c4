"""Write tokens: the bridge is read-only unless a client shows a configured token."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from dtacq_ioc.config import Secret


class TokenCheck:
    """Constant-time comparison against every configured token; tokens are never logged."""

    def __init__(self, secrets: Iterable[Secret]):
        values = (s.get() for s in secrets)
        self._tokens = tuple(v.encode() for v in values if v)

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
