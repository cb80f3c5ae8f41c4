from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from dtacq_ioc.config import ConfigError, load_config, parse_config


def test_default_and_production_configs_load():
    sim = load_config(ROOT / "ioc_configs" / "sim.toml")
    assert [c.name for c in sim.cards] == ["SIM1", "SIM2"]
    assert sim.card("SIM1").host == "127.0.0.2" and sim.card("SIM1").prefix == "DTACQ:SIM1:"
    assert sim.card("SIM1").sim.sites[0].module == "ACQ425ELF"
    assert sim.card("SIM2").sim.carrier == "acq1001"
    assert sim.card("SIM2").sim.sites[0].module == "ACQ437ELF"
    prod = load_config(ROOT / "ioc_configs" / "nedm1.toml")
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
        load_config(bad)
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
    ok = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "check", str(ROOT / "ioc_configs" / "sim.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
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
