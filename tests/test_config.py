from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import ROOT, child_env, free_port, random_loopback

from dtacq_ioc.card.models import MODULES
from dtacq_ioc.config import ConfigError, load_config, parse_config
from dtacq_ioc.preflight import ca_port_caveat, ephemeral_ports


def test_default_and_production_configs_load():
    sim = load_config(ROOT / "ioc_configs" / "sim.toml", MODULES)
    assert [c.name for c in sim.cards] == ["SIM1", "SIM2"]
    assert sim.card("SIM1").host == "127.0.0.2" and sim.card("SIM1").prefix == "DTACQ:SIM1:"
    assert sim.card("SIM1").sim.sites[0].module == "ACQ425ELF"
    assert sim.card("SIM2").sim.carrier == "acq1001"
    assert sim.card("SIM2").sim.sites[0].module == "ACQ437ELF"
    prod = load_config(ROOT / "ioc_configs" / "nedm1.toml", MODULES)
    assert [c.prefix for c in prod.cards] == ["NEDM:DIG1:", "NEDM:DIG2:"]
    assert prod.archive.backend == "couchdb"
    assert prod.archive.couchdb.password.env == "DB_PASSWORD"
    assert all(c.sim is None for c in prod.cards)


def test_secret_never_shows_its_value():
    cfg = parse_config(
        '[[cards]]\nname="A"\nhost="h"\nprefix="A:"\n[cards.modules]\n1="ACQ425ELF"\n'
        '[cards.ssh]\npassword="hunter2"\n',
        Path("x.toml"),
    )
    assert "hunter2" not in repr(cfg)
    assert cfg.cards[0].ssh.password.get() == "hunter2"


def test_every_error_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[ioc]\ndisplay_rate_hz = 'fast'\ntypo = 1\n[archive]\nbackend='mysql'\n"
        "[[cards]]\nname='X'\nhost='h'\nprefix='NOCOLON'\n"
        "[cards.sim]\n[[cards.sim.sites]]\nmodule='ACQ999'\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad, MODULES)
    lines = err.value.lines
    keys = [line.split(": ")[1] for line in lines]
    assert all(line.startswith(f"{bad}: ") and "\n" not in line for line in lines)
    assert {
        "ioc.display_rate_hz",
        "ioc.typo",
        "archive.backend",
        "cards[0].prefix",
        "cards[0].sim.sites[0].module",
    } <= set(keys)


def test_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "syntax.toml"
    bad.write_text("[ioc\n")
    with pytest.raises(ConfigError, match="syntax"):
        load_config(bad)
    with pytest.raises(ConfigError, match="<file>"):
        load_config(tmp_path / "absent.toml")


def test_check_command_exit_codes(tmp_path):
    # sim.toml itself passes in test_the_private_sim_toml_passes_check: a copy on ports and
    # addresses of the test's own, as `check` probes them and `make run` may hold sim.toml's.
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[cards]]\nname='A'\nhost='h'\nprefix='A:'\nclkdiv=3\nmodules={1='ACQ425ELF'}\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"{bad}: cards[0].clkdiv: unknown key"


def test_ioc_prefix_default_explicit_and_errors():
    card = '[[cards]]\nname="A"\nhost="h"\nprefix="A:"\n[cards.modules]\n1="ACQ425ELF"\n'
    assert parse_config('[ioc]\nname="hall"\n' + card, Path("x.toml")).ioc.prefix == ("DTACQ:hall:")
    cfg = parse_config('[ioc]\nprefix="NEDM:IOC1:"\n' + card, Path("x.toml"))
    assert cfg.ioc.prefix == "NEDM:IOC1:"
    for prefix, reason in (("NOCOLON", "must end with ':'"), ("A:", "also the prefix of card A")):
        with pytest.raises(ConfigError) as err:
            parse_config(f'[ioc]\nprefix="{prefix}"\n' + card, Path("x.toml"))
        [line] = err.value.lines
        assert line.startswith("x.toml: ioc.prefix: ") and reason in line


# --- broken variants of sim.toml: `check` and `run` refuse each with one line ------------


@dataclass
class Base:
    """sim.toml made private to one test: its own card hosts, bridge port and directories."""

    dir: Path
    hosts: tuple[str, str]
    bridge_port: int
    held: contextlib.ExitStack

    def text(self) -> str:
        text = (ROOT / "ioc_configs" / "sim.toml").read_text()
        for old, new in (
            ('"../var/sim/autosave"', '"autosave"'),
            ('"../var/sim/data"', '"data"'),
            ('"../triggers"', f'"{ROOT / "triggers"}"'),
            ('host = "127.0.0.2"', f'host = "{self.hosts[0]}"'),
            ('host = "127.0.0.3"', f'host = "{self.hosts[1]}"'),
            ("port = 8080", f"port = {self.bridge_port}"),
        ):
            assert old in text, old
            text = text.replace(old, new)
        return text

    def listen(self, host: str, port: int) -> None:
        """Keep host:port bound for the test: a port in use."""
        sock = self.held.enter_context(socket.socket())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)


