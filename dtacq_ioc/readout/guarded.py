"""Callbacks from the readout's threads into their owners, which must never stop a stream."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def call_guarded(callback: Callable[..., Any] | None, *args: Any, what: str) -> None:
    """Call `callback(*args)` if there is one; an exception in it is logged, not raised."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("%s: callback failed", what)
