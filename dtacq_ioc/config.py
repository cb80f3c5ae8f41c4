"""TOML configuration -> typed, validated settings.

Every problem is reported as one line ``file: key: reason`` and all problems of
a file are reported together, so an operator fixes a config in one pass.
Relative paths are resolved against the directory holding the config file, so
a config means the same thing whatever directory the service starts in.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

# The ground floor: nothing of the package is imported here. Module facts are given by
# the caller (dtacq_ioc.preflight passes card.models.MODULES); what needs the file system
# or the network is checked there too, on the parsed Config.

T = TypeVar("T")

SIGNAL_KINDS = ("sine", "square", "noise", "dc", "chirp")
HOST_KEY_POLICIES = ("reject", "warn", "auto-add")
CARRIERS = ("acq2106", "acq1001")
BACKENDS = ("sqlite", "couchdb")
COUNTER_ERROR_POLICIES = ("stop", "continue")
COUCH_AUTH = ("cookie", "basic")
# Where each card's stream is read: a process of its own, or a thread of the IOC's.
READOUT_MODES = ("process", "thread")
SITES = range(1, 7)
DEFAULT_MODULE = "ACQ425ELF"
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ModuleFacts(Protocol):
    """What the parser checks a module name's settings against (card.models.ModuleSpec)."""

    @property
    def nchan(self) -> int: ...

    @property
    def gain_codes(self) -> tuple[int, ...]: ...


Modules = Mapping[str, ModuleFacts]


class ConfigError(Exception):
    """A config file is invalid; ``lines`` holds one ``file: key: reason`` per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Secret:
    """A credential given literally or named by an environment variable.

    The value is looked up only when used and never appears in repr or logs.
    """

    env: str | None = None
    literal: str | None = field(default=None, repr=False)

    def get(self, environ: dict[str, str] | None = None) -> str | None:
        if self.literal is not None:
            return self.literal
        if self.env is None:
            return None
        return (os.environ if environ is None else environ).get(self.env)

    def __repr__(self) -> str:
        return f"Secret(env={self.env!r})" if self.env else "Secret(<literal>)"

    def __bool__(self) -> bool:
        return self.env is not None or self.literal is not None


@dataclass(frozen=True)
class SignalConfig:
    """One simulated channel's signal, in volts at the module input."""

    kind: str = "sine"
    amplitude_v: float = 1.0
    freq_hz: float = 1000.0
    offset_v: float = 0.0
    freq_end_hz: float = 10000.0  # chirp end frequency
    sweep_s: float = 1.0  # chirp sweep period
    noise_v: float = 0.0  # noise added on top of any signal


@dataclass(frozen=True)
class SimSiteConfig:
    site: int
    module: str
    part_num: str = ""
    signals: tuple[SignalConfig, ...] = ()  # per channel; missing channels get defaults
    gains: tuple[int, ...] = ()  # initial gain codes per channel


@dataclass(frozen=True)
class FaultConfig:
    """Faults the simulator injects from the start; they can also be set at runtime."""

    drop_every_samples: int = 0  # skip the counter by drop_count every N samples
    drop_count: int = 1
    corrupt_every_samples: int = 0  # overwrite one word every N samples
    close_after_bytes: int = 0  # close the stream after this many bytes
    not_ready: bool = False  # answer NOT READY on the stream port
    knob_delay_s: float = 0.0  # delay before every knob reply
    reboot_s: float = 5.0  # how long a reboot keeps the ports down


@dataclass(frozen=True)
class SimCardConfig:
    carrier: str = "acq2106"
    sites: tuple[SimSiteConfig, ...] = ()
    serial: str = "CE4160000"
    hostname: str = ""
    unthrottled: bool = False
    sysclk_hz: int = 0  # 0 = the module's default
    ext_clock_hz: float = 0.0  # what the simulated front-panel clock runs at
    faults: FaultConfig = FaultConfig()
    lia: bool = False  # fpga_version carries the _LIA suffix


