"""What `check` and `run` verify before anything starts, beyond the file's own grammar.

`dtacq_ioc.config` parses and checks what the file alone can tell (given the card
family's module facts, which this module passes it); this module adds what needs the
machine: directories that can be written, trigger files that import, ports that can
be bound, card hosts not shared, the database's address from the environment. Every
problem is one line ``file: key: reason``, like the parser's, so `run` refuses a config
exactly as `check` does (exit 2) instead of failing half-started.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from dtacq_ioc.card.models import MODULES
from dtacq_ioc.config import Config, ConfigError, host_problem, load_config, url_problem
from dtacq_ioc.readout.triggers import TriggerRegistry

# Channel Access servers listen here unless the environment says otherwise (caproto's default).
CA_SERVER_PORT = 5064
EPHEMERAL_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@dataclass(frozen=True)
class Scope:
    """Which of the process's parts will start, so only their resources are probed."""

    ca: bool = True  # the IOC's Channel Access server and its directories
    bridge: bool = True  # the browser bridge's ports (when the config enables it)
    sim: bool = True  # the simulator's ports on each simulated card's host
    sim_cards: frozenset[str] | None = None  # the cards `sim --card` plays (None: all)
    bridge_alone: bool = False  # `dtacq-ioc bridge` serves whether or not [bridge] enables it


FULL = Scope()
FILE_ONLY = Scope(ca=False, bridge=False, sim=False)

Problem = tuple[str, str]  # (key, reason)


