"""The simulated knob server, byte for byte, over raw sockets."""

from __future__ import annotations

import socket
import time

import pytest
from sim_helpers import TIMEOUT, Knobs, sim_card

SECOND_SITE = """
[[cards.sim.sites]]
site = 2
module = "ACQ425ELF"
"""


@pytest.fixture
def card(tmp_path, loopback):
    with sim_card(tmp_path, loopback, sim_extra='serial = "CE4160042"') as c:
        yield c


def test_no_banner_and_the_exact_prompt(card, loopback):
    with socket.create_connection((loopback, 4220), timeout=TIMEOUT) as s:
        s.sendall(b"prompt on\n")
        got = b""
        while not got.endswith(b">"):
            got += s.recv(100)
        # Nothing before the reply: the set's empty line, then the prompt without newline.
        assert got == b"\nacq400.0 0 >"
        s.sendall(b"\n")  # an empty line is answered by the prompt alone
        got = b""
        while not got.endswith(b">"):
            got += s.recv(100)
        assert got == b"acq400.0 0 >"
        s.sendall(b"MODEL\r\n")
        got = b""
        while not got.endswith(b">"):
            got += s.recv(100)
        assert got == b"acq2106\nacq400.0 0 >"


def test_query_and_set_forms(card, loopback):
    with Knobs(loopback, 0) as k:
        assert k.value("MODEL") == "acq2106"
        assert k.value("SERIAL") == "CE4160042"
        assert k.value("SIG:CLK_MB:FREQ") == "SIG:CLK_MB:FREQ 100000000.000"  # PV style
        assert k.ask("spad1=0x11") == ""
        assert k.value("spad1") == "0x00000011"
        assert k.ask("spad1 22") == ""
        assert k.value("spad1") == "0x00000022"
        assert k.ask("spad1 = = 33") == ""  # any run of '=' and spaces is skipped
        assert k.value("spad1") == "0x00000033"
        assert k.ask("transient=PRE=0 POST=1000") == ""
        assert k.value("transient") == "PRE=0 POST=1000 OSAM=1 DEMUX=1 SOFT_TRIGGER=1"
        assert k.status == 0


def test_semicolons_give_one_reply_per_command_and_one_prompt(card, loopback):
    with Knobs(loopback, 0) as k:
        raw = k.exchange("MODEL;HN;spad2=5;spad2")
        assert raw == b"acq2106\nacq2106_042\n\n0x00000005\nacq400.0 0 >"


def test_globs(card, loopback):
    with Knobs(loopback, 0) as k:
        assert k.ask("SIG:*:FREQ").split("\n") == [
            "SIG:CLK_MB:FREQ 100000000.000",
            "SIG:CLK_EXT:FREQ 0.000",
            "SIG:CLK_S1:FREQ 1000000.000",
        ]
        k.set("spad3", "abc")
        lines = k.ask("spad[0-3]").split("\n")
        assert lines == ["spad0 0x00000000", "spad1 0x00000000", "spad2 0x00000000",
                         "spad3 0x00000abc"]  # fmt: skip
        assert k.ask("spad") == "1,2,0"  # an exact name is not a glob over spad*
        assert k.ask("nothing*") == 'ERROR:nothing*" not found'


def test_help_and_helpA_list_what_hapi_needs(card, loopback):
    with Knobs(loopback, 0) as k0, Knobs(loopback, 1) as k1:
        names = k0.ask("help").split("\n")
        for needed in ("SITELIST", "aggregator", "distributor", "run0", "spad", "transient",
                       "set_arm", "SIM:DROP"):  # fmt: skip
            assert needed in names
        assert "help" not in names and "prompt" not in names
        assert k0.ask("help SIG:CLK*").split("\n") == [
            "SIG:CLK_MB:FREQ", "SIG:CLK_MB:SET", "SIG:CLK_MB:FIN", "SIG:CLK_EXT:FREQ",
            "SIG:CLK_S1:FREQ",
        ]  # fmt: skip
        access = dict(line.split(" : ") for line in k0.ask("helpA").split("\n"))
        assert access["NCHAN"] == "r" and access["spad"] == "rw" and access["SIM:SENT"] == "r"
        site_names = k1.ask("help").split("\n")
        for needed in ("clkdiv", "module_name", "module_role", "gain1", "GAIN:16", "AI:CAL:ESLO"):
            assert needed in site_names


def test_errors_and_the_prompt_flag(card, loopback):
    with Knobs(loopback, 0) as k0, Knobs(loopback, 1) as k1:
        assert k0.ask("NCHAN=4") == 'ERROR: "NCHAN" is read-only'
        assert k0.status == 1
        assert k0.ask("NCHAN") == "20" and k0.status == 0
        assert k1.ask("gain1=5") == "ERROR: NumericValidator 5 not in range 0,3"
        assert k1.status == 1
        assert k1.ask("clkdiv=10") == "ERROR: NumericValidator 10 not in range 50,65535"
        assert k1.ask("foo") == 'ERROR:foo" not found'
        assert k1.status == 0  # an unknown knob leaves the flag at 0
        assert k0.ask("transient=POST=10 BOGUS=1") == "ERROR: BOGUS=1 not supported"
        assert k0.value("transient").startswith("PRE=0 POST=2000 ")  # nothing half-applied