@dataclass(frozen=True)
class SshConfig:
    user: Secret = Secret(env="DTACQ_USER_NAME")
    password: Secret = Secret(env="DTACQ_PASSWORD")
    key_file: Path | None = None
    port: int = 22
    host_key_policy: str = "reject"
    known_hosts: Path | None = None
    timeout_s: float = 10.0


@dataclass(frozen=True)
class CardConfig:
    name: str
    host: str
    prefix: str
    sites: tuple[int, ...] = ()  # sites to read; empty = every site in `modules`
    # site -> module the card must report there; PVs are built from it before the card
    # answers (a card may be down when the IOC starts). Simulated cards default to theirs.
    modules: dict[int, str] = field(default_factory=dict)
    knob_port_base: int = 4220
    stream_port: int = 4210
    timeout_s: float = 5.0
    buffer_bytes: int = 0  # 0 = the module's default
    gain_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # module -> labels
    ssh: SshConfig = SshConfig()
    sim: SimCardConfig | None = None


@dataclass(frozen=True)
class AccessConfig:
    """CA write rules: empty lists allow everyone."""

    write_hosts: tuple[str, ...] = ()
    write_users: tuple[str, ...] = ()


@dataclass(frozen=True)
class IocConfig:
    name: str = "dtacq"
    prefix: str = ""  # of the IOC's own status PVs; the loader fills in DTACQ:<name>:
    interfaces: tuple[str, ...] = ("127.0.0.1",)
    display_rate_hz: float = 10.0
    display_samples: int = 4096
    min_sample_rate_hz: float = 5000.0
    autosave_dir: Path | None = None
    trigger_dir: Path | None = None
    readout: str = "process"
    access: AccessConfig = AccessConfig()


@dataclass(frozen=True)
class CouchConfig:
    url: Secret = Secret(env="DB_URL")
    db: Secret = Secret(env="DB_NAME")
    user: Secret = Secret(env="DB_USER_NAME")
    password: Secret = Secret(env="DB_PASSWORD")
    auth: str = "cookie"
    file_server: str = ""  # base URL of the experiment's file server; empty = native attachments
    timeout_s: float = 30.0


