"""SITES, the modules the card's stream aggregates: a setpoint on a simulated two-site
ACQ2106, put with caproto's sync client, seen on the card, the display and a run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType, ErrorResponseReceived
from caproto.sync.client import read as ca_read
from caproto.sync.client import write as ca_write
from ioc_support import caget, castr, ioc_process, ioc_toml, new_prefix, wait_for
from support import output

from dtacq_ioc.archive.dig import read_run
from dtacq_ioc.card.knobs import KnobClient
from dtacq_ioc.contract import SPAD_BYTES, SPAD_WORDS

# Channel 1 of each site holds a level of its own, so a value shows which site it came from.
SITE1_V, SITE2_V = -3.0, 4.0
TWO_SITES = f"""signals = [{{kind = "dc", offset_v = {SITE1_V}}}]

[[cards.sim.sites]]
site = 2
module = "ACQ425ELF"
signals = [{{kind = "dc", offset_v = {SITE2_V}}}]
"""
SPAD = SPAD_WORDS * SPAD_BYTES // 2  # the spad in words of the 16-bit stream (NCHAN counts it)


def start(tmp_path, loopback, autosave: str | None = None):
    """The IOC on a two-site card (a new prefix each start: no cached channels)."""
    prefix = new_prefix()
    if autosave is not None:
        (tmp_path / "autosave").mkdir(exist_ok=True)
        (tmp_path / "autosave" / "test.json").write_text(autosave)
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=TWO_SITES)
    return ioc_process(config, prefix, loopback)


@pytest.fixture
def ioc(tmp_path, loopback):
    with start(tmp_path, loopback) as running_ioc:
        yield running_ioc


def sites(ioc) -> str:
    return ca_read(ioc.pv("SITES"), timeout=10).data[0].decode()


def card_nchan(ioc) -> int:
    """The card's own count of the words in one aggregated sample (its NCHAN knob)."""
    client = KnobClient("sim", ioc.host, 0, 4220, 5.0)
    try:
        return int(client.query("NCHAN"))
    finally:
        client.close()


def alarm(name: str) -> tuple[AlarmStatus, AlarmSeverity]:
    md = ca_read(name, data_type=ChannelType.TIME_STRING, timeout=10)
    return AlarmStatus(md.metadata.status), AlarmSeverity(md.metadata.severity)


def refused(ioc, value: str) -> str:
    """Put `value` to SITES, which must refuse it; the refusal's words."""
    with pytest.raises(ErrorResponseReceived) as err:
        ca_write(ioc.pv("SITES"), value, notify=True, timeout=20)
    return bytes(err.value.args[0].error_message).rstrip(b"\0").decode()


def run_once(ioc) -> tuple[dict, dict]:
    """A short run from the PVs; its first header and its channels."""
    before = castr(ioc.pv("RUN:LAST_RESULT"))
    ca_write(ioc.pv("RUN:START"), 1, notify=True, timeout=20)
    wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) > 20_000, "samples in the run")
    ca_write(ioc.pv("RUN:STOP"), 1, notify=True, timeout=20)
    text = wait_for(lambda: (t := castr(ioc.pv("RUN:LAST_RESULT"))) != before and t, "a result")
    result = json.loads(text)
    assert result["state"] == "IDLE" and not result["fault"], result
    return read_run([ioc.data_dir / f for f in result["files"]])


def test_sites_put_restreams_the_card_and_runs_read_that_site_only(ioc):
    assert sites(ioc) == "1,2"
    assert card_nchan(ioc) == 32 + SPAD
    ca_write(ioc.pv("SITES"), "2", notify=True, timeout=20)
    # Complete: the card aggregates site 2 alone before the client hears.
    assert sites(ioc) == "2"
    assert card_nchan(ioc) == 16 + SPAD
    # The display follows: site 2's columns are its own, not site 1's moved up.
    counter = caget(ioc.pv("AI:COUNTER"))
    wait_for(lambda: caget(ioc.pv("AI:COUNTER")) != counter, "a new frame")
    assert caget(ioc.pv("2:AI:CH:01")) == pytest.approx(SITE2_V, abs=0.05)
    assert caget(ioc.pv("2:AI:WF:01:V"))[-1] == pytest.approx(SITE2_V, abs=0.05)
    # RUN:CHANNELS numbers site 2's channels only.
    with pytest.raises(ErrorResponseReceived):
        ca_write(ioc.pv("RUN:CHANNELS"), "16", notify=True, timeout=20)
    assert "0..15" in castr(ioc.pv("LAST_ERROR"))
    header, chans = run_once(ioc)
    assert header["channels"] == 16 + SPAD
    assert header["channel_list"] == list(range(16)) and sorted(chans) == list(range(16))
    assert list(header["current_gains"]) == ["2"]
    assert np.all(chans[0] > 0), "channel 0 of the run is site 2's positive level"
    # Spaces and any order; held sorted, and both sites stream again.
    ca_write(ioc.pv("SITES"), " 2, 1", notify=True, timeout=20)
    assert sites(ioc) == "1,2" and card_nchan(ioc) == 32 + SPAD


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "no site given; list one or more of 1,2"),
        ("7", "site 7 is not one of this card's sites 1,2"),
        ("1,1", "site 1 is listed twice"),
        ("x", "'x' is not a site number (this card has 1,2)"),
    ],
)
def test_a_bad_sites_put_is_refused_in_words_and_changes_nothing(ioc, value, reason):
    assert reason in refused(ioc, value)
    last = castr(ioc.pv("LAST_ERROR"))
    assert "SITES" in last and reason in last and "\n" not in last
    assert sites(ioc) == "1,2" and card_nchan(ioc) == 32 + SPAD
    assert alarm(ioc.pv("SITES")) == (AlarmStatus.WRITE, AlarmSeverity.MAJOR_ALARM)
    for other in ("STATE", "CLKDIV", "RUN:CHANNELS", "BUFFER_SIZE"):
        assert alarm(ioc.pv(other))[1] == AlarmSeverity.NO_ALARM, other
    ca_write(ioc.pv("SITES"), "1,2", notify=True, timeout=20)  # a good put clears it
    assert alarm(ioc.pv("SITES")) == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)