def test_over_long_line_is_refused_and_the_session_goes_on(card, loopback):
    with Knobs(loopback, 0) as k:
        assert k.ask("x" * 5000) == "ERROR: line longer than 4096 bytes"
        assert k.value("MODEL") == "acq2106"


def test_prompt_off_gives_one_line_per_command(card, loopback):
    with Knobs(loopback, 1, prompt=False) as k, Knobs(loopback, 1) as other:
        k.sock.sendall(b"clkdiv=200\nclkdiv\nMODEL;NCHAN\n")
        assert k.lines(4) == ["", "200", "ACQ425ELF", "16"]
        # The prompt flag belongs to each connection.
        assert other.value("clkdiv") == "200"


def test_identity_as_hapi_reads_it(card, loopback):
    with Knobs(loopback, 0) as k0:
        sitelist = k0.value("SITELIST").split(",")
        assert sitelist[1:] == ["1=425"]  # the first field is not a site
        for knob in ("aggregator", "distributor"):
            fields = dict(f.split("=", 1) for f in k0.value(knob).split() if "=" in f)
            assert fields["sites"] == ("1" if knob == "aggregator" else "none")
        assert k0.value("fpga_version").split()[0].startswith("ACQ2106_TOP_05_")
        assert k0.value("HN") == "acq2106_042"
        assert k0.value("software_version").startswith("acq400-")
        assert k0.value("aggregator").split(" ")[1] == "sites=1"  # HAPI takes field 1
        assert [int(x) for x in k0.value("state").split(" ")] == [0, 0, 0, 0, 0]
        # HAPI's factory: no TIGA, no comms sites to open.
        assert [k0.value(n) for n in ("is_tiga", "has_mgt", "has_dsp", "has_wr")] == ["none"] * 4
    with Knobs(loopback, 1) as k1:
        assert k1.value("module_name") == "acq425elf"
        assert k1.value("module_role") == "MASTER"
        assert k1.value("MODEL") == "ACQ425ELF"
        assert k1.value("PART_NUM") == "ACQ425ELF-16-2000-16"
        assert k1.value("data32") == "0" and k1.value("word_size") == "2"
        assert k1.value("sysclkhz") == "100000000"


def test_run0_arithmetic_acq425(card, loopback):
    with Knobs(loopback, 0) as k:
        assert k.ask("run0 1 1,2,0") == ""
        assert (k.value("NCHAN"), k.value("ssb"), k.value("spadstart")) == ("20", "40", "32")
        assert k.value("sites") == "1"
        assert "sites=1 " in k.value("run0") and "spad=1,2,0" in k.value("run0")
        k.set("spad", "0,8,0")
        k.set("run0", "1")
        assert (k.value("NCHAN"), k.value("ssb"), k.value("spadstart")) == ("16", "32", "32")
        assert k.ask("run0 3") == "ERROR: run0: site '3' has no module"
        assert k.ask("spad=1,17,0") == "ERROR: NumericValidator 17 not in range 1,16"


def test_run0_arithmetic_acq437_and_two_sites(tmp_path, loopback):
    with (
        sim_card(tmp_path, loopback, module="ACQ437ELF", carrier="acq1001"),
        Knobs(loopback, 0) as k,
    ):
        k.set("run0", "1 1,2,0")
        assert (k.value("NCHAN"), k.value("ssb"), k.value("spadstart")) == ("18", "72", "64")
        assert k.value("data32") == "1"
        assert k.value("MODEL") == "acq1001"
        with Knobs(loopback, 1) as k1:
            assert k1.value("hi_res_mode") == "0"
            assert k1.ask("clkdiv=2") == "ERROR: NumericValidator 2 not in range 4,255"
            assert k1.value("GAIN:ALL") == "GAIN:ALL 10V"
            assert k1.ask("data32=0") == 'ERROR: "data32" is read-only'


def test_two_sites_aggregate_in_site_order(tmp_path, loopback):
    with sim_card(tmp_path, loopback, site_extra=SECOND_SITE), Knobs(loopback, 0) as k:
        assert k.value("sites") == "1,2"  # a booted card has run0 done for its sites
        assert k.value("SITELIST").split(",")[1:] == ["1=425", "2=425"]
        assert (k.value("NCHAN"), k.value("ssb")) == ("36", "72")
        k.set("run0", "2")
        assert k.value("sites") == "2"
        with Knobs(loopback, 2) as k2:
            assert k2.value("module_role") == "SLAVE"