def replace(old: str, new: str, count: int = 1) -> Callable[[Base, str], str]:
    def edit(base: Base, text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)

    return edit


def card_key(key_line: str, card: int = 0) -> Callable[[Base, str], str]:
    """Add a line to the main table of the card'th [[cards]]."""

    def edit(base: Base, text: str) -> str:
        host = f'host = "{base.hosts[card]}"\n'
        return text.replace(host, host + key_line + "\n")

    return edit


def couchdb(url: str, extra: str = "") -> Callable[[Base, str], str]:
    table = f'\n[archive.couchdb]\nurl = {url}\ndb = "runs"\n{extra}\n'
    return then(
        replace('backend = "sqlite"', 'backend = "couchdb"'),
        replace('on_counter_error = "stop"\n', 'on_counter_error = "stop"\n' + table),
    )


def a_file(base: Base, text: str) -> str:
    (base.dir / "afile").write_text("a file where a directory must be")
    return text


def bad_trigger(base: Base, text: str) -> str:
    (base.dir / "trig").mkdir()
    (base.dir / "trig" / "broken.py").write_text("class T(Trigger):\n    def trigger(self v):\n")
    return text.replace(f'"{ROOT / "triggers"}"', '"trig"')


def bridge_port_in_use(base: Base, text: str) -> str:
    base.listen("127.0.0.1", base.bridge_port)
    return text


def stream_port_in_use(base: Base, text: str) -> str:
    base.listen(base.hosts[0], 4210)
    return text


def then(*edits: Callable[[Base, str], str]) -> Callable[[Base, str], str]:
    def edit(base: Base, text: str) -> str:
        for e in edits:
            text = e(base, text)
        return text

    return edit


