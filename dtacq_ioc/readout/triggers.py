"""Triggers: what part of each buffer a run writes, under the old system's contract.

A trigger is a `Trigger` subclass whose `trigger(self, v)` gets `v`, a mapping
of channel index (0-based over the stream's channels) to that buffer's ADC
codes (bit shift applied; the arrays may be views of the stream's buffer, valid
only during the call: copy what you keep), and returns:

- False: write nothing; True: write the whole buffer;
- a list of actions, applied in order: `None` (write the whole buffer),
  `OpenNewReadoutFile` (close the file, start the next), `(start, end)`
  (write that sample range), and, beyond the old contract, `EndReadoutNow`
  (end the run after the actions before it).

Raising `EndReadoutNow` ends the run at once. Triggers are chosen by name only:
the built-ins below, or classes in `*.py` files of the configured trigger
directory. Code is never taken from a client.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_ARGS = 16
MAX_ARG_TEXT = 256


class EndReadoutNow(Exception):
    """Raised by (or listed as an action of) a trigger to end the run."""


class OpenNewReadoutFile:
    """Action: close the current file and start the next (the class or an instance)."""


class TriggerError(ValueError):
    """A trigger cannot be made or misbehaved; the message is one line."""


@dataclass(frozen=True)
class TriggerContext:
    """What a trigger may want to know about the run it serves."""

    sample_rate_hz: float = 0.0  # 0 when unknown
    channels: tuple[int, ...] = ()  # keys of v
    channel_list: tuple[int, ...] = ()  # channels written to files
    downsample: int = 1
    bytes_per_output_sample: int = 0  # one written (downsampled) sample, all channels
    volts_per_code: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Write:
    start: int
    end: int


@dataclass(frozen=True)
class Rotate:
    pass


@dataclass(frozen=True)
class End:
    pass


Action = Write | Rotate | End


class Trigger:
    """Base class. Subclasses override `trigger`; `NAME` overrides the class name."""

    NAME: str | None = None

    def __init__(self, **args: Any):
        self.args = args
        self.context = TriggerContext()

    def setup(self, context: TriggerContext) -> None:
        """Called once before the first buffer; raise TriggerError for bad settings."""
        self.context = context

    def trigger(self, v: Mapping[int, np.ndarray]) -> Any:
        return True


def _is_flag(x: Any, cls: type) -> bool:
    return x is cls or isinstance(x, cls)


def normalise(result: Any, n: int, name: str = "trigger") -> list[Action]:
    """The actions a trigger's return value asks for, ranges clipped to [0, n)."""
    if isinstance(result, bool | np.bool_):
        return [Write(0, n)] if result else []
    if (
        isinstance(result, tuple)
        and len(result) == 2
        and all(isinstance(x, int | np.integer) for x in result)
    ):
        result = [result]
    if not isinstance(result, list | tuple):
        raise TriggerError(f"{name} returned {type(result).__name__}; expected bool or a list")
    actions: list[Action] = []
    for item in result:
        if item is None:
            actions.append(Write(0, n))
        elif _is_flag(item, OpenNewReadoutFile):
            actions.append(Rotate())
        elif _is_flag(item, EndReadoutNow):
            actions.append(End())
        elif (
            isinstance(item, tuple | list)
            and len(item) == 2
            and all(isinstance(x, int | np.integer) for x in item)
        ):
            start, end = max(0, int(item[0])), min(n, int(item[1]))
            if start < end:
                actions.append(Write(start, end))
        else:
            raise TriggerError(f"{name} returned a bad action {item!r}")
    return actions


class Always(Trigger):
    """Write every buffer."""

    NAME = "always"

    def trigger(self, v: Mapping[int, np.ndarray]) -> bool:
        return True