def test_spad_bit_forms(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("spad4", "11111111")
        assert k.value("spad4") == "0x11111111"
        k.set("spad4", "-0x11")
        assert k.value("spad4") == "0x11111100"
        k.set("spad4", "+f")
        assert k.value("spad4") == "0x1111110f"
        assert k.ask("spad0=1") == 'ERROR: "spad0" is read-only'


def test_gains(card, loopback):
    with Knobs(loopback, 1) as k:
        assert k.value("gains") == "0" * 16
        k.set("gain3", 2)
        assert k.value("gains") == "0020" + "0" * 12
        assert k.value("GAIN:03") == "GAIN:03 2.5V"
        k.set("GAIN:04", "5V")
        k.set("gains", "1-x3" + "-" * 12)
        assert k.value("gains") == "1023" + "0" * 12
        slopes = k.value("AI:CAL:ESLO").split()
        assert slopes[:3] == ["AI:CAL:ESLO", "17", "0"]
        assert float(slopes[3]) == pytest.approx(5.0 / 32768, rel=1e-5)
        assert float(slopes[4]) == pytest.approx(10.0 / 32768, rel=1e-5)
        k.set("gain", 3)
        assert k.value("gains") == "3" * 16 and k.value("GAIN:ALL") == "GAIN:ALL 1.25V"


def test_external_clock(tmp_path, loopback):
    with (
        sim_card(tmp_path, loopback, sim_extra="ext_clock_hz = 2000000.0"),
        Knobs(loopback, 0) as k0,
        Knobs(loopback, 1) as k1,
    ):
        assert k0.value("SIG:CLK_MB:FIN") == "SIG:CLK_MB:FIN 33333000"
        k0.set("fpmux", "fpclk")
        k1.set("clk", "1,0,1")
        assert k1.value("clk") == "1,0,1"
        assert k0.value("SIG:CLK_MB:FREQ") == "SIG:CLK_MB:FREQ 2000000.000"
        assert k0.value("SYS:CLK:FPMUX") == "SYS:CLK:FPMUX FPCLK"
        assert k1.ask("clk=2,0,1").startswith("ERROR: clk:")
        k0.set("SYS:CLK:FPMUX", "XCLK")
        assert k0.value("fpmux") == "xclk"
        assert k0.value("SIG:CLK_MB:FIN") == "SIG:CLK_MB:FIN 32768000"


def test_hapi_set_mb_clk_sequence(card, loopback):
    with Knobs(loopback, 0) as k0, Knobs(loopback, 1) as k1:
        for knob, value in (
            ("SIG:ZCLK_SRC", "INT33M"),
            ("SYS:CLK:FPMUX", "FPCLK"),
            ("SIG:CLK_MB:FIN", 10_000_000),
            ("SIG:CLK_MB:SET", 50_000_000),
        ):
            k0.set(knob, value)
        k1.set("CLKDIV", 100)
        k0.set("SIG:SRC:TRG:0", "EXT")
        k0.set("SIG:SRC:TRG:1", "STRIG")
        assert k0.value("SIG:SRC:TRG:1") == "SIG:SRC:TRG:1 STRIG"
        assert k0.value("SIG:CLK_MB:FIN") == "SIG:CLK_MB:FIN 10000000"
        assert k0.value("SIG:CLK_MB:SET") == "SIG:CLK_MB:SET 50000000"
        assert k1.value("clkdiv") == "100"
        k0.set("fpmux", "zclk")  # a new source: FIN follows it again
        assert k0.value("SIG:CLK_MB:FIN") == "SIG:CLK_MB:FIN 33333000"


def test_lia_firmware(tmp_path, loopback):
    with sim_card(tmp_path, loopback, sim_extra="lia = true"), Knobs(loopback, 0) as k:
        assert k.value("fpga_version").split()[0].endswith("_LIA")
        assert k.value("NCHAN") == "84"  # 80 lock-in words + 2 spad words in 16-bit slots


def test_knob_delay_fault(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("SIM:KNOB_DELAY", 0.3)
        t0 = time.monotonic()
        assert k.value("MODEL") == "acq2106"
        assert time.monotonic() - t0 >= 0.29
        k.set("SIM:KNOB_DELAY", 0)
        assert k.value("SIM:KNOB_DELAY") == "SIM:KNOB_DELAY 0"
        assert k.ask("SIM:KNOB_DELAY=soon") == "ERROR: SIM:KNOB_DELAY: 'soon' is not a number"


def test_fault_knobs_take_config_defaults(tmp_path, loopback):
    faults = "drop_every_samples = 100\ndrop_count = 3\nnot_ready = true\nreboot_s = 2.5"
    with sim_card(tmp_path, loopback, faults=faults), Knobs(loopback, 0) as k:
        assert k.value("SIM:DROP") == "SIM:DROP 100,3"
        assert k.value("SIM:NOT_READY") == "SIM:NOT_READY 1"
        assert k.value("SIM:REBOOT") == "SIM:REBOOT 2.5"
        assert k.value("SIM:SENT") == "SIM:SENT 0"
        assert k.ask("SIM:DROP=5,0") == "ERROR: NumericValidator 0 not in range 1,2147483647"
        assert k.ask("SIM:NOT_READY=2") == "ERROR: SIM:NOT_READY: '2' is not 0 or 1"