@dataclass(frozen=True)
class ArchiveConfig:
    backend: str = "sqlite"
    data_dir: Path = Path("var/data")
    spool_dir: Path | None = None  # default: <data_dir>/spool
    on_counter_error: str = "stop"
    writer_queue_buffers: int = 64
    retry_max_s: float = 300.0  # longest wait between deliveries to an unreachable catalog
    couchdb: CouchConfig = CouchConfig()

    @property
    def spool(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"


@dataclass(frozen=True)
class BridgeConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    legacy_port: int = 0  # 0 = the legacy protocol only on /legacy of the main port
    tokens: tuple[Secret, ...] = ()
    slow_client_timeout_s: float = 30.0
    max_message_bytes: int = 65536
    # Client addresses or networks allowed to write on the legacy endpoint without a token
    # (the old page cannot send one); empty = none.
    legacy_write_hosts: tuple[str, ...] = ()
    max_subscriptions: int = 5000  # PVs per WebSocket client
    max_pending_searches: int = 200  # names per client looked up at once (the rest wait)
    search_timeout_s: float = 3.0  # a name no server answers within this is forgotten


@dataclass(frozen=True)
class Config:
    path: Path
    ioc: IocConfig
    archive: ArchiveConfig
    bridge: BridgeConfig
    cards: tuple[CardConfig, ...]

    def card(self, name: str) -> CardConfig:
        for card in self.cards:
            if card.name == name:
                return card
        raise KeyError(name)


@dataclass
class _Context:
    """What every table of one file shares: its problems so far, and how to judge values."""

    file: str
    base_dir: Path
    modules: Modules | None  # None: module names are not checked
    errors: list[str] = field(default_factory=list)


class _Table:
    """A view of one TOML table that records every problem with its dotted key."""

    def __init__(self, ctx: _Context, data: Any, key: str):
        self.ctx = ctx
        self.errors = ctx.errors
        self.file = ctx.file
        self.key = key
        self.base_dir = ctx.base_dir
        self.modules = ctx.modules
        if not isinstance(data, dict):
            self.error(key, f"must be a table, not {type(data).__name__}")
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def error(self, key: str, reason: str) -> None:
        self.errors.append(f"{self.file}: {key or '<top>'}: {reason}")

    def get(
        self,
        name: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # TOML booleans are ints to Python; never accept one where a number is due.
        bad_bool = isinstance(value, bool) and bool not in kinds
        if bad_bool or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.error(self.path(name), f"must be {names}, not {type(value).__name__} {value!r}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.error(self.path(name), f"must be a finite number, not {value}")
            return default
        if check is not None:
            reason = check(value)
            if reason:
                self.error(self.path(name), reason)
                return default
        return cast(T, value)  # TOML's value, of a type in `kind`: checked above

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        return self.get(
            name, str, default, lambda v: None if v in choices else f"must be one of {choices}"
        )

    def positive(self, name: str, kind: type[T], default: T, allow_zero: bool = False) -> T:
        def check(v: Any) -> str | None:
            if v < 0 or (v == 0 and not allow_zero):
                return f"must be {'>= 0' if allow_zero else '> 0'}, got {v}"
            return None

        return self.get(name, kind, default, check)

    def port(self, name: str, default: int) -> int:
        return self.get(
            name, int, default, lambda v: None if 0 < v < 65536 else f"port {v} out of 1..65535"
        )

    def file_path(self, name: str, default: Path | None) -> Path | None:
        value = self.get(name, str, None)
        if value is None:
            return default
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def secret(self, name: str, default: Secret) -> Secret:
        self.used.add(name)
        if name not in self.data:
            return default
        return self._secret_value(self.path(name), self.data[name], default)

    def _secret_value(self, key: str, value: Any, default: Secret) -> Secret:
        if isinstance(value, str):
            return Secret(literal=value)
        if isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str):
            return Secret(env=value["env"])
        self.error(key, 'must be a string or a table {env = "VARIABLE"}')
        return default

    def secrets(self, name: str) -> tuple[Secret, ...]:
        values = self.get(name, list, [])
        return tuple(
            self._secret_value(f"{self.path(name)}[{i}]", v, Secret()) for i, v in enumerate(values)
        )

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        values = self.get(name, list, list(default))
        for i, v in enumerate(values):
            if not isinstance(v, str):
                self.error(f"{self.path(name)}[{i}]", f"must be a string, not {v!r}")
                return default
        return tuple(values)

    def ints(self, name: str, allowed: range | None = None) -> tuple[int, ...]:
        """A list of integers (never booleans), each in `allowed`; bad entries are dropped."""
        values = self.get(name, list, [])
        good: list[int] = []
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int):
                self.error(f"{self.path(name)}[{i}]", f"must be an integer, not {v!r}")
            elif allowed is not None and v not in allowed:
                self.error(
                    f"{self.path(name)}[{i}]", f"{v} out of {allowed.start}..{allowed.stop - 1}"
                )
            else:
                good.append(v)
        return tuple(good)

    def host(self, name: str, default: str) -> str:
        return self.get(name, str, default, host_problem)

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.ctx, self.data.get(name, {}), self.path(name))

    def tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        values = self.data.get(name, [])
        if not isinstance(values, list):
            self.error(self.path(name), "must be an array of tables ([[...]])")
            return []
        return [_Table(self.ctx, v, f"{self.path(name)}[{i}]") for i, v in enumerate(values)]

    def has(self, name: str) -> bool:
        return name in self.data

    def finish(self) -> None:
        """Report keys nobody asked for: a typo must not silently keep a default."""
        for name in self.data:
            if name not in self.used:
                self.error(self.path(name), "unknown key")


def _signal(t: _Table, nchan_default_freq: float) -> SignalConfig:
    d = SignalConfig()
    sig = SignalConfig(
        kind=t.choice("kind", SIGNAL_KINDS, d.kind),
        amplitude_v=t.get("amplitude_v", float, d.amplitude_v),
        freq_hz=t.positive("freq_hz", float, nchan_default_freq, allow_zero=True),
        offset_v=t.get("offset_v", float, d.offset_v),
        freq_end_hz=t.positive("freq_end_hz", float, d.freq_end_hz),
        sweep_s=t.positive("sweep_s", float, d.sweep_s),
        noise_v=t.positive("noise_v", float, d.noise_v, allow_zero=True),
    )
    t.finish()
    return sig