class Threshold(Trigger):
    """Write buffers while `channel` is above `level` volts.

    Writing starts in the buffer where the signal rises above `level` and stops
    after the buffer where it falls below `level - hysteresis`.
    """

    NAME = "threshold"

    def __init__(self, channel: int, level: float, hysteresis: float = 0.0):
        super().__init__(channel=channel, level=level, hysteresis=hysteresis)
        if hysteresis < 0:
            raise TriggerError(f"threshold: hysteresis must be >= 0, got {hysteresis}")
        self.channel = int(channel)
        self.level = float(level)
        self.hysteresis = float(hysteresis)
        self.on = False
        self._high = 0.0
        self._low = 0.0

    def setup(self, context: TriggerContext) -> None:
        super().setup(context)
        if self.channel not in context.channels:
            raise TriggerError(f"threshold: unknown channel {self.channel}")
        # Compare in codes so the buffer is never converted to volts.
        vpc = context.volts_per_code.get(self.channel, 1.0) or 1.0
        self._high = self.level / vpc
        self._low = (self.level - self.hysteresis) / vpc

    def trigger(self, v: Mapping[int, np.ndarray]) -> bool:
        x = v[self.channel]
        above = np.flatnonzero(x > self._high)
        below = np.flatnonzero(x < self._low)
        write = self.on or len(above) > 0
        last_above = above[-1] if len(above) else -1
        last_below = below[-1] if len(below) else -1
        if last_above > last_below:
            self.on = True
        elif last_below > last_above:
            self.on = False  # the last crossing was down through the hysteresis band
        return write


class _Counting(Trigger):
    """Base for triggers that end the run after a number of samples."""

    def __init__(self, **args: Any):
        super().__init__(**args)
        self.seen = 0
        self.limit = 0

    def trigger(self, v: Mapping[int, np.ndarray]) -> Any:
        n = _buffer_len(v)
        left = self.limit - self.seen
        self.seen += n
        if left <= 0:
            raise EndReadoutNow
        if n >= left:
            return [(0, left), EndReadoutNow]
        return True


class SampleCount(_Counting):
    """Write `samples` samples, then end the run."""

    NAME = "sample_count"

    def __init__(self, samples: int):
        super().__init__(samples=samples)
        if int(samples) < 1:
            raise TriggerError(f"sample_count: samples must be >= 1, got {samples}")
        self.limit = int(samples)


class TimeLimit(_Counting):
    """Write `seconds` of data (counted in samples at the card's rate), then end the run."""

    NAME = "time_limit"

    def __init__(self, seconds: float):
        super().__init__(seconds=seconds)
        if float(seconds) <= 0:
            raise TriggerError(f"time_limit: seconds must be > 0, got {seconds}")
        self.seconds = float(seconds)
        self._deadline: float | None = None

    def setup(self, context: TriggerContext) -> None:
        super().setup(context)
        if context.sample_rate_hz > 0:
            self.limit = max(1, round(self.seconds * context.sample_rate_hz))

    def trigger(self, v: Mapping[int, np.ndarray]) -> Any:
        if self.limit:
            return super().trigger(v)
        # Rate unknown: fall back to the wall clock, at buffer granularity.
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.seconds
        if now >= self._deadline:
            raise EndReadoutNow
        return True