def test_sites_are_refused_while_a_run_is_active(ioc):
    ca_write(ioc.pv("RUN:SAVE"), 0, notify=True, timeout=20)
    ca_write(ioc.pv("RUN:START"), 1, notify=True, timeout=20)
    wait_for(lambda: caget(ioc.pv("RUN:STATE_RBV"), as_string=True) == "RUNNING", "RUNNING")
    try:
        assert "SITES: a run is active" in refused(ioc, "2")
        assert sites(ioc) == "1,2" and card_nchan(ioc) == 32 + SPAD
    finally:
        ca_write(ioc.pv("RUN:STOP"), 1, notify=True, timeout=20)


def test_sites_are_refused_while_the_card_is_away(tmp_path, loopback):
    # No simulator and nothing listening on the card's address: the card never answers.
    prefix = new_prefix()
    config = tmp_path / "away.toml"
    config.write_text(
        f"""
[ioc]
name = "away"
[archive]
data_dir = "data"
[[cards]]
name = "C1"
host = "{loopback}"
prefix = "{prefix}"
timeout_s = 1.0
[cards.modules]
1 = "ACQ425ELF"
2 = "ACQ425ELF"
"""
    )
    with ioc_process(config, prefix, loopback, ready_state="DISCONNECTED") as ioc:
        assert "SITES: card not connected" in refused(ioc, "2")
        assert sites(ioc) == "1,2"


def test_sites_are_autosaved_and_a_stale_entry_is_skipped(tmp_path, loopback):
    with start(tmp_path, loopback) as ioc:
        ca_write(ioc.pv("SITES"), "2", notify=True, timeout=20)
        saved = tmp_path / "autosave" / "test.json"
        wait_for(
            lambda: saved.exists() and json.loads(saved.read_text())["C1"].get("SITES") == "2",
            "SITES in the autosave file",
        )
    with start(tmp_path, loopback) as ioc:
        assert sites(ioc) == "2"
        assert card_nchan(ioc) == 16 + SPAD  # the card streams the restored subset
    stale = json.loads(saved.read_text())
    stale["C1"]["SITES"] = "1,7"
    with start(tmp_path, loopback, autosave=json.dumps(stale)) as ioc:
        assert sites(ioc) == "1,2"
        assert card_nchan(ioc) == 32 + SPAD
        lines = [
            line for line in output(ioc.proc).splitlines() if re.search(r"autosave.*SITES", line)
        ]
        assert len(lines) == 1 and "site 7" in lines[0] and "skipped" in lines[0], lines


def test_the_old_pages_mod_list_chooses_the_sites_and_lists_every_site(tmp_path, loopback):
    """startReadout's mod_list sets SITES before the run; getChannels still offers every
    site the IOC can read (SITELIST), as the old server listed every module."""
    import asyncio

    import websockets
    from old_page_client import OldPage
    from support import free_port, wait_for_port

    legacy_port = free_port()
    bridge = f"""
[bridge]
enabled = true
port = {free_port()}
legacy_port = {legacy_port}
legacy_write_hosts = ["127.0.0.1"]
"""
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=TWO_SITES, archive_extra=bridge)
    with ioc_process(config, prefix, loopback) as ioc:
        assert castr(ioc.pv("SITELIST")) == "1,2"
        wait_for_port("127.0.0.1", legacy_port)

        async def go() -> dict:
            async with websockets.connect(f"ws://127.0.0.1:{legacy_port}") as ws:
                page = OldPage(ws)
                await page.initialize()
                assert not (await page.request_control(loopback)).refused
                assert (await page.get_channels()).result["mods"] == {"1": 16, "2": 16}
                reply = await page.start(should_save=True, should_upload=False, mod_list=[2],
                                         channel_list=[0, 1])  # fmt: skip
                assert not reply.refused, reply.header
                assert sites(ioc) == "2"
                await page.read_buffer([0])
                assert not (await page.stop()).refused
                done = await page.wait_event("JobFinished")
                assert "error" not in done, done
                mods = (await page.get_channels()).result["mods"]
                await page.close()
                return mods

        assert asyncio.run(go()) == {"1": 16, "2": 16}
        result = json.loads(castr(ioc.pv("RUN:LAST_RESULT")))
        header, chans = read_run([ioc.data_dir / f for f in result["files"]])
        assert list(header["current_gains"]) == ["2"] and header["channels"] == 16 + SPAD
        assert sorted(chans) == [0, 1] and np.all(chans[0] > 0), "site 2's level"