def _faults(t: _Table) -> FaultConfig:
    d = FaultConfig()
    f = FaultConfig(
        drop_every_samples=t.positive("drop_every_samples", int, 0, allow_zero=True),
        drop_count=t.positive("drop_count", int, d.drop_count),
        corrupt_every_samples=t.positive("corrupt_every_samples", int, 0, allow_zero=True),
        close_after_bytes=t.positive("close_after_bytes", int, 0, allow_zero=True),
        not_ready=t.get("not_ready", bool, False),
        knob_delay_s=t.positive("knob_delay_s", float, 0.0, allow_zero=True),
        reboot_s=t.positive("reboot_s", float, d.reboot_s, allow_zero=True),
    )
    t.finish()
    return f


def _module_name(t: _Table, name: str = "module") -> str:
    return t.get(name, str, DEFAULT_MODULE, lambda v: _unknown_module(t.modules, v))


def _unknown_module(modules: Modules | None, name: str) -> str | None:
    if modules is None or name in modules:
        return None
    return f"unknown module {name!r}; known: {', '.join(modules)}"


def _sim_site(t: _Table) -> SimSiteConfig:
    site = t.get("site", int, 1, lambda v: None if v in SITES else f"site {v} out of 1..6")
    module = _module_name(t)
    signals = tuple(_signal(s, 0.0) for s in t.tables("signals"))
    gains = t.ints("gains")
    spec = t.modules.get(module) if t.modules is not None else None
    if spec is not None:
        for i, g in enumerate(gains):
            if g not in spec.gain_codes:
                t.error(f"{t.path('gains')}[{i}]", f"{g} is not a gain code of {module}")
        if len(signals) > spec.nchan:
            t.error(t.path("signals"), f"{len(signals)} signals for {spec.nchan} channels")
    s = SimSiteConfig(
        site=site, module=module, part_num=t.get("part_num", str, ""), signals=signals, gains=gains
    )
    t.finish()
    return s


def _sim(t: _Table) -> SimCardConfig:
    d = SimCardConfig()
    sites = tuple(_sim_site(s) for s in t.tables("sites"))
    if not sites:
        t.error(t.path("sites"), "a simulated card needs at least one [[...sites]] entry")
    seen = [s.site for s in sites]
    if len(set(seen)) != len(seen):
        t.error(t.path("sites"), f"site numbers repeat: {seen}")
    sim = SimCardConfig(
        carrier=t.choice("carrier", CARRIERS, d.carrier),
        sites=sites,
        serial=t.get("serial", str, d.serial),
        hostname=t.get("hostname", str, ""),
        unthrottled=t.get("unthrottled", bool, False),
        sysclk_hz=t.positive("sysclk_hz", int, 0, allow_zero=True),
        ext_clock_hz=t.positive("ext_clock_hz", float, 0.0, allow_zero=True),
        faults=_faults(t.table("faults")),
        lia=t.get("lia", bool, False),
    )
    t.finish()
    return sim


def _ssh(t: _Table) -> SshConfig:
    d = SshConfig()
    s = SshConfig(
        user=t.secret("user", d.user),
        password=t.secret("password", d.password),
        key_file=t.file_path("key_file", None),
        port=t.port("port", d.port),
        host_key_policy=t.choice("host_key_policy", HOST_KEY_POLICIES, d.host_key_policy),
        known_hosts=t.file_path("known_hosts", None),
        timeout_s=t.positive("timeout_s", float, d.timeout_s),
    )
    t.finish()
    return s


def _prefix_check(v: str) -> str | None:
    if not v or not v.endswith(":"):
        return "must end with ':' (e.g. 'NEDM:DIG1:')"
    if any(c.isspace() for c in v) or len(v) > 40:
        return "must be at most 40 characters with no spaces"
    return None