class RotateFiles(Trigger):
    """Write everything, starting a new file every `bytes` bytes or every `seconds` seconds.

    Files split at exact sample boundaries (in data time), so each holds the same
    number of samples except the last.
    """

    NAME = "rotate"

    def __init__(self, bytes: int = 0, seconds: float = 0.0):
        super().__init__(bytes=bytes, seconds=seconds)
        if (int(bytes) > 0) == (float(seconds) > 0):
            raise TriggerError("rotate: give exactly one of bytes > 0 or seconds > 0")
        self.bytes = int(bytes)
        self.seconds = float(seconds)
        self.per_file = 0
        self.in_file = 0

    def setup(self, context: TriggerContext) -> None:
        super().setup(context)
        ds = max(1, context.downsample)
        if self.bytes:
            out = max(1, context.bytes_per_output_sample)
            self.per_file = max(1, self.bytes // out) * ds
        elif context.sample_rate_hz > 0:
            self.per_file = max(ds, round(self.seconds * context.sample_rate_hz) // ds * ds)
        else:
            raise TriggerError("rotate: seconds needs a known sample rate")

    def trigger(self, v: Mapping[int, np.ndarray]) -> list[Any]:
        n = _buffer_len(v)
        actions: list[Any] = []
        pos = 0
        while pos < n:
            if self.in_file == self.per_file:
                actions.append(OpenNewReadoutFile)
                self.in_file = 0
            take = min(n - pos, self.per_file - self.in_file)
            actions.append((pos, pos + take))
            pos += take
            self.in_file += take
        return actions


def _buffer_len(v: Mapping[int, np.ndarray]) -> int:
    for key in v:
        return len(v[key])
    return 0


def trigger_name(cls: type[Trigger]) -> str:
    return cls.NAME or cls.__name__


BUILTINS: dict[str, type[Trigger]] = {
    trigger_name(cls): cls for cls in (Always, Threshold, TimeLimit, SampleCount, RotateFiles)
}


def check_args(args: Any) -> dict[str, int | float | str | bool]:
    """A client's trigger arguments: a small dict of names to numbers or short strings."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise TriggerError(f"trigger arguments must be a dict, not {type(args).__name__}")
    if len(args) > MAX_ARGS:
        raise TriggerError(f"too many trigger arguments ({len(args)} > {MAX_ARGS})")
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise TriggerError(f"bad trigger argument name {key!r}")
        if not isinstance(value, int | float | str | bool):
            raise TriggerError(
                f"trigger argument {key}: must be a number or a string, not {type(value).__name__}"
            )
        if isinstance(value, str) and len(value) > MAX_ARG_TEXT:
            raise TriggerError(f"trigger argument {key}: longer than {MAX_ARG_TEXT} characters")
    return dict(args)


class TriggerRegistry:
    """Built-in triggers plus those defined in `*.py` files of `trigger_dir`.

    A file is imported once, and again only when it changes (size or modification
    time), so an edited trigger is used by the next run without a restart.
    """

    def __init__(self, trigger_dir: Path | None = None):
        self.trigger_dir = trigger_dir
        self._loaded: tuple[tuple[tuple[str, int, int], ...], dict[str, type[Trigger]], list[str]]
        self._loaded = ((), {}, [])

    def _load_files(self, quiet: bool = False) -> tuple[dict[str, type[Trigger]], list[str]]:
        """`quiet`: a file that fails to import is not logged (`dtacq-ioc check` says it)."""
        if self.trigger_dir is None or not self.trigger_dir.is_dir():
            return {}, []
        paths = sorted(self.trigger_dir.glob("*.py"))
        stamp = tuple((p.name, *_file_stamp(p)) for p in paths)
        if stamp != self._loaded[0]:
            self._loaded = (stamp, *self._import_all(paths, quiet))
        return dict(self._loaded[1]), list(self._loaded[2])

    def _import_all(
        self, paths: list[Path], quiet: bool
    ) -> tuple[dict[str, type[Trigger]], list[str]]:
        found: dict[str, type[Trigger]] = {}
        broken: list[str] = []
        for path in paths:
            try:
                module = _import_file(path)
            except Exception as exc:
                line = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if not quiet:
                    log.error("trigger file %s failed to import: %s", path, line, exc_info=True)
                broken.append(f"{path.name} ({line})")
                continue
            for cls in vars(module).values():
                if (
                    isinstance(cls, type)
                    and issubclass(cls, Trigger)
                    and cls.__module__ == module.__name__
                ):
                    name = trigger_name(cls)
                    if name in BUILTINS:
                        log.warning("%s: trigger %r hides nothing: built-in names win", path, name)
                        continue
                    found[name] = cls
        return found, broken

    def import_errors(self) -> list[str]:
        """'file.py (reason)' for each trigger file that does not import; nothing logged."""
        return self._load_files(quiet=True)[1]

    def names(self) -> list[str]:
        files, _ = self._load_files()
        return sorted(BUILTINS) + sorted(files)

    def lookup(self, name: str) -> type[Trigger]:
        if name in BUILTINS:
            return BUILTINS[name]
        files, broken = self._load_files()
        if broken:
            raise TriggerError(f"trigger file failed to import: {'; '.join(broken)}")
        if name not in files:
            available = ", ".join(sorted(BUILTINS) + sorted(files))
            raise TriggerError(f"unknown trigger {name!r}; available: {available}")
        return files[name]

    def create(self, name: str, args: dict[str, Any] | None = None) -> Trigger:
        cls = self.lookup(name)
        kwargs = check_args(args)
        try:
            return cls(**kwargs)
        except TriggerError:
            raise
        except TypeError as exc:
            raise TriggerError(f"trigger {name!r}: bad arguments: {exc}") from None
        except (ValueError, ArithmeticError) as exc:
            raise TriggerError(f"trigger {name!r}: {exc}") from None


def _file_stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _import_file(path: Path) -> ModuleType:
    name = f"dtacq_triggers_{path.stem}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Old trigger sources used these names without importing them.
    for name, value in (
        ("Trigger", Trigger),
        ("OpenNewReadoutFile", OpenNewReadoutFile),
        ("EndReadoutNow", EndReadoutNow),
        ("np", np),
    ):
        setattr(module, name, value)
    # Registered only while it runs: dataclasses and typing look the module up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module
