"""TOML configuration -> typed, validated settings.

Every problem is reported as one line ``file: key: reason`` and all problems of
a file are reported together, so an operator fixes a config in one pass.
Relative paths are resolved against the directory holding the config file, so
a config means the same thing whatever directory the service starts in.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dtacq_ioc.card.models import MODULES, module_spec

T = TypeVar("T")

SIGNAL_KINDS = ("sine", "square", "noise", "dc", "chirp")
HOST_KEY_POLICIES = ("reject", "warn", "auto-add")
CARRIERS = ("acq2106", "acq1001")
BACKENDS = ("sqlite", "couchdb")
COUNTER_ERROR_POLICIES = ("stop", "continue")
COUCH_AUTH = ("cookie", "basic")


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


class _Table:
    """A view of one TOML table that records every problem with its dotted key."""

    def __init__(self, errors: list[str], file: str, data: Any, key: str, base_dir: Path):
        self.errors = errors
        self.file = file
        self.key = key
        self.base_dir = base_dir
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
        if check is not None:
            reason = check(value)
            if reason:
                self.error(self.path(name), reason)
                return default
        return value  # type: ignore[return-value]

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

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(
            self.errors, self.file, self.data.get(name, {}), self.path(name), self.base_dir
        )

    def tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        values = self.data.get(name, [])
        if not isinstance(values, list):
            self.error(self.path(name), "must be an array of tables ([[...]])")
            return []
        return [
            _Table(self.errors, self.file, v, f"{self.path(name)}[{i}]", self.base_dir)
            for i, v in enumerate(values)
        ]

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
    return t.get(
        name,
        str,
        "ACQ425ELF",
        lambda v: None if v in MODULES else f"unknown module {v!r}; known: {', '.join(MODULES)}",
    )


def _sim_site(t: _Table) -> SimSiteConfig:
    site = t.get("site", int, 1, lambda v: None if 1 <= v <= 6 else f"site {v} out of 1..6")
    module = _module_name(t)
    signals = tuple(_signal(s, 0.0) for s in t.tables("signals"))
    gains = t.get("gains", list, [])
    spec = module_spec(module) if module in MODULES else None
    for i, g in enumerate(gains):
        if not isinstance(g, int) or (spec and g not in spec.gain_codes):
            t.error(f"{t.path('gains')}[{i}]", f"bad gain code {g!r}")
    if spec and len(signals) > spec.nchan:
        t.error(t.path("signals"), f"{len(signals)} signals for {spec.nchan} channels")
    s = SimSiteConfig(
        site=site,
        module=module,
        part_num=t.get("part_num", str, ""),
        signals=signals,
        gains=tuple(g for g in gains if isinstance(g, int)),
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
    host = t.get("host", str, "")
    if not host:
        t.error(t.path("host"), "missing")
    prefix = t.get("prefix", str, "", _prefix_check)
    if not t.has("prefix"):
        t.error(t.path("prefix"), "missing")
    sites = t.get("sites", list, [])
    for i, s in enumerate(sites):
        if not isinstance(s, int) or not 1 <= s <= 6:
            t.error(f"{t.path('sites')}[{i}]", f"site {s!r} out of 1..6")
    modules = _modules(t.table("modules"))
    sim = _sim(t.table("sim")) if t.has("sim") else None
    if sim is not None and not modules:
        modules = {s.site: s.module for s in sim.sites}
    for s in sites:
        if isinstance(s, int) and modules and s not in modules:
            t.error(t.path("sites"), f"site {s} has no module in [cards.modules]")
    if not modules and name:
        t.error(t.path("modules"), 'missing: e.g. [cards.modules] 1 = "ACQ425ELF"')
    labels_table = t.table("gain_labels")
    gain_labels: dict[str, tuple[str, ...]] = {}
    for module in list(labels_table.data):
        if module not in MODULES:
            labels_table.error(labels_table.path(module), f"unknown module {module!r}")
            labels_table.used.add(module)
            continue
        labels = labels_table.strings(module)
        ncodes = len(module_spec(module).gain_codes)
        if labels and len(labels) != ncodes:
            labels_table.error(
                labels_table.path(module), f"needs {ncodes} labels, got {len(labels)}"
            )
        elif labels:
            gain_labels[module] = labels
    labels_table.finish()
    card = CardConfig(
        name=name,
        host=host,
        prefix=prefix,
        sites=tuple(s for s in sites if isinstance(s, int)) or tuple(sorted(modules)),
        modules=modules,
        knob_port_base=t.port("knob_port_base", d.knob_port_base),
        stream_port=t.port("stream_port", d.stream_port),
        timeout_s=t.positive("timeout_s", float, d.timeout_s),
        buffer_bytes=t.positive("buffer_bytes", int, 0, allow_zero=True),
        gain_labels=gain_labels,
        ssh=_ssh(t.table("ssh")),
        sim=sim,
    )
    t.finish()
    return card


def _modules(t: _Table) -> dict[int, str]:
    modules: dict[int, str] = {}
    for key in list(t.data):
        if not key.isdigit() or not 1 <= int(key) <= 6:
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
    name = t.get("name", str, d.name)
    ioc = IocConfig(
        name=name,
        prefix=t.get("prefix", str, f"DTACQ:{name}:", _prefix_check),
        interfaces=t.strings("interfaces", d.interfaces),
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
        file_server=c.get("file_server", str, ""),
        timeout_s=c.positive("timeout_s", float, dc.timeout_s),
    )
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
        host=t.get("host", str, d.host),
        port=t.port("port", d.port),
        legacy_port=t.get(
            "legacy_port", int, 0, lambda v: None if 0 <= v < 65536 else f"port {v} out of range"
        ),
        tokens=t.secrets("tokens"),
        slow_client_timeout_s=t.positive("slow_client_timeout_s", float, d.slow_client_timeout_s),
        max_message_bytes=t.positive("max_message_bytes", int, d.max_message_bytes),
        max_subscriptions=t.positive("max_subscriptions", int, d.max_subscriptions),
        max_pending_searches=t.positive("max_pending_searches", int, d.max_pending_searches),
        search_timeout_s=t.positive("search_timeout_s", float, d.search_timeout_s),
    )
    t.finish()
    return b


def parse_config(text: str, path: Path) -> Config:
    """Parse TOML text as if read from ``path``; raise ConfigError listing every problem."""
    file = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: <syntax>: {exc}"]) from None
    errors: list[str] = []
    root = _Table(errors, file, data, "", path.parent.resolve())
    ioc = _ioc(root.table("ioc"))
    archive = _archive(root.table("archive"))
    bridge = _bridge(root.table("bridge"))
    cards = tuple(_card(t) for t in root.tables("cards"))
    if not cards:
        root.error("cards", "at least one [[cards]] entry is needed")
    for attr in ("name", "prefix"):
        values = [getattr(c, attr) for c in cards]
        dupes = sorted({v for v in values if v and values.count(v) > 1})
        if dupes:
            root.error("cards", f"card {attr}s must be unique; repeated: {', '.join(dupes)}")
    # The status group and a card group share suffixes (HEARTBEAT, LAST_ERROR).
    clash = [c.name for c in cards if c.prefix == ioc.prefix]
    if clash:
        root.error("ioc.prefix", f"{ioc.prefix!r} is also the prefix of card {clash[0]}")
    root.finish()
    if errors:
        raise ConfigError(errors)
    return Config(path=path.resolve(), ioc=ioc, archive=archive, bridge=bridge, cards=cards)


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: <file>: {exc.strerror or exc}"]) from None
    return parse_config(text, p)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ioc_configs" / "sim.toml"
