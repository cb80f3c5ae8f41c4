"""Card: identification, clock/gain/hi-res settings, stream layout, reset, reboot over SSH."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace

import pytest
from card_helpers import card_config, connected, simulated

from dtacq_ioc.card.card import Card, parse_sitelist, parse_sites
from dtacq_ioc.card.errors import CardError, KnobError, SettingRefused
from dtacq_ioc.card.ssh import SshClient
from dtacq_ioc.config import Secret

TWO_SITES = """
[[cards.sim.sites]]
site = 2
module = "ACQ425ELF"
"""


@pytest.fixture
def acq425(tmp_path, loopback):
    config = card_config(tmp_path, loopback)
    with simulated(config), connected(config) as card:
        yield card


@pytest.fixture
def acq437(tmp_path, loopback):
    config = card_config(tmp_path, loopback, module="ACQ437ELF", carrier="acq1001")
    with simulated(config), connected(config) as card:
        yield card


def test_sitelist_and_sites_parsing():
    assert parse_sitelist("216,1=480,2=480") == (1, 2)
    assert parse_sitelist("1001,1=437") == (1,)
    assert parse_sites("1,2") == (1, 2)
    assert parse_sites("none") == ()


def test_identify_acq425_on_acq2106(tmp_path, loopback):
    config = card_config(tmp_path, loopback, site_extra='part_num = "ACQ425ELF-16-1000-16"')
    with simulated(config), connected(config) as card:
        info = card.info
    assert info is not None
    assert info.model == "acq2106"
    assert info.hostname and info.serial and info.software_version.startswith("acq400")
    assert info.fpga_version.startswith("ACQ2106_TOP") and not info.lia
    assert list(info.sites) == [1] and info.aggregated == (1,)
    site = info.sites[1]
    assert (site.model, site.spec.name, site.nchan, site.data32, site.word_size) == (
        "ACQ425ELF",
        "ACQ425ELF",
        16,
        False,
        2,
    )
    assert site.part_num == "ACQ425ELF-16-1000-16" and site.serial


def test_identify_acq437_on_acq1001(acq437):
    info = acq437.info
    assert info.model == "acq1001"
    site = info.sites[1]
    assert (site.spec.name, site.nchan, site.data32, site.word_size) == ("ACQ437ELF", 16, True, 4)


def test_identify_the_lia_firmware(tmp_path, loopback):
    config = card_config(tmp_path, loopback, sim_extra="lia = true")
    with simulated(config), connected(config) as card:
        info = card.info
        assert info.fpga_version.split()[0].endswith("_LIA") and info.lia
        site = info.sites[1]
        assert site.model == "ACQ425ELF" and site.spec.name == "ACQ425ELF-LIA"
        with pytest.raises(SettingRefused, match="fixed clock divider"):
            card.set_clkdiv(200)
        # LIA: fixed clkdiv 100, divider 128
        assert card.sample_rate_hz() == pytest.approx(100e6 / (100 * 128))


def test_two_sites_aggregate_into_one_layout(tmp_path, loopback):
    config = card_config(tmp_path, loopback, site_extra=TWO_SITES)
    with simulated(config), connected(config) as card:
        assert sorted(card.info.sites) == [1, 2]
        assert card.set_clkdiv(250) == 250
        assert card.knob(2).query("clkdiv") == "250", "clkdiv goes to every aggregated site"
        layout = card.configure_stream([1, 2])
        assert (layout.sites, layout.nchan, layout.sample_bytes) == ((1, 2), (16, 16), 72)
        assert card.knob(0).query("NCHAN") == "36"


def test_clkdiv_round_trip_and_refusals(acq425):
    assert acq425.set_clkdiv(400) == 400
    assert acq425.clkdiv() == 400
    assert acq425.sample_rate_hz() == pytest.approx(100e6 / 400)
    with pytest.raises(SettingRefused, match=r"DIG: clkdiv: site 1: clkdiv 10 out of 50\.\.65535"):
        acq425.set_clkdiv(10)
    # SettingRefused, not KnobError: the driver refused it; the card never saw it
    assert acq425.clkdiv() == 400
    # the card's own validator answers what the driver's check lets through directly
    with pytest.raises(KnobError, match=r"DIG site 1: clkdiv: ERROR"):
        acq425.knob(1).set("clkdiv", 0)


def test_external_and_internal_clock(acq425):
    assert acq425.external_clock() is None
    acq425.set_clkdiv(100)
    acq425.set_external_clock(2_000_000.0)
    assert acq425.knob(0).query("fpmux") == "fpclk"
    assert acq425.knob(1).query("clk") == "1,0,1"
    assert acq425.external_clock() == 2_000_000.0
    assert acq425.sample_rate_hz() == pytest.approx(20_000.0)
    acq425.set_external_clock(None)
    assert acq425.knob(0).query("fpmux") == "xclk"
    assert acq425.knob(1).query("clk") == "0,0,0"
    assert acq425.external_clock() is None
    with pytest.raises(SettingRefused, match="must be > 0"):
        acq425.set_external_clock(-1.0)


def test_gains_round_trip_and_refusals(acq425):
    assert acq425.gains(1) == [0] * 16
    acq425.set_gain(1, 3, 2)
    assert acq425.gains(1)[2] == 2
    assert acq425.knob(1).query("gain3") == "2"
    acq425.set_all_gains(1, 1)
    assert acq425.gains(1) == [1] * 16
    with pytest.raises(SettingRefused, match=r"code 7 not in 0\.\.3 for ACQ425ELF"):
        acq425.set_gain(1, 1, 7)
    with pytest.raises(SettingRefused, match=r"channel 17 not in 1\.\.16"):
        acq425.set_gain(1, 17, 1)
    with pytest.raises(SettingRefused, match="site 4: no AI module"):
        acq425.set_all_gains(4, 1)
    assert acq425.gains(1) == [1] * 16


def test_hi_res_and_the_minimum_sample_rate(acq437):
    assert acq437.hi_res() is False
    assert acq437.sample_rate_hz() == pytest.approx(33_333_000 / (8 * 256))
    acq437.set_hi_res(True)
    assert acq437.hi_res() is True
    assert acq437.sample_rate_hz() == pytest.approx(33_333_000 / (8 * 512))
    with pytest.raises(SettingRefused, match=r"clkdiv 32: 2034.\d+ Hz is below the minimum 5000"):
        acq437.set_clkdiv(32)  # 2 kHz in hi-res mode: refused before it is sent
    assert acq437.clkdiv() == 8
    acq437.set_hi_res(False)
    acq437.set_clkdiv(16)  # 8.1 kHz
    acq437.set_hi_res(True)  # halves it: 4.1 kHz, reached without a clkdiv put
    with pytest.raises(SettingRefused, match=r"sample rate: 4068\.97 Hz is below the minimum 5000"):
        acq437.check_sample_rate()
    layout = acq437.configure_stream()
    with pytest.raises(SettingRefused, match="below the minimum"):
        acq437.open_stream(layout, 100, lambda s: None, lambda e: None)


def test_acq425_has_no_hi_res(acq425):
    assert acq425.hi_res() is False
    with pytest.raises(SettingRefused, match="no ACQ43x site"):
        acq425.set_hi_res(True)


def test_configure_stream_sets_spad_and_checks_the_layout(acq437):
    layout = acq437.configure_stream()
    assert (layout.sites, layout.nchan, layout.word_size) == ((1,), (16,), 4)
    assert (layout.sample_bytes, layout.card_nchan) == (72, 18)
    k0 = acq437.knob(0)
    assert k0.query("spad") == "1,2,0"
    assert k0.query("ssb") == "72"
    assert "sites=1" in k0.query("aggregator")


def test_reset_readout_jump_starts_and_restores_the_layout(acq425):
    layout = acq425.configure_stream()
    k0 = acq425.knob(0)
    k0.set("spad", "1,4,0")
    t0 = time.monotonic()
    acq425.reset_readout()
    assert time.monotonic() - t0 >= 0.6  # two passes with 0.3 s pauses
    assert k0.query("spad") == "1,2,0"
    assert k0.query("ssb") == str(layout.sample_bytes)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_reboot_over_ssh_and_reconnect(tmp_path, loopback):
    config = card_config(tmp_path, loopback, faults="reboot_s = 1.5")
    with simulated(config), connected(config) as card:
        card.set_clkdiv(300)
        card.reboot()
        deadline = time.monotonic() + 10
        while _port_open(loopback, 4221):
            assert time.monotonic() < deadline, "knob port stayed up after reboot"
            time.sleep(0.05)
        info = card.wait_ready(20)
        assert info.sites[1].spec.name == "ACQ425ELF"
        assert card.clkdiv() == 100, "a rebooted card is back at its power-on clkdiv"
        assert card.set_clkdiv(300) == 300


def test_ssh_run_and_host_key_policies(tmp_path, loopback, caplog):
    config = card_config(tmp_path, loopback)
    ssh_cfg = config.cards[0].ssh
    known = tmp_path / "known_hosts"
    with simulated(config):
        with pytest.raises(CardError, match=r"DIG: ssh root@.*not found in known_hosts"):
            SshClient(loopback, replace(ssh_cfg, host_key_policy="reject"), card="DIG").run(
                "hostname"
            )
        with caplog.at_level(logging.WARNING, logger="dtacq_ioc.card.ssh"):
            status, _ = SshClient(loopback, replace(ssh_cfg, host_key_policy="warn")).run(
                "hostname"
            )
        assert status == 0 and any("policy warn" in m for m in caplog.messages)
        # auto-add records the key; reject then accepts that known host
        learn = replace(ssh_cfg, host_key_policy="auto-add", known_hosts=known)
        status, output = SshClient(loopback, learn).run("hostname")
        assert status == 0 and output.strip() and known.exists()
        strict = replace(learn, host_key_policy="reject")
        assert SshClient(loopback, strict).run("hostname")[0] == 0
        bad = replace(strict, password=Secret(literal="wrong-secret"))
        with pytest.raises(CardError, match="Authentication") as err:
            SshClient(loopback, bad, card="DIG").run("hostname")
        assert "wrong-secret" not in str(err.value)
        assert not any("wrong-secret" in r.getMessage() for r in caplog.records)


def test_card_without_connect_says_so(tmp_path, loopback):
    card = Card(card_config(tmp_path, loopback).cards[0])
    with pytest.raises(CardError, match="not connected"):
        card.clkdiv()
