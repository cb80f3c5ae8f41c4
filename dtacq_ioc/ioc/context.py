"""What the parts of one card's controller share: the card, its readout, its PVs, one lock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dtacq_ioc.card.errors import CardError
from dtacq_ioc.card.transient import OnLink, OnStatus, Transient
from dtacq_ioc.config import CardConfig, IocConfig
from dtacq_ioc.ioc.cardgroup import SiteLayout, Update, site_layouts
from dtacq_ioc.ioc.pvs import PutRefused
from dtacq_ioc.readout.run import RunSettings, StreamInfo
from dtacq_ioc.readout.transform import ChannelMap

log = logging.getLogger(__name__)


class CardLike(Protocol):
    """What the controller's parts use of `card.Card`; a test can give a fake."""

    name: str
    info: Any

    @property
    def fixed_clkdiv(self) -> bool: ...

    def connect(self) -> Any: ...
    def close(self) -> None: ...
    def knob(self, site: int) -> Any: ...
    def set_clkdiv(self, clkdiv: int) -> int: ...
    def clkdiv(self) -> int: ...
    def set_external_clock(self, freq_hz: float | None) -> None: ...
    def external_clock(self) -> float | None: ...
    def sysclk_hz(self) -> float: ...
    def sample_rate_hz(self) -> float: ...
    def check_sample_rate(self) -> float: ...
    def set_gain(self, site: int, channel: int, code: int) -> None: ...
    def set_all_gains(self, site: int, code: int) -> None: ...
    def gains(self, site: int) -> list[int]: ...
    def reset_readout(self) -> None: ...
    def reboot(self) -> None: ...
    def transient(
        self, on_status: OnStatus | None = None, on_link: OnLink | None = None
    ) -> Transient: ...


class ReadoutLike(Protocol):
    """What the controller's parts use of `readout.pipeline.Readout`."""

    run: Any
    display: Any
    channel_map: ChannelMap | None
    sample_rate_hz: float
    buffer_tap: Callable[[Any], None] | None

    def prepare(self) -> None: ...
    def start(self, sites: tuple[int, ...], buffer_samples: int) -> None: ...
    def stop(self, timeout: float = ..., reason: str = ...) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> Any: ...
    def start_run(self, settings: RunSettings) -> Any: ...
    def stop_run(self, timeout: float | None = ...) -> Any: ...
    def refresh_calibration(self) -> None: ...
    def stream_info(self) -> StreamInfo: ...


@dataclass
class CardContext:
    """One card's shared state. `busy` serialises card operations (settings, runs, actions)."""

    config: CardConfig
    ioc: IocConfig
    card: CardLike
    readout: ReadoutLike
    sites: list[SiteLayout]
    publish: Callable[[Update], Awaitable[None]]
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    _last_error: tuple[float, str] = (0.0, "")  # when (monotonic), what
    readbacks: dict[str, Any] = field(default_factory=dict)  # what the card said, by suffix
    _layouts: dict[tuple[int, ...], list[SiteLayout]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def last_error(self) -> str:
        return self._last_error[1]

    @last_error.setter
    def last_error(self, text: str) -> None:
        self._last_error = (time.monotonic(), text)

    @property
    def last_error_at(self) -> float:
        """When `last_error` was set (monotonic): the IOC's LAST_ERROR shows the newest."""
        return self._last_error[0]

    @property
    def connected(self) -> bool:
        return self.card.info is not None

    def run_active(self) -> bool:
        run = self.readout.run
        return run is not None and not run.done

    def error(self, message: str) -> None:
        """An error of the card's own: logged, and shown in LAST_ERROR."""
        self.last_error = message
        log.error("%s", message)

    async def refused(self, message: str) -> None:
        """A refused put: in LAST_ERROR before the client hears; the CA server logs it."""
        self.last_error = message
        await self.publish(Update(values={"LAST_ERROR": message}))

    def refuse(self, message: str) -> PutRefused:
        return PutRefused(f"{self.name}: {message}")

    def layouts(self, sites: tuple[int, ...]) -> list[SiteLayout]:
        """The layouts of a stream aggregating `sites`: where each site's columns are in it."""
        got = self._layouts.get(sites)
        if got is None:
            got = self._layouts[sites] = site_layouts(self.config, sites)
        return got

    def stream_layouts(self, channel_map: ChannelMap | None) -> list[SiteLayout]:
        """The layouts of the stream `channel_map` describes (the config's sites if none)."""
        if channel_map is None:
            return self.sites
        return self.layouts(tuple(s.site for s in channel_map.sites))

    def site(self, site: int) -> SiteLayout:
        for layout in self.sites:
            if layout.site == site:
                return layout
        raise self.refuse(f"no site {site}")

    async def run_on_card(self, what: str, operation: Callable[[], Any]) -> Any:
        """A card operation on a thread, under the lock; card errors refuse the put."""
        async with self.busy:
            try:
                return await asyncio.to_thread(operation)
            except (CardError, OSError) as exc:
                text = str(exc).removeprefix(f"{self.name}: ")  # the card's name comes first
                raise self.refuse(f"{what}: {text}") from None