def _card(t: _Table) -> CardConfig:
    d = CardConfig(name="", host="", prefix="")
    name = t.get("name", str, "", lambda v: None if v.isidentifier() else "must be an identifier")
    if not t.has("name"):
        t.error(t.path("name"), "missing")
    host = t.host("host", "")
    if not t.has("host"):
        t.error(t.path("host"), "missing")
    prefix = t.get("prefix", str, "", _prefix_check)
    if not t.has("prefix"):
        t.error(t.path("prefix"), "missing")
    sites = t.ints("sites", SITES)
    if len(set(sites)) != len(sites):
        t.error(t.path("sites"), f"site numbers repeat: {list(sites)}")
    modules = _modules(t.table("modules"))
    sim = _sim(t.table("sim")) if t.has("sim") else None
    if sim is not None and not modules:
        modules = {s.site: s.module for s in sim.sites}
    for s in sites:
        if modules and s not in modules:
            t.error(t.path("sites"), f"site {s} has no module in [cards.modules]")
    if sim is not None:
        _check_simulated(t, modules, {s.site: s.module for s in sim.sites})
    if not modules and name:
        t.error(t.path("modules"), 'missing: e.g. [cards.modules] 1 = "ACQ425ELF"')
    gain_labels = _gain_labels(t.table("gain_labels"))
    sites = sites or tuple(sorted(modules))
    knob_port_base = t.port("knob_port_base", d.knob_port_base)
    stream_port = t.port("stream_port", d.stream_port)
    # Site 0 is the carrier's own knob service.
    knob_ports = [knob_port_base + s for s in (0, *sites)]
    if knob_ports and max(knob_ports) > 65535:
        t.error(
            t.path("knob_port_base"),
            f"{knob_port_base} + site {max(sites, default=0)} is past port 65535",
        )
    elif stream_port in knob_ports:
        t.error(t.path("stream_port"), f"{stream_port} is also a knob port ({knob_port_base}+site)")
    card = CardConfig(
        name=name,
        host=host,
        prefix=prefix,
        sites=sites,
        modules=modules,
        knob_port_base=knob_port_base,
        stream_port=stream_port,
        timeout_s=t.positive("timeout_s", float, d.timeout_s),
        buffer_bytes=t.positive("buffer_bytes", int, 0, allow_zero=True),
        gain_labels=gain_labels,
        ssh=_ssh(t.table("ssh")),
        sim=sim,
    )
    t.finish()
    return card


def _check_simulated(t: _Table, modules: dict[int, str], simulated: dict[int, str]) -> None:
    """The simulator must play the modules the IOC expects, or the card starts in FAULT."""
    for site, module in modules.items():
        if site not in simulated:
            t.error(t.path(f"modules.{site}"), f"site {site} is not simulated in [cards.sim]")
        elif simulated[site] != module:
            t.error(
                t.path(f"modules.{site}"),
                f"{module}, but the simulated site {site} is a {simulated[site]}",
            )


def _gain_labels(t: _Table) -> dict[str, tuple[str, ...]]:
    gain_labels: dict[str, tuple[str, ...]] = {}
    for module in list(t.data):
        labels = t.strings(module)
        reason = _unknown_module(t.modules, module)
        spec = t.modules.get(module) if t.modules is not None else None
        if reason:
            t.error(t.path(module), reason)
        elif spec is not None and labels and len(labels) != len(spec.gain_codes):
            t.error(t.path(module), f"needs {len(spec.gain_codes)} labels, got {len(labels)}")
        elif labels:
            gain_labels[module] = labels
    t.finish()
    return gain_labels


def _modules(t: _Table) -> dict[int, str]:
    modules: dict[int, str] = {}
    for key in list(t.data):
        if not key.isdigit() or int(key) not in SITES:
            t.error(t.path(key), "site numbers 1..6 are the keys")
            t.used.add(key)
            continue
        modules[int(key)] = _module_name(t, key)
    t.finish()
    return modules


