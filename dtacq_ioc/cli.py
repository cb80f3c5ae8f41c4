"""`dtacq-ioc run | sim | bridge | runs | screens | check | status`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dtacq_ioc import __version__
from dtacq_ioc.config import DEFAULT_CONFIG, Config, ConfigError
from dtacq_ioc.preflight import FILE_ONLY, FULL, Scope, check_config

log = logging.getLogger("dtacq_ioc")

# A config that cannot work: systemd's unit does not restart on it (RestartPreventExitStatus).
EXIT_CONFIG = 2


def _default_config() -> Path:
    local = Path("ioc_configs/sim.toml")
    return local if local.exists() else DEFAULT_CONFIG


def _add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    if required:
        p.add_argument("config", type=Path, help="TOML config file")
    else:
        p.add_argument(
            "config",
            type=Path,
            nargs="?",
            default=None,
            help="TOML config file (default: ioc_configs/sim.toml)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtacq-ioc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dtacq-ioc {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--debug",
        action="append",
        default=[],
        metavar="LOGGER",
        help="log this logger at DEBUG whatever --log-level says (repeatable), e.g. "
        "dtacq_ioc.timing for the time each frame takes to publish and send",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the IOC (and the simulator for simulated cards)")
    _add_config(p)
    p.add_argument("--list-pvs", action="store_true", help="log every PV name served")
    p.add_argument("--no-sim", action="store_true", help="do not start the simulator")

    p = sub.add_parser("sim", help="play the config's simulated cards on loopback")
    _add_config(p)
    p.add_argument("--card", action="append", default=None, help="only this card (repeatable)")
    p.add_argument("--unthrottled", action="store_true", help="stream as fast as possible")

    p = sub.add_parser("bridge", help="run the browser bridge alone")
    _add_config(p)

    p = sub.add_parser("runs", help="list, show, export and upload archived runs")
    p.add_argument("action", choices=["list", "show", "export", "upload"])
    p.add_argument("run", nargs="?", help="run id (show, export)")
    p.add_argument("--format", choices=["npy", "csv"], default="npy", help="export format")
    p.add_argument("-o", "--output", type=Path, default=Path("."), help="export directory")
    p.add_argument("--limit", type=int, default=50, help="rows to list")
    # An option, not a positional: "runs show ID" must not read ID as the config.
    p.add_argument("-c", "--config", type=Path, default=None, help="TOML config file")

    p = sub.add_parser("screens", help="write Phoebus .bob screens for the config's cards")
    _add_config(p)
    p.add_argument("-o", "--output", type=Path, default=Path("screens"))

    p = sub.add_parser("check", help="validate a config file")
    _add_config(p, required=True)

    p = sub.add_parser("status", help="print the IOC's health PVs as a table (via CA)")
    _add_config(p)
    p.add_argument("--timeout", type=float, default=3.0)
    return parser


def _scope(args: argparse.Namespace) -> Scope:
    """What the command will start, so that is what gets checked before it starts."""
    if args.command == "run":
        return Scope(sim=not args.no_sim)
    if args.command == "sim":
        return Scope(ca=False, bridge=False, sim_cards=frozenset(args.card) if args.card else None)
    if args.command == "bridge":
        return Scope(ca=False, sim=False, bridge_alone=True)
    return FULL if args.command == "check" else FILE_ONLY


def _load(args: argparse.Namespace) -> Config:
    return check_config(getattr(args, "config", None) or _default_config(), _scope(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # caproto logs every client and channel connect at INFO: a line per caget.
        for name in ("caproto.ch", "caproto.ctx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in args.debug:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        config = _load(args)
    except ConfigError as exc:
        for line in exc.lines:
            sys.stderr.write(f"{line}\n")
        return EXIT_CONFIG
    return _dispatch(args, config)


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "check":
        sys.stdout.write(f"{config.path}: ok ({len(config.cards)} cards)\n")
        return 0
    if args.command == "sim":
        from dtacq_ioc.sim.server import run_simulator

        return run_simulator(config, cards=args.card, unthrottled=args.unthrottled)
    if args.command == "run":
        from dtacq_ioc.service import run_service

        return run_service(config, list_pvs=args.list_pvs, with_sim=not args.no_sim)
    if args.command == "bridge":
        from dtacq_ioc.bridge.app import run_bridge

        return run_bridge(config)
    if args.command == "runs":
        from dtacq_ioc.archive.cli import runs_command

        return runs_command(config, args)
    if args.command == "screens":
        from dtacq_ioc.ioc.screens import write_screens

        for path in write_screens(config, args.output):
            sys.stdout.write(f"{path}\n")
        return 0
    if args.command == "status":
        from dtacq_ioc.ioc.status import print_status

        return print_status(config, timeout=args.timeout)
    raise AssertionError(args.command)
