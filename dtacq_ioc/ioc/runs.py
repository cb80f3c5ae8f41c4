"""Run control: the run settings as typed values, checked when they are put, and start/stop.

Each RUN:* setting is parsed and checked once, at its put (or when autosave restores
it), into a `RunRequest`; starting a run builds `RunSettings` from it, never from PV
values. Parsing is linear in the text and bounded by the card's channel count.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from dtacq_ioc.contract import ACTION, NO_YES
from dtacq_ioc.ioc.cardgroup import Update, buffer_word
from dtacq_ioc.ioc.context import CardContext
from dtacq_ioc.ioc.pvs import Handler, PutRefused, text_value
from dtacq_ioc.readout.run import RunSettings, SettingsError
from dtacq_ioc.readout.triggers import TriggerError, TriggerRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What the next run will be, as the RUN:* PVs set it."""

    name: str = ""
    log: str = ""
    save_files: bool = True
    upload: bool = True
    downsample: int = 1
    trigger: str = "always"
    trigger_args: dict[str, Any] = field(default_factory=dict)
    channels: tuple[int, ...] = ()
    channels_text: str = ""
    logitems: dict[str, Any] = field(default_factory=dict)


def parse_channels(text: str, nchan: int) -> tuple[int, ...]:
    """RUN:CHANNELS: "" or "all" for every channel, else "0,1,4-7" (0-based, as channel_list).

    Every number is checked against the card's `nchan` before a range is expanded, so
    the work is bounded by the text and the card, whatever a client sends.
    """
    text = text.strip()
    if text.lower() in ("", "all"):
        return ()
    out: list[int] = []
    seen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise PutRefused(f"RUN:CHANNELS: {part[:20]!r} is not a channel number or range a-b")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last >= nchan or first > last:
            raise PutRefused(
                f"RUN:CHANNELS: {part[:20]!r} is not within the channels 0..{nchan - 1}"
            )
        for channel in range(first, last + 1):
            if channel in seen:
                raise PutRefused(f"RUN:CHANNELS: channel {channel} is listed twice")
            seen.add(channel)
            out.append(channel)
    return tuple(out)


def parse_json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except (ValueError, RecursionError):
        raise PutRefused(f"{name}: {text[:40]!r} is not a JSON object") from None
    if not isinstance(value, dict):
        raise PutRefused(f"{name}: {text[:40]!r} is not a JSON object ({{...}})")
    return value


class RunControl:
    """Handlers of the RUN:* PVs; starts and stops the readout's runs."""

    def __init__(
        self,
        ctx: CardContext,
        triggers: TriggerRegistry,
        buffer_bytes: Callable[[], int],
        sites: Callable[[], tuple[int, ...]],
    ):
        self.ctx = ctx
        self.triggers = triggers
        self.buffer_bytes = buffer_bytes
        self.sites = sites  # SITES: what a run reads, and what RUN:CHANNELS counts
        self.request = RunRequest()
        self._parsers: dict[str, Callable[[Any], dict[str, Any]]] = {
            "RUN:NAME": lambda v: {"name": text_value(v)},
            "RUN:LOG": lambda v: {"log": text_value(v)},
            "RUN:SAVE": lambda v: {"save_files": v == NO_YES[1]},
            "RUN:UPLOAD": lambda v: {"upload": v == NO_YES[1]},
            "RUN:DOWNSAMPLE": lambda v: {"downsample": int(v)},
            "RUN:TRIGGER": self._trigger,
            "RUN:TRIGGER_ARGS": lambda v: {
                "trigger_args": parse_json_object("RUN:TRIGGER_ARGS", text_value(v))
            },
            "RUN:CHANNELS": lambda v: {
                "channels": parse_channels(text_value(v), self.nchan()),
                "channels_text": text_value(v),
            },
            "RUN:LOGITEMS": lambda v: {
                "logitems": parse_json_object("RUN:LOGITEMS", text_value(v))
            },
        }

    def nchan(self) -> int:
        """AI channels of the sites read out: RUN:CHANNELS numbers them from 0."""
        return sum(s.spec.nchan for s in self.ctx.layouts(self.sites()))

    def handler(self, suffix: str) -> Handler:
        """The put handler of one RUN:* setting PV."""
        if suffix not in self._parsers:
            raise KeyError(suffix)
        return partial(self.put, suffix)

    async def put(self, suffix: str, value: Any) -> Any:
        try:
            self.request = self._checked(suffix, value)
        except PutRefused as exc:
            raise self.ctx.refuse(str(exc)) from None
        return text_value(value) if isinstance(value, bytes | bytearray) else value

    def adopt(self, suffix: str, value: Any) -> bool:
        """A restored setting; False when it is not a run setting. PutRefused when bad."""
        if suffix not in self._parsers:
            return False
        self.request = self._checked(suffix, value)
        return True

    def _checked(self, suffix: str, value: Any) -> RunRequest:
        request = replace(self.request, **self._parsers[suffix](value))
        try:
            self.settings(request).check()  # the readout's own checks, once, at the put
        except SettingsError as exc:
            raise PutRefused(f"{suffix}: {exc}") from None
        return request

    def _trigger(self, value: Any) -> dict[str, Any]:
        name = str(value).strip() or "always"
        try:
            self.triggers.lookup(name)
        except TriggerError as exc:
            raise PutRefused(f"RUN:TRIGGER: {exc}") from None
        return {"trigger": name}

    def settings(self, request: RunRequest | None = None) -> RunSettings:
        r = request or self.request
        return RunSettings(
            sites=self.sites(),
            buffer_bytes=self.buffer_bytes(),
            channel_list=r.channels,
            downsample=r.downsample,
            measurement_name=r.name or f"Digitizer {self.ctx.config.host}",
            log=r.log,
            logitems=r.logitems,
            trigger=r.trigger,
            trigger_args=r.trigger_args,
            save_files=r.save_files,
            upload=r.upload,
        )

    async def start(self, value: Any) -> str:
        if value != ACTION[1]:
            return ACTION[0]
        if not self.ctx.connected:
            raise self.ctx.refuse("cannot start a run: card not connected")
        settings = self.settings()

        def start() -> None:
            self.ctx.card.check_sample_rate()
            self.ctx.readout.start_run(settings)

        try:
            await self.ctx.run_on_card("run not started", start)
        except (SettingsError, TriggerError) as exc:
            raise self.ctx.refuse(f"run not started: {exc}") from None
        # No buffer of an earlier run may be taken for one of this run.
        empty = np.zeros(0, dtype=np.int16 if buffer_word(self.ctx.sites) == 2 else np.int32)
        await self.ctx.publish(Update(values={"RUN:BUFFER": empty}))
        return ACTION[0]

    async def stop(self, value: Any) -> str:
        if value == ACTION[1] and self.ctx.readout.run is not None:
            await asyncio.to_thread(self.ctx.readout.stop_run)
        return ACTION[0]