# (id, edit of the base text, key named, words of the reason)
VARIANTS = [
    ("not-utf8", replace("# The simulated", "# The sim\udcff"), "<encoding>", "UTF-8"),
    ("nan", replace("min_sample_rate_hz = 5000.0", "min_sample_rate_hz = nan"),
     "ioc.min_sample_rate_hz", "finite"),
    ("inf", replace("display_rate_hz = 10.0", "display_rate_hz = inf"),
     "ioc.display_rate_hz", "finite"),
    ("card-timeout-nan", replace("timeout_s = 5.0", "timeout_s = nan"),
     "cards[0].timeout_s", "finite"),
    ("sites-bool", card_key("sites = [true]"), "cards[0].sites[0]", "integer"),
    ("sites-repeat", card_key("sites = [1, 1]"), "cards[0].sites", "repeat"),
    ("gains-bool", replace('part_num = "ACQ425ELF-16-1000-16"',
                           'part_num = "x"\ngains = [true]'),
     "cards[0].sim.sites[0].gains[0]", "integer"),
    ("gain-code", replace('part_num = "ACQ425ELF-16-1000-16"', 'part_num = "x"\ngains = [7]'),
     "cards[0].sim.sites[0].gains[0]", "gain code"),
    ("unknown-module", replace('module = "ACQ425ELF"', 'module = "ACQ999"'),
     "cards[0].sim.sites[0].module", "unknown module"),
    ("module-not-simulated", card_key('modules = { 1 = "ACQ437ELF" }'),
     "cards[0].modules.1", "simulated site 1 is a ACQ425ELF"),
    ("interfaces-empty", replace('interfaces = ["127.0.0.1"]', "interfaces = []"),
     "ioc.interfaces", "empty"),
    ("interfaces-type", replace('interfaces = ["127.0.0.1"]', "interfaces = [1]"),
     "ioc.interfaces[0]", "string"),
    ("interface-garbage", replace('interfaces = ["127.0.0.1"]', 'interfaces = ["eth0"]'),
     "ioc.interfaces[0]", "not an IP address"),
    ("interface-not-here", replace('interfaces = ["127.0.0.1"]', 'interfaces = ["192.0.2.7"]'),
     "ioc.interfaces[0]", "not an address of this host"),
    ("ioc-name-path", replace('name = "sim"', 'name = "../sim"'), "ioc.name", "letters"),
    ("readout-mode", replace("display_rate_hz = 10.0", 'display_rate_hz = 10.0\nreadout = "fork"'),
     "ioc.readout", "must be one of ('process', 'thread')"),
    ("bridge-host-garbage", replace('host = "127.0.0.1"', 'host = "not a host!"'),
     "bridge.host", "neither an IP address nor a host name"),
    ("bridge-host-not-here", replace('host = "127.0.0.1"', 'host = "192.0.2.7"'),
     "bridge.host", "not an address of this host"),
    ("bridge-port-range", lambda b, t: t.replace(f"port = {b.bridge_port}", "port = 70000"),
     "bridge.port", "out of 1..65535"),
    ("bridge-port-in-use", bridge_port_in_use, "bridge.port", "in use"),
    ("bridge-port-is-ca", lambda b, t: t.replace(
        f"port = {b.bridge_port}", f"port = {os.environ['EPICS_CA_SERVER_PORT']}"),
     "bridge.port", "Channel Access"),
    ("legacy-port-is-port", lambda b, t: t.replace(
        f"port = {b.bridge_port}", f"port = {b.bridge_port}\nlegacy_port = {b.bridge_port}"),
     "bridge.legacy_port", "also bridge.port"),
    ("token-empty", replace('tokens = [{ env = "DTACQ_BRIDGE_TOKEN" }]', 'tokens = [""]'),
     "bridge.tokens[0]", "must not be empty"),
    ("tokens-type", replace('tokens = [{ env = "DTACQ_BRIDGE_TOKEN" }]', "tokens = [1]"),
     "bridge.tokens[0]", "string"),
    ("card-host-garbage", lambda b, t: t.replace(b.hosts[0], "999.1.1.1"),
     "cards[0].host", "not a valid IP address"),
    ("card-host-spaces", lambda b, t: t.replace(b.hosts[0], "digitizer 1"),
     "cards[0].host", "neither an IP address nor a host name"),
    ("card-host-repeated", lambda b, t: t.replace(b.hosts[1], b.hosts[0]),
     "cards[1].host", "also the host of card SIM1"),
    ("sim-host-not-here", lambda b, t: t.replace(b.hosts[0], "192.0.2.7"),
     "cards[0].host", "not an address of this host"),
    ("knob-port-overflow", card_key("knob_port_base = 65535"),
     "cards[0].knob_port_base", "past port 65535"),
    ("stream-port-is-knob", card_key("stream_port = 4221"), "cards[0].stream_port", "knob port"),
    ("stream-port-in-use", stream_port_in_use, "cards[0].stream_port", "in use"),
    ("prefix-overlap", replace('prefix = "DTACQ:SIM2:"', 'prefix = "DTACQ:SIM1:1:"'),
     "cards[1].prefix", "overlaps card SIM1's prefix"),
    ("ioc-prefix-overlap", replace('name = "sim"', 'name = "sim"\nprefix = "DTACQ:"'),
     "ioc.prefix", "overlaps card SIM1's prefix"),
    ("data-dir-under-file", then(a_file, replace('data_dir = "data"', 'data_dir = "afile/d"')),
     "archive.data_dir", "is a file"),
    ("data-dir-read-only", replace('data_dir = "data"', 'data_dir = "/sys/dtacq-data"'),
     "archive.data_dir", "not writable"),
    ("spool-dir-under-file", then(a_file, replace('data_dir = "data"',
                                                  'data_dir = "data"\nspool_dir = "afile/s"')),
     "archive.spool_dir", "is a file"),
    ("spool-dir-read-only", replace('data_dir = "data"', 'data_dir = "data"\nspool_dir = "/sys/s"'),
     "archive.spool_dir", "not writable"),
    ("autosave-dir-read-only", replace('autosave_dir = "autosave"', 'autosave_dir = "/sys/kernel"'),
     "ioc.autosave_dir", "not writable"),
    ("trigger-dir-missing", lambda b, t: t.replace(f'"{ROOT / "triggers"}"', '"no-such-dir"'),
     "ioc.trigger_dir", "not a directory"),
    ("trigger-file-broken", bad_trigger, "ioc.trigger_dir", "broken.py"),
    ("couchdb-url-malformed", couchdb('"htp:/nowhere"'), "archive.couchdb.url", "http://"),
    ("couchdb-url-port", couchdb('"http://db:99999/"'), "archive.couchdb.url", "does not parse"),
    ("couchdb-url-env-malformed", couchdb('{ env = "TEST_BAD_DB_URL" }'),
     "archive.couchdb.url", "from TEST_BAD_DB_URL"),
    ("couchdb-url-env-unset", couchdb('{ env = "TEST_UNSET_DB_URL" }'),
     "archive.couchdb.url", "TEST_UNSET_DB_URL is not set"),
    ("file-server-malformed", couchdb('"http://db:5984"', 'file_server = "files.example"'),
     "archive.couchdb.file_server", "http://"),
]  # fmt: skip


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dtacq_ioc", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def base(tmp_path, loopback) -> Iterator[Base]:
    with contextlib.ExitStack() as held:
        yield Base(tmp_path, (loopback, random_loopback()), free_port(), held)