def _ioc(t: _Table) -> IocConfig:
    d = IocConfig()
    a = t.table("access")
    access = AccessConfig(
        write_hosts=a.strings("write_hosts"), write_users=a.strings("write_users")
    )
    a.finish()
    # The name makes the autosave file's name: no separators, no dot files.
    name = t.get(
        "name",
        str,
        d.name,
        lambda v: None if _NAME.fullmatch(v) else "must be letters, digits, '_', '-' or '.'",
    )
    interfaces = t.strings("interfaces", d.interfaces)
    if not interfaces and t.has("interfaces"):
        t.error(t.path("interfaces"), "is empty: Channel Access would be served nowhere")
    for i, iface in enumerate(interfaces):
        reason = _ip_problem(iface)
        if reason:
            t.error(f"{t.path('interfaces')}[{i}]", reason)
    ioc = IocConfig(
        name=name,
        prefix=t.get("prefix", str, f"DTACQ:{name}:", _prefix_check),
        interfaces=interfaces or d.interfaces,
        display_rate_hz=t.get(
            "display_rate_hz",
            float,
            d.display_rate_hz,
            lambda v: None if 0 < v <= 100 else f"{v} out of (0, 100] Hz",
        ),
        display_samples=t.get(
            "display_samples",
            int,
            d.display_samples,
            lambda v: None if 16 <= v <= 1_000_000 else f"{v} out of 16..1000000",
        ),
        min_sample_rate_hz=t.positive("min_sample_rate_hz", float, d.min_sample_rate_hz, True),
        autosave_dir=t.file_path("autosave_dir", None),
        trigger_dir=t.file_path("trigger_dir", None),
        readout=t.choice("readout", READOUT_MODES, d.readout),
        access=access,
    )
    t.finish()
    return ioc


def _archive(t: _Table) -> ArchiveConfig:
    d = ArchiveConfig()
    c = t.table("couchdb")
    dc = CouchConfig()
    couch = CouchConfig(
        url=c.secret("url", dc.url),
        db=c.secret("db", dc.db),
        user=c.secret("user", dc.user),
        password=c.secret("password", dc.password),
        auth=c.choice("auth", COUCH_AUTH, dc.auth),
        file_server=c.get("file_server", str, "", lambda v: v and url_problem(v, show=True)),
        timeout_s=c.positive("timeout_s", float, dc.timeout_s),
    )
    if couch.url.literal is not None:
        reason = url_problem(couch.url.literal, show=False)
        if reason:
            c.error(c.path("url"), reason)
    c.finish()
    archive = ArchiveConfig(
        backend=t.choice("backend", BACKENDS, d.backend),
        data_dir=t.file_path("data_dir", None) or (t.base_dir / d.data_dir).resolve(),
        spool_dir=t.file_path("spool_dir", None),
        on_counter_error=t.choice("on_counter_error", COUNTER_ERROR_POLICIES, d.on_counter_error),
        writer_queue_buffers=t.positive("writer_queue_buffers", int, d.writer_queue_buffers),
        retry_max_s=t.positive("retry_max_s", float, d.retry_max_s),
        couchdb=couch,
    )
    t.finish()
    return archive


def _bridge(t: _Table) -> BridgeConfig:
    d = BridgeConfig()
    b = BridgeConfig(
        enabled=t.get("enabled", bool, d.enabled),
        host=t.host("host", d.host),
        port=t.port("port", d.port),
        legacy_port=t.get(
            "legacy_port", int, 0, lambda v: None if 0 <= v < 65536 else f"port {v} out of range"
        ),
        tokens=t.secrets("tokens"),
        slow_client_timeout_s=t.positive("slow_client_timeout_s", float, d.slow_client_timeout_s),
        max_message_bytes=t.positive("max_message_bytes", int, d.max_message_bytes),
        legacy_write_hosts=t.strings("legacy_write_hosts"),
        max_subscriptions=t.positive("max_subscriptions", int, d.max_subscriptions),
        max_pending_searches=t.positive("max_pending_searches", int, d.max_pending_searches),
        search_timeout_s=t.positive("search_timeout_s", float, d.search_timeout_s),
    )
    if b.legacy_port and b.legacy_port == b.port:
        t.error(t.path("legacy_port"), f"{b.legacy_port} is also bridge.port")
    for i, token in enumerate(b.tokens):
        if token.literal == "":  # would be ignored: writes refused to everyone, silently
            t.error(f"{t.path('tokens')}[{i}]", "must not be empty")
    for i, value in enumerate(b.legacy_write_hosts):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            t.error(
                f"{t.path('legacy_write_hosts')}[{i}]", f"{value!r} is not an IP address or network"
            )
    t.finish()
    return b


