"""Settings saved on change and restored at start: one JSON file per IOC.

The file is replaced atomically (write, fsync, rename), so a crash leaves the
old or the new settings, never half a file. A missing or corrupt file is
reported and the IOC starts on defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Autosave:
    """Per-card dictionaries of setting name -> JSON value, written shortly after a change."""

    def __init__(self, path: Path | None, delay_s: float = 0.5):
        self.path = path
        self.delay_s = delay_s
        self._data: dict[str, dict[str, Any]] = {}
        self._pending: asyncio.TimerHandle | None = None
        self.load_error = ""

    def load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("autosave: no file %s yet; starting on defaults", self.path)
            return {}
        except OSError as exc:
            self.load_error = f"autosave: cannot read {self.path}: {exc.strerror}"
            log.error("%s; starting on defaults", self.load_error)
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ValueError("top level must map card names to objects")
        except ValueError as exc:
            self.load_error = f"autosave: {self.path} is corrupt ({exc})"
            log.error("%s; starting on defaults", self.load_error)
            return {}
        self._data = data
        log.info(
            "autosave: restored settings of %s from %s", ", ".join(data) or "no card", self.path
        )
        return data

    def card(self, name: str) -> dict[str, Any]:
        return dict(self._data.get(name, {}))

    def set(self, card: str, key: str, value: Any) -> None:
        """Record a setting; the file is written after `delay_s` without further changes."""
        if self._data.get(card, {}).get(key) == value:
            return
        self._data.setdefault(card, {})[key] = value
        if self.path is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._pending is not None:
            self._pending.cancel()
        self._pending = loop.call_later(self.delay_s, self.flush)

    def flush(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self._data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except (OSError, TypeError, ValueError) as exc:
            log.error("autosave: cannot write %s: %s", self.path, getattr(exc, "strerror", exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
