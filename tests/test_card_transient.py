"""The transient driver against the simulator: setup, shots, data, short reads, lost cards."""

from __future__ import annotations

import time

import pytest
from card_helpers import card_config, connected, simulated
from sim_helpers import signal_table
from support import random_loopback, sim_card_toml, write_config

from dtacq_ioc.card.card import Card
from dtacq_ioc.card.errors import SettingRefused
from dtacq_ioc.card.transient import (
    ShotError,
    ShotIncomplete,
    ShotState,
    TransientSettings,
    TransientStatus,
    TriggerSource,
    arm_together,
)
from dtacq_ioc.config import load_config

TIMEOUT = 10.0


@pytest.fixture
def rig(tmp_path, loopback):
    """(simulated card, driver Card) for one ACQ425ELF."""
    config = card_config(tmp_path, loopback, faults="reboot_s = 0.5")
    with simulated(config) as sim, connected(config) as card:
        yield sim.card("DIG"), card


def shot_words(sim_card, first: int, n: int):
    """What the simulator's signals give for sample indices [first, first+n), per channel."""
    table = signal_table(sim_card)
    return [table.site_words(s.site, first, n) for s in table.sites]


def test_trigger_sources_and_status_lines_parse():
    assert TriggerSource.parse("soft") == TriggerSource()
    assert TriggerSource.parse("D3 falling") == TriggerSource(3, rising=False)
    assert TriggerSource.parse("d0:rising").triplet() == "1,0,1"
    assert TriggerSource.parse("d5").triplet() == "1,5,1"
    assert str(TriggerSource(2, rising=False)) == "d2 falling"
    for bad in ("d", "d12", "x0", "d0 up", ""):
        with pytest.raises(ValueError, match="is not soft or dN"):
            TriggerSource.parse(bad)
    assert TransientStatus.parse("STX 3 10 20 15 1") == TransientStatus(
        ShotState.RUN_POST, 10, 20, 15, 1
    )
    assert TransientStatus.parse("0 0 2000 2000 0 7 8").state is ShotState.IDLE
    assert TransientStatus.parse("Timer::report(1) ALL 3 msec") is None
    assert TransientStatus.parse("9 0 0 0 0") is None


def test_settings_refused_before_anything_is_sent(rig):
    _, card = rig
    tr = card.transient()
    for settings, text in (
        (TransientSettings(post=0), "transient post: 0 is not an integer in 1..4000000"),
        (TransientSettings(pre=-1), "transient pre: -1 is not an integer in 0..4000000"),
        (TransientSettings(trigger=TriggerSource(1)), "d1 is the soft trigger; choose soft"),
        (TransientSettings(trigger=TriggerSource(9)), "line d9 is not one of d0..d7"),
    ):
        with pytest.raises(SettingRefused, match=text):
            tr.configure(settings)
    assert card.knob(0).query("transient").startswith("PRE=0 POST=2000 ")  # untouched


def test_configure_sets_the_trigger_as_the_host_api_does(rig):
    _, card = rig
    tr = card.transient()
    took = tr.configure(TransientSettings(pre=0, post=5000, trigger=TriggerSource.parse("d0")))
    assert took.post == 5000
    k1 = card.knob(1)
    assert (k1.query("trg"), k1.query("event0")) == ("1,0,1", "0,0,0")
    assert card.knob(0).query("transient") == "PRE=0 POST=5000 OSAM=1 DEMUX=1 SOFT_TRIGGER=0"
    tr.configure(TransientSettings(pre=100, post=50, trigger=TriggerSource(4, rising=False)))
    assert (k1.query("trg"), k1.query("event0")) == ("1,1,1", "1,4,0")
    assert card.knob(0).query("transient") == "PRE=100 POST=50 OSAM=1 DEMUX=1 SOFT_TRIGGER=1"


def test_a_soft_shot_reads_back_exactly_what_the_signals_give(rig):
    sim, card = rig
    tr = card.transient()
    tr.configure(TransientSettings(pre=0, post=30_000))
    tr.arm(TIMEOUT)
    assert tr.status is not None and tr.status.state is ShotState.ARM
    tr.soft_trigger()
    final = tr.wait_done(TIMEOUT)
    assert (final.state, final.pre, final.post) == (ShotState.IDLE, 0, 30_000)
    shot = tr.read_shot()
    assert shot.complete and shot.source == "channels"
    assert (shot.shot, shot.trigger_index, shot.samples) == (1, 0, 30_000)
    assert shot.channels.shape == (16, 30_000) and shot.channels.dtype == "<i2"
    (words,) = shot_words(sim, 0, 30_000)
    assert (shot.channels == words.T).all()
    buffer = shot.channels
    tr.arm(TIMEOUT)
    tr.soft_trigger()
    tr.wait_done(TIMEOUT)
    again = tr.read_shot()
    assert again.shot == 2 and again.channels is buffer  # the preallocated array, reused