def host_problem(host: str) -> str | None:
    """None for an IP address or a host name (RFC 1123), else the reason."""
    if _ip_problem(host) is None:
        return None
    labels = host.removesuffix(".").split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in labels):
        return f"{host!r} is neither an IP address nor a host name"
    if labels[-1].isdigit():  # all-numeric names are meant as addresses: 999.1.1.1, 10.1
        return f"{host!r} is not a valid IP address"
    return None


def _ip_problem(address: str) -> str | None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    return None


def url_problem(url: str, show: bool) -> str | None:
    """None for an http(s) URL with a valid host and port; `show` puts the URL in the reason
    (never for one that may carry credentials)."""
    what = f"{url!r}" if show else "the URL"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError as exc:
        return f"{what} does not parse ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"{what} must start with http:// or https://"
    if not parts.hostname or host_problem(parts.hostname):
        return f"{what} has no valid host name"
    if port == 0:
        return f"{what} has port 0"
    return None


def _check_cards(root: _Table, ioc: IocConfig, cards: tuple[CardConfig, ...]) -> None:
    """What no single card can see: names and prefixes shared or overlapping."""
    names = [c.name for c in cards]
    dupes = sorted({v for v in names if v and names.count(v) > 1})
    if dupes:
        root.error("cards", f"card names must be unique; repeated: {', '.join(dupes)}")
    # One card's PV names must never be another's: a prefix inside another could collide
    # (DTACQ:SIM1: serves 1:MODEL, which is DTACQ:SIM1:1:'s MODEL).
    seen: list[tuple[str, str]] = []
    for i, card in enumerate(cards):
        reasons = (_overlap(card.prefix, prefix, owner) for owner, prefix in seen)
        reason = next((r for r in reasons if r), "")
        if reason:
            root.error(f"cards[{i}].prefix", reason)
        seen.append((f"card {card.name}", card.prefix))
    # The status group and a card group share suffixes (HEARTBEAT, LAST_ERROR).
    reasons = (_overlap(ioc.prefix, prefix, owner) for owner, prefix in seen)
    reason = next((r for r in reasons if r), "")
    if reason:
        root.error("ioc.prefix", reason)


def _overlap(prefix: str, other: str, owner: str) -> str:
    if not prefix or not other:
        return ""  # already reported as missing or malformed
    if prefix == other:
        return f"{prefix!r} is also the prefix of {owner}"
    if prefix.startswith(other) or other.startswith(prefix):
        return f"{prefix!r} overlaps {owner}'s prefix {other!r}: their PV names could collide"
    return ""


def parse_config(text: str, path: Path, modules: Modules | None = None) -> Config:
    """Parse TOML text as if read from ``path``; raise ConfigError listing every problem.

    With ``modules`` (name -> facts), module names, gain codes and labels are checked too.
    """
    file = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: <syntax>: {exc}"]) from None
    ctx = _Context(file, path.parent.resolve(), modules)
    errors = ctx.errors
    root = _Table(ctx, data, "")
    ioc = _ioc(root.table("ioc"))
    archive = _archive(root.table("archive"))
    bridge = _bridge(root.table("bridge"))
    cards = tuple(_card(t) for t in root.tables("cards"))
    if not cards:
        root.error("cards", "at least one [[cards]] entry is needed")
    _check_cards(root, ioc, cards)
    root.finish()
    if errors:
        raise ConfigError(errors)
    return Config(path=path.resolve(), ioc=ioc, archive=archive, bridge=bridge, cards=cards)


def load_config(path: str | os.PathLike[str], modules: Modules | None = None) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{p}: <file>: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        reason = f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}"
        raise ConfigError([f"{p}: <encoding>: {reason}"]) from None
    return parse_config(text, p, modules)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ioc_configs" / "sim.toml"
