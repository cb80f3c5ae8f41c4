"""One card in the IOC: its parts wired together.

- `link.CardLink`: connect, identify, stream, reconnect with backoff; RESET, REBOOT.
- `settings.CardSettings`: clock, buffer and gain puts applied to the card and read back.
- `runs.RunControl`: the RUN:* settings as typed values; start and stop runs.
- `shots.ShotControl`: transient capture: MODE, arm, abort, shots archived as runs.
- `publisher.Publisher`: every readback, frame and run figure to its PV.

A CA put of CLKDIV, for instance, goes: the CLKDIV PV (cardgroup) -> its handler
`CardSettings.put_clkdiv` -> `Card.set_clkdiv` (card/card.py) -> the `clkdiv` knob.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.card.card import Card
from dtacq_ioc.config import ArchiveConfig, CardConfig, IocConfig
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.autosave import Autosave
from dtacq_ioc.ioc.cardgroup import CardPVs, Handlers, Update, site_layouts
from dtacq_ioc.ioc.context import CardContext, ReadoutLike
from dtacq_ioc.ioc.link import CardLink
from dtacq_ioc.ioc.publisher import Publisher
from dtacq_ioc.ioc.runs import RunControl
from dtacq_ioc.ioc.settings import CardSettings
from dtacq_ioc.ioc.shots import ShotControl
from dtacq_ioc.readout.pipeline import Readout
from dtacq_ioc.readout.process import ReadoutProcess
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)


class CardController:
    def __init__(
        self,
        config: CardConfig,
        ioc: IocConfig,
        archive: ArchiveConfig,
        catalog: Catalog,
        autosave: Autosave,
        triggers: TriggerRegistry,
        access: pvs.AccessRules | None = None,
    ):
        self.config = config
        self.name = config.name
        self.autosave = autosave
        card = Card(config, ioc.min_sample_rate_hz)
        callbacks: dict[str, Any] = {
            "on_state": lambda stats: self._link().on_stream_state(stats),
            "on_alarm": lambda message: self._link().on_alarm(message),
        }
        readout: ReadoutLike
        if ioc.readout == "process":
            clock = lambda: card.ext_clock_hz  # noqa: E731
            readout = ReadoutProcess(config, ioc, archive, catalog, ext_clock_hz=clock, **callbacks)
        else:
            readout = Readout(card, ioc, archive, catalog, triggers=triggers, **callbacks)
        self.ctx = ctx = CardContext(
            config, ioc, card, readout, site_layouts(config), publish=self._publish
        )
        self.card, self.readout = card, readout
        self.settings = CardSettings(ctx, autosave, buffer_bytes=0)
        wanted = self.settings.wanted
        self.runs = RunControl(
            ctx, triggers, buffer_bytes=lambda: wanted.buffer_bytes, sites=lambda: wanted.sites
        )
        self.shots = ShotControl(ctx, self.settings, self.runs, catalog, Path(archive.data_dir))
        self.link = CardLink(ctx, self.settings, self.shots.wants_stream)
        handlers = Handlers(
            self.settings, self.runs, self.link, self.shots, self.shots.shot_settings
        )
        self.pvs = CardPVs(config, ioc, handlers, access)
        self.pvs.group.refusal_sink = ctx.refused
        self.pvs.group.autosave_sink = self._save
        self.settings.wanted.buffer_bytes = int(self.pvs.value("BUFFER_SIZE"))
        self.publisher = Publisher(
            ctx, self.pvs, self.link, catalog, triggers, Path(archive.data_dir)
        )

    def _link(self) -> CardLink:
        return self.link  # made after the readout, which calls back through it

    @property
    def last_error(self) -> str:
        return self.ctx.last_error

    @last_error.setter
    def last_error(self, text: str) -> None:
        self.ctx.last_error = text

    @property
    def last_error_at(self) -> float:
        return self.ctx.last_error_at

    @property
    def state(self) -> str:
        return self.link.state

    async def _publish(self, update: Update) -> None:
        await self.pvs.publish(update)

    def _save(self, pv: Any, value: Any) -> None:
        if hasattr(value, "item"):
            value = value.item()  # numpy scalars from caproto: keep autosave plain JSON
        self.autosave.set(self.name, self.pvs.suffix(pv), value)

    async def restore(self) -> None:
        """Put the autosaved settings into their PVs and parts; skip what no longer fits."""
        saved = self.autosave.card(self.name)
        settings = {self.pvs.suffix(pv): pv for pv in self.pvs.saved()}
        for suffix in sorted(saved.keys() - settings.keys()):
            log.warning("autosave: %s: %s is not a setting of this card; skipped", self.name,
                        suffix)  # fmt: skip
        for suffix, pv in settings.items():
            if suffix not in saved:
                continue
            try:
                value = pvs.check_restored(pv, saved[suffix])
                parts = (self.settings, self.runs, self.shots.shot_settings)
                if not any(part.adopt(suffix, value) for part in parts):
                    continue
            except pvs.PutRefused as exc:
                log.warning("autosave: %s: %s; skipped", self.name, exc)
                continue
            await pv.write(value, verify_value=False)
        await self.publisher.publish_triggers()

    async def run(self) -> None:
        self.readout.prepare()  # a readout process starts while the card connects
        await self.link.run()

    async def publish_loop(self) -> None:
        await self.publisher.run()

    async def stop(self) -> None:
        await self.shots.stop()
        await self.link.stop()
