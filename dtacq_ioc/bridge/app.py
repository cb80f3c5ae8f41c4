"""The bridge server: page, PVWS and nEDM sockets and run files on one port.

Autobahn runs on Twisted's asyncio reactor installed on the process's one
asyncio loop, so the bridge shares the loop with caproto (client here, and the
server too when the IOC embeds the bridge).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtacq_ioc.config import Config

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"


def ensure_reactor(loop: asyncio.AbstractEventLoop) -> Any:
    """Install Twisted's asyncio reactor on `loop` (once per process) and return it."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        from dtacq_ioc.bridge.twistedlog import start_twisted_logging

        asyncioreactor.install(loop)
        start_twisted_logging()
    from twisted.internet import reactor

    if getattr(reactor, "_asyncioEventloop", None) is not loop:
        raise RuntimeError(
            "twisted.internet.reactor was installed before the bridge on another loop; "
            "start the bridge before anything imports the reactor"
        )
    return reactor


@dataclass
class Bridge:
    """A running bridge; `stop()` closes its ports, its clients and its CA context."""

    services: Any
    ports: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports[0].getHost().port

    async def stop(self) -> None:
        from twisted.internet.defer import Deferred

        for port in self.ports:
            await Deferred.asFuture(port.stopListening(), asyncio.get_running_loop())
        for session in list(self.services.sessions):
            session.dropConnection(abort=True)
        for task in list(self.services.tasks):
            task.cancel()
        await self.services.source.close()


async def start_bridge(config: Config, loop: asyncio.AbstractEventLoop | None = None) -> Bridge:
    """Start serving on config.bridge.host:port (and legacy_port); return the running Bridge."""
    loop = loop or asyncio.get_running_loop()
    reactor = ensure_reactor(loop)
    # Imported only now: these modules import txaio/autobahn's Twisted flavour.
    from autobahn.twisted.resource import WebSocketResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    from dtacq_ioc.bridge.auth import TokenCheck
    from dtacq_ioc.bridge.files import CardList, DataFiles, WebFiles
    from dtacq_ioc.bridge.legacy import LegacySession
    from dtacq_ioc.bridge.pvws import PvwsSession
    from dtacq_ioc.bridge.runs import RunsResource
    from dtacq_ioc.bridge.session import Services, make_factory
    from dtacq_ioc.bridge.source import PvSource

    cfg = config.bridge
    source = PvSource(search_timeout_s=cfg.search_timeout_s)
    await source.start()
    services = Services(config=config, source=source, tokens=TokenCheck.for_bridge(cfg))
    if not services.tokens.enabled:
        log.info("no bridge token configured: the bridge is read-only")

    root = WebFiles(str(WEB_DIR))
    pvws = Resource()
    pvws.putChild(b"pv", WebSocketResource(make_factory(PvwsSession, services)))  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    root.putChild(b"pvws", pvws)  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    legacy_ws = WebSocketResource(make_factory(LegacySession, services))
    root.putChild(b"legacy", legacy_ws)  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    root.putChild(b"data", DataFiles(str(config.archive.data_dir)))  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    cards = [{"name": c.name, "host": c.host, "prefix": c.prefix} for c in config.cards]
    root.putChild(b"cards.json", CardList(cards))  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    root.putChild(b"runs", RunsResource(config.archive.data_dir))  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    access = {"tokens": services.tokens.enabled, "one_time": bool(services.tokens.one_time)}
    access_json = Data(json.dumps(access).encode(), "application/json")
    root.putChild(b"access.json", access_json)  # type: ignore[arg-type]  # zope's @implementer is not seen by mypy
    site = Site(root)
    site.displayTracebacks = False

    bridge = Bridge(services)
    bridge.ports.append(reactor.listenTCP(cfg.port, site, interface=cfg.host))
    log.info("bridge on http://%s:%d/ (PVWS /pvws/pv, nEDM /legacy)", cfg.host, bridge.port)
    if services.tokens.one_time:  # the one place a token is logged: made for this process
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 address in a URL
        log.warning(
            "no bridge token configured; to control the cards open http://%s:%d/?token=%s",
            host, bridge.port, services.tokens.one_time,
        )  # fmt: skip
    if cfg.legacy_port:
        legacy = make_factory(LegacySession, services)
        bridge.ports.append(reactor.listenTCP(cfg.legacy_port, legacy, interface=cfg.host))
        log.info("nEDM protocol also on ws://%s:%d/", cfg.host, cfg.legacy_port)
    return bridge


def run_bridge(config: Config) -> int:
    """`dtacq-ioc bridge`: serve until SIGINT/SIGTERM."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    ensure_reactor(loop)

    async def main() -> None:
        from twisted.internet.error import CannotListenError

        try:
            bridge = await start_bridge(config, loop)
        except CannotListenError as exc:
            log.error("bridge cannot listen: %s", exc)
            raise SystemExit(1) from None
        done = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        log.info("bridge stopping")
        await bridge.stop()
        # caproto's client leaves helper tasks behind; end them before the loop closes.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    try:
        loop.run_until_complete(main())
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        loop.close()
    return 0