def test_a_pre_trigger_shot_on_an_external_line(rig):
    sim, card = rig
    pre, post = 20_000, 5_000
    tr = card.transient()
    tr.configure(TransientSettings(pre=pre, post=post, trigger=TriggerSource(3, rising=False)))
    tr.arm(TIMEOUT)
    mon = tr.monitor
    assert mon.wait_for(
        lambda: mon.status.state is ShotState.RUN_PRE and mon.status.elapsed >= pre, TIMEOUT
    )
    card.knob(0).set("SIM:EXT_TRIGGER", "3,1")  # the rising edge: not what it waits for
    assert card.knob(0).query("TRANS_ACT:STATE") == "RUN_PRE"
    card.knob(0).set("SIM:EXT_TRIGGER", "3,0")
    tr.wait_done(TIMEOUT)
    shot = tr.read_shot()
    assert (shot.trigger_index, shot.samples) == (pre, pre + post)
    first = int(card.knob(0).query("SIM:SHOT_START"))
    assert first > 0
    (words,) = shot_words(sim, first, pre + post)
    assert (shot.channels == words.T).all()


def test_a_raw_shot_is_demultiplexed_on_the_host(tmp_path, loopback):
    config = card_config(tmp_path, loopback, module="ACQ437ELF", carrier="acq1001")
    with simulated(config) as sim, connected(config) as card:
        tr = card.transient()
        tr.configure(TransientSettings(pre=0, post=4000, demux=False))
        tr.arm(TIMEOUT)
        tr.soft_trigger()
        tr.wait_done(TIMEOUT)
        shot = tr.read_shot()
        assert shot.source == "raw" and shot.channels.dtype == "<i4"
        assert (shot.first_counter, shot.counter_errors) == (1, 0)
        (words,) = shot_words(sim.card("DIG"), 0, 4000)
        assert (shot.channels == words.T).all()


def test_a_short_read_is_a_clear_error_holding_what_came(rig):
    _, card = rig
    tr = card.transient()
    tr.configure(TransientSettings(pre=0, post=1000))
    tr.arm(TIMEOUT)
    tr.soft_trigger()
    tr.wait_done(TIMEOUT)
    card.knob(0).set("SIM:SHOT_CUT", 601)  # 300 whole samples and a byte
    with pytest.raises(ShotIncomplete) as err:
        tr.read_shot()
    assert (
        str(err.value)
        == "DIG: shot 1 short: channel 1 gave 300 of 1000 samples (16 channels short)"
    )
    assert err.value.shot.received.tolist() == [300] * 16
    assert not err.value.shot.complete


def test_a_shot_that_never_triggers_times_out_and_aborts(rig):
    _, card = rig
    tr = card.transient()
    tr.configure(TransientSettings(pre=0, post=1000, trigger=TriggerSource(0)))
    tr.arm(TIMEOUT)
    with pytest.raises(ShotError, match=r"DIG: shot not done within 0.3 s \(state ARM\)"):
        tr.wait_done(0.3)
    tr.abort()
    assert tr.monitor.wait_for(lambda: tr.status.state is ShotState.IDLE, TIMEOUT)
    with pytest.raises(ShotIncomplete, match="DIG: shot 0 short: channel 1 gave 0 of 1000"):
        tr.read_shot()  # an aborted shot leaves no data


def test_a_card_lost_mid_shot_fails_the_shot_and_the_console_comes_back(rig):
    _, card = rig
    links = []
    tr = card.transient(on_link=links.append)
    tr.configure(TransientSettings(pre=0, post=1000, trigger=TriggerSource(0)))
    tr.arm(TIMEOUT)
    card.knob(0).set("SIM:REBOOT", 0.5)
    with pytest.raises(ShotError, match="DIG: the card went away during the shot"):
        tr.wait_done(TIMEOUT)
    mon = tr.monitor
    assert mon.wait_for(lambda: mon.connected, TIMEOUT)
    assert links[:3] == [True, False, True]
    assert tr.status.state is ShotState.IDLE


def test_cards_armed_together_followers_first_with_a_common_shot_number(tmp_path, loopback):
    other = random_loopback()
    config = load_config(
        write_config(tmp_path, sim_card_toml("A", loopback) + sim_card_toml("B", other))
    )
    armed: dict[str, float] = {}

    def note(name):
        def on_status(status):
            if status.state is ShotState.ARM:
                armed.setdefault(name, time.monotonic())

        return on_status

    with simulated(config):
        cards = [Card(c) for c in config.cards]
        try:
            for card in cards:
                card.connect()
            master, follower = (c.transient(on_status=note(c.name)) for c in cards)
            master.configure(TransientSettings(post=2000))
            follower.configure(TransientSettings(post=2000, trigger=TriggerSource(0)))
            for t in (master, follower):
                t.set_shot(41)
            arm_together([follower], master, TIMEOUT)
            assert armed["B"] < armed["A"]
            master.soft_trigger()
            cards[1].knob(0).set("SIM:EXT_TRIGGER", "d0")  # the trigger as B's front panel sees it
            shots = [t.wait_done(TIMEOUT) and t.read_shot() for t in (master, follower)]
            assert [s.shot for s in shots] == [42, 42]
        finally:
            for card in cards:
                card.close()