def check_config(
    path: str | os.PathLike[str],
    scope: Scope = FULL,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load `path` and check everything knowable before start; ConfigError lists it all."""
    config = load_config(path, MODULES)
    env = os.environ if environ is None else environ
    problems: list[Problem] = []
    if scope.ca:
        problems += card_problems(config)
        problems += directory_problems(config)
        problems += couchdb_problems(config, env)
        problems += [(f"ioc.interfaces[{i}]", r) for i, r in _interfaces(config)]
    if scope.bridge and (config.bridge.enabled or scope.bridge_alone):
        problems += bridge_problems(config, env)
    if scope.sim:
        problems += sim_problems(config, scope.sim_cards)
    if problems:
        raise ConfigError([f"{os.fspath(path)}: {key}: {reason}" for key, reason in problems])
    return config


def card_problems(config: Config) -> Iterator[Problem]:
    """Two cards of one IOC on one host would fight over it (and a simulator cannot)."""
    hosts: dict[str, str] = {}
    for i, card in enumerate(config.cards):
        other = hosts.setdefault(card.host.lower(), card.name)
        if other != card.name:
            yield f"cards[{i}].host", f"{card.host!r} is also the host of card {other}"


# -- the file system ----------------------------------------------------------------------


def directory_problems(config: Config) -> Iterator[Problem]:
    """Directories the IOC writes (made if missing) and the trigger directory it reads."""
    archive, ioc = config.archive, config.ioc
    writable = [("archive.data_dir", archive.data_dir)]
    if archive.backend == "couchdb" or archive.spool_dir is not None:
        writable.append(("archive.spool_dir", archive.spool))
    if ioc.autosave_dir is not None:
        writable.append(("ioc.autosave_dir", ioc.autosave_dir))
    for key, path in writable:
        reason = _writable_dir(path)
        if reason:
            yield key, reason
    if ioc.trigger_dir is not None:
        if not ioc.trigger_dir.is_dir():
            yield "ioc.trigger_dir", f"{ioc.trigger_dir} is not a directory"
        else:
            broken = TriggerRegistry(ioc.trigger_dir).import_errors()
            if broken:
                yield "ioc.trigger_dir", f"trigger files do not import: {'; '.join(broken)}"
    for i, card in enumerate(config.cards):
        key_file = card.ssh.key_file
        if key_file is not None and not os.access(key_file, os.R_OK):
            yield f"cards[{i}].ssh.key_file", f"{key_file} cannot be read"


def _writable_dir(path: Path) -> str | None:
    """None when `path` is a writable directory or can be made as one, else why not."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} cannot be a directory: {existing} is a file"
    try:
        # A real file, not os.access: a read-only mount refuses even root.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        made = "is" if existing == path else f"cannot be made: {existing} is"
        return f"{path} {made} not writable ({exc.strerror or exc})"
    return None


# -- the network --------------------------------------------------------------------------


def couchdb_problems(config: Config, env: Mapping[str, str]) -> Iterator[Problem]:
    """The database URL and name are read when used; a wrong one is found here, not later."""
    if config.archive.backend != "couchdb":
        return
    couch = config.archive.couchdb
    for name, secret in (("url", couch.url), ("db", couch.db)):
        key = f"archive.couchdb.{name}"
        if secret.env is not None and not env.get(secret.env):
            yield key, f"environment variable {secret.env} is not set"
        elif secret.env is not None and name == "url":
            reason = url_problem(env[secret.env], show=False)
            if reason:
                yield key, f"{reason} (from {secret.env})"


def _interfaces(config: Config) -> Iterator[tuple[int, str]]:
    for i, iface in enumerate(config.ioc.interfaces):
        problem = _bind_problem(iface, 0)
        if problem:
            yield i, problem[1]


def bridge_problems(config: Config, env: Mapping[str, str]) -> Iterator[Problem]:
    bridge = config.bridge
    ca_port = _ca_port(env)
    for name, port in (("port", bridge.port), ("legacy_port", bridge.legacy_port)):
        if not port:
            continue
        if port == ca_port:
            yield f"bridge.{name}", f"{port} is the Channel Access server port"
            continue
        problem = _bind_problem(bridge.host, port)
        if problem:
            what, reason = problem
            yield f"bridge.{name if what == 'port' else 'host'}", reason
            return  # a host that cannot be bound would be reported for each port


def _ca_port(env: Mapping[str, str]) -> int:
    for name in ("EPICS_CAS_SERVER_PORT", "EPICS_CA_SERVER_PORT"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return CA_SERVER_PORT


def ephemeral_ports() -> range:
    """The ports the kernel picks for sockets bound to port 0 (Linux's default if unknown)."""
    try:
        low, high = map(int, EPHEMERAL_PORTS_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def ca_port_caveat(env: Mapping[str, str]) -> str | None:
    """Why a CA server port in the ephemeral range is unreliable, or None when it is not.

    Linux may give a client socket bound to port 0 with SO_REUSEADDR (caproto's clients
    bind so) the port a server already holds; that client's search is then answered to
    the server's own port, and the client never finds the IOC. Measured here: once in
    ~37,000 binds. EPICS's 5064 is below the range.
    """
    port, ephemeral = _ca_port(env), ephemeral_ports()
    if port not in ephemeral:
        return None
    return (
        f"the Channel Access server port {port} is in this host's ephemeral port range "
        f"{ephemeral.start}..{ephemeral.stop - 1}: now and then a client on this host is "
        f"given the same port and cannot find this IOC; choose a port below {ephemeral.start}"
    )


def sim_problems(config: Config, only: frozenset[str] | None = None) -> Iterator[Problem]:
    """Every port the simulator will listen on, on the host of each card it plays."""
    from dtacq_ioc.sim.card import STATUS_PORT  # the simulator's imports are heavy: only here

    for i, card in enumerate(config.cards):
        if card.sim is None or host_problem(card.host):
            continue
        if only is not None and card.name not in only:
            continue  # another `sim --card` process may be playing it
        ports: list[tuple[str, int]] = [
            ("knob_port_base", card.knob_port_base + site)
            for site in (0, *(s.site for s in card.sim.sites))
        ]
        ports += [("stream_port", card.stream_port), ("ssh.port", card.ssh.port)]
        ports.append(("host", STATUS_PORT))
        for name, port in ports:
            if port > 65535:
                continue  # reported by the parser
            problem = _bind_problem(card.host, port)
            if problem:
                what, reason = problem
                yield f"cards[{i}].{name if what == 'port' else 'host'}", reason
                break  # one line per card: the first port it cannot have


def _bind_problem(host: str, port: int) -> tuple[str, str] | None:
    """None when a TCP listener could bind host:port now; else ("host" or "port", why)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return "host", f"{host!r} cannot be resolved ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the real listeners do: a port in TIME_WAIT is free, one being listened on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "port", f"port {port} on {host} is in use"
            if exc.errno == errno.EACCES:
                return "port", f"port {port} on {host} needs privileges this process lacks"
            if exc.errno == errno.EADDRNOTAVAIL:
                return "host", f"{host!r} is not an address of this host"
            return "host", f"{host} port {port} cannot be bound ({exc.strerror or exc})"
    return None
