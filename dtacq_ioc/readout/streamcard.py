"""What the readout needs of a card: `card.Card` is one, a test may bring its own."""

from __future__ import annotations

from typing import Protocol

from dtacq_ioc.card.card import CardInfo, SiteInfo
from dtacq_ioc.card.stream import OnBuffer, OnEnd, StreamClient
from dtacq_ioc.config import CardConfig
from dtacq_ioc.contract import StreamLayout


class StreamCard(Protocol):
    """A connected (or connectable) carrier whose stream the readout opens and calibrates."""

    # Read-only here: the card sets them, the readout only looks.
    @property
    def name(self) -> str: ...

    @property
    def config(self) -> CardConfig: ...

    @property
    def info(self) -> CardInfo | None: ...

    def connect(self) -> CardInfo: ...

    def site_info(self, site: int) -> SiteInfo: ...

    def gains(self, site: int) -> list[int]: ...

    def sample_rate_hz(self) -> float: ...

    def configure_stream(
        self, sites: tuple[int, ...] | list[int] | None = None
    ) -> StreamLayout: ...

    def default_buffer_samples(self, layout: StreamLayout) -> int: ...

    def open_stream(
        self,
        layout: StreamLayout,
        buffer_samples: int | None,
        on_buffer: OnBuffer,
        on_end: OnEnd,
        flush_s: float | None = None,
    ) -> StreamClient: ...
