"""The EPICS face of the process: every card's PVs and the status PVs on one CA server.

`Ioc.start` builds the controllers from the config, restores autosaved settings and
starts the CA server and the cards' tasks; `Ioc.stop` closes runs and cards. The
composition root (`dtacq_ioc/service.py`) runs it beside the simulator and the bridge.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from dtacq_ioc import caproto_adapter
from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.archive.sqlite import SqliteCatalog
from dtacq_ioc.config import Config
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.autosave import Autosave
from dtacq_ioc.ioc.controller import CardController
from dtacq_ioc.ioc.fanout import Fanout
from dtacq_ioc.ioc.shotgroup import ShotGroup
from dtacq_ioc.ioc.status import IocStatus, StatusSink
from dtacq_ioc.readout.triggers import TriggerRegistry

log = logging.getLogger(__name__)


def autosave_path(config: Config) -> Path | None:
    if config.ioc.autosave_dir is None:
        return None
    return config.ioc.autosave_dir / f"{config.ioc.name}.json"


class Ioc:
    """The CA server, the cards' controllers and the status PVs of one config."""

    def __init__(self, config: Config, status_sink: StatusSink | None = None):
        self.config = config
        self.status_sink = status_sink
        self.catalog: SqliteCatalog | None = None
        self.controllers: list[CardController] = []
        self.pvdb: dict[str, Any] = {}
        self.tasks: list[asyncio.Task[Any]] = []
        self.fanout = Fanout()
        self.autosave = Autosave(autosave_path(config))

    async def start(self) -> None:
        """Build everything and start serving; returns once CA clients can connect."""
        config = self.config
        caproto_adapter.check_caproto()
        self.catalog = open_catalog(config.archive)
        recovered = await asyncio.to_thread(self.catalog.recover_interrupted)
        for record in recovered:
            log.warning(
                "run %s was interrupted (the IOC stopped mid-run); marked so", record.run_id
            )
        self.autosave.load()
        triggers = TriggerRegistry(config.ioc.trigger_dir)
        access = pvs.AccessRules(config.ioc.access.write_hosts, config.ioc.access.write_users)
        self.controllers = [
            CardController(card, config.ioc, config.archive, self.catalog, self.autosave,
                           triggers, access)
            for card in config.cards
        ]  # fmt: skip
        group = ShotGroup([c.shots for c in self.controllers])
        status = IocStatus(
            config, self.controllers, self.catalog, self.status_sink, self.fanout, group.arm
        )
        self.pvdb = dict(status.pvdb)
        for c in self.controllers:
            c.pvs.group.fanout = self.fanout
            self.pvdb.update(c.pvs.pvdb)
            if self.autosave.load_error:
                c.last_error = self.autosave.load_error
            await c.restore()
        log.info("serving %d PVs for %d cards", len(self.pvdb), len(self.controllers))
        serving = asyncio.Event()

        async def on_serving(_async_lib: Any) -> None:
            serving.set()  # caproto's sockets are bound: clients can connect from now on

        loop = asyncio.get_running_loop()
        server = caproto_adapter.serve(self.pvdb, list(config.ioc.interfaces), on_serving)
        self.tasks = [
            loop.create_task(server, name="ca-server"),
            loop.create_task(status.run(), name="status"),
        ]
        for c in self.controllers:
            self.tasks.append(loop.create_task(c.run(), name=f"card-{c.name}"))
            self.tasks.append(loop.create_task(c.publish_loop(), name=f"publish-{c.name}"))
        ready = loop.create_task(serving.wait())
        await asyncio.wait([ready, self.tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        if not serving.is_set():
            ready.cancel()
            self.tasks[0].result()  # the server failed to start: raise its error

    async def stop(self) -> None:
        """Close runs (files complete, catalog told) and cards, then the server."""
        await asyncio.gather(*(c.stop() for c in self.controllers), return_exceptions=True)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.fanout.close()
        self.autosave.flush()
        if self.catalog is not None:
            await asyncio.to_thread(self.catalog.close)
