"""Transient capture from the IOC: the card's MODE, a shot's settings, arm/abort/trigger,
the card's transient state, the last shot's waveforms, and every shot archived as a run.

In TRANSIENT mode the card's stream is off (arming ends it on the card); each shot is
read from the card's memory once it is done (`card/transient.py`) and archived whole
(`readout/shot.py`). With auto re-arm the card is armed again after every shot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.card.errors import CardError
from dtacq_ioc.card.transient import (
    ShotData,
    ShotError,
    ShotIncomplete,
    ShotState,
    Transient,
    TransientSettings,
    TransientStatus,
    TriggerSource,
)
from dtacq_ioc.contract import ACTION, NO_YES
from dtacq_ioc.ioc.cardgroup import SHOT_MODES, Update
from dtacq_ioc.ioc.context import CardContext
from dtacq_ioc.ioc.pvs import text_value
from dtacq_ioc.ioc.runs import RunControl
from dtacq_ioc.ioc.settings import CardSettings
from dtacq_ioc.readout.shot import ShotInfo, archive_shot

log = logging.getLogger(__name__)

ARM_TIMEOUT_S = 10.0
SHOT_WAIT_S = 24 * 3600.0  # an armed card waits for its trigger as long as it takes


@dataclass(frozen=True)
class ShotRequest:
    """The next shot, as the MODE:TRANSIENT:* PVs set it."""

    pre: int = 0
    post: int = 100_000
    osam: int = 1
    demux: bool = True
    trigger: TriggerSource = field(default_factory=TriggerSource)
    auto_rearm: bool = False
    self_trigger: bool = False  # SOFT_TRIGGER: the IOC fires the soft trigger once armed

    def settings(self) -> TransientSettings:
        return TransientSettings(self.pre, self.post, self.trigger, self.demux, self.osam)


class ShotSettings:
    """Handlers of the MODE:TRANSIENT:* setting PVs: the next shot as a typed request."""

    def __init__(self, ctx: CardContext, armed: Callable[[], bool]):
        self.ctx = ctx
        self.armed = armed  # settings wait while a shot is armed
        self.request = ShotRequest()

    def check_idle(self, what: str) -> None:
        if self.armed():
            raise self.ctx.refuse(f"{what}: abort the armed shot first")

    async def put_pre(self, value: Any) -> int:
        self.check_idle("MODE:TRANSIENT:PRE")
        self.request = replace(self.request, pre=int(value))
        return int(value)

    async def put_post(self, value: Any) -> int:
        self.check_idle("MODE:TRANSIENT:POST")
        self.request = replace(self.request, post=int(value))
        return int(value)

    async def put_osam(self, value: Any) -> int:
        self.check_idle("MODE:TRANSIENT:OSAM")
        self.request = replace(self.request, osam=int(value))
        return int(value)

    async def put_demux(self, value: Any) -> str:
        self.check_idle("MODE:TRANSIENT:DEMUX")
        self.request = replace(self.request, demux=value == NO_YES[1])
        return str(value)

    async def put_trigger(self, value: Any) -> str:
        self.check_idle("MODE:TRANSIENT:TRIGGER")
        text = text_value(value).strip() or "soft"
        try:
            source = TriggerSource.parse(text)
        except ValueError as exc:
            raise self.ctx.refuse(f"MODE:TRANSIENT:TRIGGER: {exc}") from None
        self.request = replace(self.request, trigger=source)
        return str(source)

    async def put_soft_trigger(self, value: Any) -> str:
        self.check_idle("MODE:TRANSIENT:SOFT_TRIGGER")
        self.request = replace(self.request, self_trigger=value == NO_YES[1])
        return str(value)

    async def put_auto_rearm(self, value: Any) -> str:
        self.request = replace(self.request, auto_rearm=value == NO_YES[1])
        return str(value)

    def adopt(self, suffix: str, value: Any) -> bool:
        """A restored shot setting; False when the PV is not one."""
        fields: dict[str, tuple[str, Callable[[Any], Any]]] = {
            "MODE:TRANSIENT:PRE": ("pre", int),
            "MODE:TRANSIENT:POST": ("post", int),
            "MODE:TRANSIENT:OSAM": ("osam", int),
            "MODE:TRANSIENT:DEMUX": ("demux", lambda v: v == NO_YES[1]),
            "MODE:TRANSIENT:AUTO_REARM": ("auto_rearm", lambda v: v == NO_YES[1]),
            "MODE:TRANSIENT:SOFT_TRIGGER": ("self_trigger", lambda v: v == NO_YES[1]),
            "MODE:TRANSIENT:TRIGGER": ("trigger", TriggerSource.parse),
        }
        if suffix not in fields:
            return False
        name, parse = fields[suffix]
        try:
            self.request = replace(self.request, **{name: parse(value)})
        except ValueError as exc:
            raise self.ctx.refuse(f"{suffix}: {exc}") from None
        return True


class ShotControl:
    """Handlers of the transient PVs; runs the shot loop of one card."""

    def __init__(
        self,
        ctx: CardContext,
        settings: CardSettings,
        runs: RunControl,
        catalog: Catalog,
        data_dir: Path,
    ):
        self.ctx = ctx
        self.card_settings = settings
        self.runs = runs
        self.catalog = catalog
        self.data_dir = data_dir
        self.mode = SHOT_MODES[0]
        self.shot_settings = ShotSettings(ctx, lambda: self.armed)
        self.shots_taken = 0
        self._task: asyncio.Task[None] | None = None
        self._aborting = False
        # One thread of its own: an armed card may wait for hours without holding a worker
        # of the loop's shared pool.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"shot-{ctx.name}")
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def transient(self) -> bool:
        return self.mode == SHOT_MODES[1]

    @property
    def armed(self) -> bool:
        return self._task is not None and not self._task.done()

    def _driver(self) -> Transient:
        return self.ctx.card.transient(on_status=self._on_status)

    # -- mode ---------------------------------------------------------------------------

    async def put_mode(self, value: Any) -> str:
        mode = str(value)
        if mode == self.mode:
            return mode
        if self.ctx.run_active():
            raise self.ctx.refuse("MODE: stop the run before changing the mode")
        self.shot_settings.check_idle("MODE")
        if not self.ctx.connected:
            raise self.ctx.refuse("MODE: card not connected")
        if mode == SHOT_MODES[1]:
            await self.ctx.run_on_card("MODE", self._enter_transient)
        else:
            await self.ctx.run_on_card("MODE", self.card_settings.start_stream)
        self.mode = mode
        await self._publish_status(self._driver().status)
        return mode

    def _enter_transient(self) -> None:
        self.ctx.readout.stop()  # the card ends its stream when armed; end ours first
        self._driver().start_monitor(ARM_TIMEOUT_S)

    def wants_stream(self) -> bool:
        """After a reconnect: stream only in CONTINUOUS mode."""
        return not self.transient

    # -- the shot loop ------------------------------------------------------------------

    async def arm(self, value: Any) -> str:
        if value == ACTION[1]:
            await self.arm_shot("MODE:TRANSIENT:SET_ARM")
        return ACTION[0]

    def check_can_arm(self, what: str) -> None:
        if not self.transient:
            raise self.ctx.refuse(f"{what}: set MODE to TRANSIENT first")
        if not self.ctx.connected:
            raise self.ctx.refuse(f"{what}: card not connected")
        self.shot_settings.check_idle(what)

    async def arm_shot(self, what: str, after_shot: int | None = None) -> None:
        """Arm (the shot loop follows it); `after_shot`: the card's counter is set first, so
        this shot is number after_shot + 1 (cards armed together count alike)."""
        self.check_can_arm(what)
        self._loop = asyncio.get_running_loop()
        await self._arm_once(after_shot)  # a refusal to arm is the put's refusal
        self._task = asyncio.create_task(self._shots(), name=f"shots-{self.ctx.name}")

    @property
    def holds_trigger(self) -> bool:
        """Fires its own shot (soft trigger): armed last when cards are armed together."""
        return self.shot_settings.request.trigger.soft

    async def shot_counter(self) -> int:
        """The card's shot counter (its last shot's number)."""
        driver = self._driver()

        def read() -> int:
            return int(driver.card.knob(0).query("shot").strip() or 0)

        return int(await self.ctx.run_on_card("shot", read))

    async def _arm_once(self, after_shot: int | None = None) -> None:
        settings, driver = self.shot_settings.request.settings(), self._driver()
        self._aborting = False

        self_trigger = self.shot_settings.request.self_trigger and settings.trigger.soft

        def arm() -> None:
            driver.configure(settings)
            if after_shot is not None:
                driver.set_shot(after_shot)
            driver.arm(ARM_TIMEOUT_S)
            if self_trigger:
                driver.trigger_when_listening(settings.pre, ARM_TIMEOUT_S)

        async with self.ctx.busy:
            try:
                await self._on_thread(arm)
            except CardError as exc:
                raise self.ctx.refuse(f"MODE:TRANSIENT:SET_ARM: {exc}") from None

    async def _shots(self) -> None:
        """Wait for the armed shot, archive it, and re-arm while auto re-arm is on."""
        while True:
            started = time.time()
            data, fault = await self._take_shot()
            await self._archive(data, fault, started)
            if not (self.shot_settings.request.auto_rearm and self.transient and not fault):
                return
            try:
                await self._arm_once()
            except Exception as exc:  # the card went away: the link part reconnects
                self.ctx.error(f"{self.ctx.name}: auto re-arm failed: {exc}")
                return

    async def _take_shot(self) -> tuple[ShotData | None, str]:
        driver = self._driver()
        try:
            await self._on_thread(lambda: driver.wait_done(SHOT_WAIT_S))
            if self._aborting:
                return None, "aborted (MODE:TRANSIENT:SET_ABORT)"
            return await self._on_thread(lambda: driver.read_shot(out=None)), ""
        except ShotIncomplete as exc:
            return exc.shot, str(exc)
        except (ShotError, CardError, OSError) as exc:
            return None, str(exc)

    async def _archive(self, data: ShotData | None, fault: str, started: float) -> None:
        settings = replace(self.runs.settings(), downsample=1)
        stream = self.ctx.readout.stream_info()
        trigger = str(self.shot_settings.request.trigger)
        channels: np.ndarray | None = None
        received: np.ndarray | None = None
        if data is not None:
            info = ShotInfo.from_shot(data, trigger, started)
            channels, received = data.channels, data.received
        else:
            req = self.shot_settings.request
            info = ShotInfo(shot=self.shots_taken + 1, pre=req.pre, post=req.post,
                            trigger=trigger, started=started)  # fmt: skip
        try:
            record = await self._on_thread(
                lambda: archive_shot(
                    channels,
                    received,
                    info,
                    settings,
                    stream,
                    self.data_dir,
                    self.catalog,
                    fault=fault,
                )
            )
        except Exception as exc:
            self.ctx.error(f"{self.ctx.name}: shot {info.shot} not archived: {exc}")
            return
        self.shots_taken += 1
        if fault:
            self.ctx.error(f"{self.ctx.name}: shot {info.shot}: {fault}")
        values: dict[str, Any] = {"SHOT": info.shot, "RUN:ID_RBV": record.run_id}
        if data is not None:
            values.update(shot_waveforms(self.ctx, data))
        await self.ctx.publish(Update(values=values))

    async def abort(self, value: Any) -> str:
        if value != ACTION[1]:
            return ACTION[0]
        if not self.transient or not self.ctx.connected:
            return ACTION[0]
        self._aborting = True
        await self.ctx.run_on_card("MODE:TRANSIENT:SET_ABORT", self._driver().abort)
        return ACTION[0]

    async def soft_trigger(self, value: Any) -> str:
        if value != ACTION[1]:
            return ACTION[0]
        if not self.armed:
            raise self.ctx.refuse("SIG:SOFT_TRIGGER: no shot is armed")
        await self.ctx.run_on_card("SIG:SOFT_TRIGGER", self._driver().soft_trigger)
        return ACTION[0]

    async def _on_thread(self, call: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    # -- the card's state, from the status monitor's thread ------------------------------

    def _on_status(self, status: TransientStatus) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._publish_status(status), self._loop)

    async def _publish_status(self, status: TransientStatus | None) -> None:
        self._loop = asyncio.get_running_loop()
        if status is None:
            return
        await self.ctx.publish(
            Update(
                values={
                    "MODE:TRANS_ACT:STATE": ShotState(status.state).name,
                    "MODE:TRANS_ACT:PRE": status.pre,
                    "MODE:TRANS_ACT:POST": status.post,
                    "MODE:TRANS_ACT:TOTSAM": status.elapsed,  # samples taken so far
                }
            )
        )

    async def stop(self) -> None:
        """Abort an armed shot (its run is recorded as aborted) and end the shot loop."""
        if self.armed and self.ctx.connected:
            self._aborting = True
            with contextlib.suppress(CardError, OSError):  # a card that is gone has no shot
                await self._on_thread(self._driver().abort)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), ARM_TIMEOUT_S)
            except TimeoutError:
                self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


def shot_waveforms(ctx: CardContext, data: ShotData) -> dict[str, Any]:
    """The last shot's waveforms, decimated to the display length, trigger at t = 0."""
    points = ctx.ioc.display_samples
    step = max(1, math.ceil(data.samples / points))
    cmap = ctx.readout.channel_map
    rate = ctx.readout.sample_rate_hz or 1.0
    picked = data.channels[:, ::step][:, :points]
    codes = cmap.shift(picked.T).T if cmap is not None else picked
    out: dict[str, Any] = {}
    tb = (np.arange(codes.shape[1]) * step - data.pre) / rate
    for layout in ctx.stream_layouts(cmap):  # the sites the card took the shot of
        pre = f"{layout.site}:AI:TW:"
        out[pre + "TB"] = tb
        for i, col in enumerate(layout.channels):
            raw = np.ascontiguousarray(codes[col])
            out[f"{pre}{i + 1:02d}"] = raw.astype(np.int32)
            vpc = cmap.volts_per_code[col] if cmap is not None else 1.0
            out[f"{pre}{i + 1:02d}:V"] = raw * float(vpc)
    return out