def test_the_private_sim_toml_passes_check(base):
    path = base.dir / "sim.toml"
    path.write_text(base.text())
    res = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode, res.stderr) == (0, "")


@pytest.mark.parametrize(
    ("edit", "key", "words"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_check_and_run_refuse_a_broken_config_with_one_line(base, edit, key, words):
    path = base.dir / "sim.toml"
    # A lone surrogate stands for a byte that is not UTF-8 (the encoding variant).
    path.write_bytes(edit(base, base.text()).encode("utf-8", "surrogateescape"))
    env = child_env(TEST_BAD_DB_URL="http//db:5984", DTACQ_BRIDGE_TOKEN="t")
    env.pop("TEST_UNSET_DB_URL", None)
    # Both at once: the machine is shared, and each only parses and probes.
    procs = {name: cli(name, str(path), env=env) for name in ("check", "run")}
    results = {name: (p.communicate(timeout=60), p.returncode) for name, p in procs.items()}
    (_, err), code = results["check"]
    assert code == 2, err
    line = err.rstrip("\n")
    assert "\n" not in line and line.startswith(f"{path}: {key}: "), err
    assert words in line.split(": ", 2)[2], line
    (run_out, run_err), run_code = results["run"]
    # The same line and nothing else: nothing was started, nothing was made.
    assert (run_code, run_err, run_out) == (2, err, "")
    assert not (base.dir / "data").exists() and not (base.dir / "autosave").exists()


def test_file_only_commands_do_not_probe_the_machine(base):
    """`runs list` reads the catalog: a port in use or a missing trigger_dir is not its business."""
    path = base.dir / "sim.toml"
    path.write_text(base.text().replace(f'"{ROOT / "triggers"}"', '"no-such-dir"'))
    base.listen("127.0.0.1", base.bridge_port)
    res = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "runs", "list", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


def test_systemd_does_not_restart_on_a_config_error():
    unit = (ROOT / "ioc_configs" / "systemd" / "dtacq-ioc@.service").read_text().splitlines()
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=2" in unit


def test_the_bridge_alone_is_refused_a_port_in_use_though_run_would_not_start_it(base):
    path = base.dir / "sim.toml"
    path.write_text(base.text().replace("enabled = true", "enabled = false"))
    base.listen("127.0.0.1", base.bridge_port)
    res = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "bridge", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr == f"{path}: bridge.port: port {base.bridge_port} on 127.0.0.1 is in use\n"
    res = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode, res.stderr) == (0, "")  # `run` would not start the bridge


def test_legacy_write_hosts_are_addresses_or_networks():
    card = '[[cards]]\nname="A"\nhost="h"\nprefix="A:"\n[cards.modules]\n1="ACQ425ELF"\n'
    text = '[bridge]\nlegacy_write_hosts = ["192.168.1.113", "10.1.0.0/16", "::1"]\n'
    cfg = parse_config(text + card, Path("x.toml"))
    assert cfg.bridge.legacy_write_hosts == ("192.168.1.113", "10.1.0.0/16", "::1")
    assert parse_config(card, Path("x.toml")).bridge.legacy_write_hosts == ()  # off by default
    with pytest.raises(ConfigError) as err:
        parse_config('[bridge]\nlegacy_write_hosts = ["control-room"]\n' + card, Path("x.toml"))
    assert err.value.lines == [
        "x.toml: bridge.legacy_write_hosts[0]: 'control-room' is not an IP address or network"
    ]


def test_a_ca_port_the_kernel_may_give_a_client_is_warned_of():
    ephemeral = ephemeral_ports()
    inside = ca_port_caveat({"EPICS_CA_SERVER_PORT": str(ephemeral.start + 5)})
    assert inside is not None and f"port {ephemeral.start + 5} " in inside, inside
    assert f"below {ephemeral.start}" in inside
    # EPICS_CAS_SERVER_PORT is the one the server binds when both are set.
    both = {"EPICS_CAS_SERVER_PORT": "5064", "EPICS_CA_SERVER_PORT": str(ephemeral.start)}
    assert ca_port_caveat(both) is None
    assert ca_port_caveat({}) is None
    assert free_port() not in ephemeral  # the tests' own servers keep clear of it too
