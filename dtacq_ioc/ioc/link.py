"""A card's link: connect and identify, stream, watch, reconnect with backoff; reset, reboot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from dtacq_ioc.card.errors import CardError
from dtacq_ioc.contract import ACTION
from dtacq_ioc.ioc.context import CardContext
from dtacq_ioc.ioc.settings import CardSettings
from dtacq_ioc.readout.pipeline import ReadoutStats
from dtacq_ioc.readout.run import SettingsError

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
LINK_CHECK_S = 2.0  # how often an idle link is probed with a knob query


class ConfigMismatch(CardError):
    """The card is not what the config says (another module in a site)."""


class CardLink:
    """Keeps one card connected and streaming; `state` is the card's STATE."""

    def __init__(self, ctx: CardContext, settings: CardSettings, wants_stream: Callable[[], bool]):
        self.ctx = ctx
        self.settings = settings
        self.wants_stream = wants_stream  # False in transient mode: the card holds its shots
        self.state = "DISCONNECTED"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Until stop(): connect, stream, watch; on a failure disconnect and try again."""
        self._loop = asyncio.get_running_loop()
        backoff = BACKOFF_START_S
        ctx = self.ctx
        while not self._stopping.is_set():
            self.state = "CONNECTING"
            self._lost.clear()  # before the stream opens: its end must not be missed
            try:
                async with ctx.busy:
                    await asyncio.to_thread(self._connect_and_stream)
                self.state = "IDLE"
                backoff = BACKOFF_START_S
                await self._watch()
            except ConfigMismatch as exc:
                self.state = "FAULT"  # a human must fix the card or the config
                ctx.error(str(exc))
            except (CardError, OSError, SettingsError) as exc:
                if not self._stopping.is_set():
                    text = str(exc)
                    ctx.error(text if ctx.name in text else f"{ctx.name}: {text}")
            finally:
                if not self._stopping.is_set():
                    await asyncio.to_thread(self._disconnect, ctx.last_error)
                    if self.state != "FAULT":
                        self.state = "DISCONNECTED"
            if self._stopping.is_set():
                break
            log.info("%s: reconnecting in %.0f s", ctx.name, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _watch(self) -> None:
        """Return when the stream ends or the knob service stops answering."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), LINK_CHECK_S)
            if self._lost.is_set():
                raise CardError(self.ctx.name, self.ctx.readout.stats().reason or "stream ended")
            if not self.ctx.busy.locked():
                await asyncio.to_thread(self.ctx.card.knob(0).query, "state")

    def _connect_and_stream(self) -> None:
        ctx = self.ctx
        info = ctx.card.connect()
        for site, module in ctx.config.modules.items():
            got = info.sites.get(site)
            if got is None or got.spec.name != module:
                found = got.spec.name if got else "nothing"
                raise ConfigMismatch(
                    ctx.name,
                    f"{ctx.name}: site {site} has {found}, the config says {module} "
                    f"(cards.modules)",
                )
        self.settings.apply_wanted()
        if self.wants_stream():
            self.settings.start_stream()
        self.settings.read_back()

    def _disconnect(self, reason: str) -> None:
        """Close stream and card; a run still open ends as a fault naming the lost link."""
        with contextlib.suppress(Exception):
            self.ctx.readout.stop(timeout=5.0, reason=reason or f"{self.ctx.name}: link lost")
        self.ctx.card.close()
        self.ctx.card.info = None

    async def stop(self) -> None:
        """Close the run (files complete, catalog told) and the card."""
        self._stopping.set()
        self._lost.set()
        async with self.ctx.busy:
            await asyncio.to_thread(self.ctx.readout.close)
            await asyncio.to_thread(self.ctx.card.close)
        self.state = "DISCONNECTED"

    # -- from the readout's threads ---------------------------------------------------------

    def on_stream_state(self, stats: ReadoutStats) -> None:
        if stats.state == "ended" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._lost.set)

    def on_alarm(self, message: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.ctx.error, message)

    # -- actions (RESET, REBOOT) ------------------------------------------------------------

    async def reset(self, value: Any) -> str:
        if value != ACTION[1]:
            return ACTION[0]
        if self.ctx.run_active():
            raise self.ctx.refuse("RESET: stop the run first")
        if not self.ctx.connected:
            raise self.ctx.refuse("RESET: card not connected")

        def reset() -> None:
            self.ctx.readout.stop()
            self.ctx.card.reset_readout()
            self.settings.start_stream()

        await self.ctx.run_on_card("RESET failed", reset)
        return ACTION[0]

    async def reboot(self, value: Any) -> str:
        if value != ACTION[1]:
            return ACTION[0]

        def reboot() -> None:
            if self.ctx.run_active():
                self.ctx.readout.stop_run()
            self.ctx.card.reboot()

        await self.ctx.run_on_card("REBOOT failed", reboot)
        log.warning("%s: rebooted over SSH", self.ctx.name)
        self._lost.set()
        return ACTION[0]
