"""The simulator: every simulated card of a config, and `dtacq-ioc sim` around it."""

from __future__ import annotations

import logging
import signal
import threading

from dtacq_ioc.config import Config
from dtacq_ioc.sim.card import STATUS_PORT, SimCard
from dtacq_ioc.sim.ssh import new_host_key

log = logging.getLogger(__name__)


class Simulator:
    """Plays the config's cards that have a [cards.sim] table (or the named ones)."""

    def __init__(self, config: Config, cards: list[str] | None = None, unthrottled: bool = False):
        simulated = [c for c in config.cards if c.sim is not None]
        if cards:
            known = {c.name for c in simulated}
            unknown = [n for n in cards if n not in known]
            if unknown:
                raise ValueError(
                    f"no simulated card named {', '.join(unknown)} in {config.path} "
                    f"(simulated cards: {', '.join(sorted(known)) or 'none'})"
                )
            simulated = [c for c in simulated if c.name in cards]
        if not simulated:
            raise ValueError(f"{config.path} has no card with a [cards.sim] table")
        self.config = config
        self._configs = simulated
        self.unthrottled = unthrottled
        self._cards: dict[str, SimCard] = {}

    def start(self) -> None:
        """Returns once every port of every card listens; on failure nothing is left open."""
        host_key = new_host_key()
        try:
            for cfg in self._configs:
                card = SimCard(cfg, host_key, unthrottled=self.unthrottled)
                card.start()
                self._cards[cfg.name] = card
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for card in reversed(list(self._cards.values())):
            card.stop()
        self._cards.clear()

    def card(self, name: str) -> SimCard:
        return self._cards[name]

    @property
    def cards(self) -> list[SimCard]:
        return list(self._cards.values())

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(card: SimCard) -> str:
    ports = card.knob_ports
    return (
        f"{card.name} at {card.host} (knobs {min(ports.values())}-{max(ports.values())}, "
        f"stream {card.config.stream_port}, status {STATUS_PORT}, ssh {card.config.ssh.port})"
    )


def run_simulator(config: Config, cards: list[str] | None = None, unthrottled: bool = False) -> int:
    """`dtacq-ioc sim`: serve until SIGINT or SIGTERM."""
    try:
        sim = Simulator(config, cards, unthrottled)
        sim.start()
    except (ValueError, OSError) as exc:
        log.error("simulator: %s", exc)
        return 2 if isinstance(exc, ValueError) else 1
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("simulator: %s, stopping", signal.Signals(signum).name)
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("simulator ready: %s", "; ".join(describe(c) for c in sim.cards))
        while not done.wait(1.0):  # a timeout keeps the main thread responsive to signals
            pass
    finally:
        sim.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
