"""Transient shots through Channel Access: arm, trigger, and a run of exactly the shot.

The card is simulated; its signals are deterministic, so the test knows every word a
shot must hold (the simulator's SIM:SHOT_START names the shot's first sample).
"""

from __future__ import annotations

import numpy as np
import pytest
from caproto import ChannelType
from caproto.sync.client import read as ca_read
from caproto.sync.client import write as ca_write
from ioc_support import ioc_process, ioc_toml, new_prefix, wait_for
from support import random_loopback, sim_card_toml, write_config
from test_ioc import SIGNALS, sim_knob

from dtacq_ioc.archive.dig import read_run
from dtacq_ioc.archive.sqlite import SqliteCatalog
from dtacq_ioc.card.models import module_spec
from dtacq_ioc.config import load_config
from dtacq_ioc.sim.signals import SignalTable, SiteSignals

RATE = 1_000_000  # the simulated ACQ425ELF's default rate


def put(name: str, value) -> None:
    ca_write(name, value, notify=True, timeout=20)


def get(name: str):
    """One number (enums as their index), or an array."""
    value = ca_read(name, data_type=ChannelType.LONG, timeout=10).data
    return value[0] if len(value) == 1 else value


def text(name: str) -> str:
    """A text PV: a DBR_STRING or a CHAR array, as `caget -S` prints it."""
    data = ca_read(name, data_type=ChannelType.STRING, timeout=10).data
    return b"".join(data).decode() if isinstance(data[0], bytes) else str(data[0])


def runs(data_dir, card: str):
    catalog = SqliteCatalog(data_dir / "runs.sqlite")
    try:
        return catalog.list_runs(100, card)
    finally:
        catalog.close()


def shot_words(config_path, start: int, n: int) -> np.ndarray:
    config = load_config(config_path)
    sim_site = config.cards[0].sim.sites[0]
    spec = module_spec("ACQ425ELF")
    table = SignalTable([SiteSignals(1, spec, sim_site.signals, (0,) * 16, False)], RATE)
    return table.site_words(1, start, n)


@pytest.fixture
def ioc(tmp_path, loopback):
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=SIGNALS)
    with ioc_process(config, prefix, loopback) as running_ioc:
        yield running_ioc


def two_cards(tmp_path):
    """A config of two simulated cards C1 and C2: (path, their hosts, their prefixes)."""
    hosts = (random_loopback(), random_loopback())
    prefixes = (new_prefix(), new_prefix())
    cards = "".join(
        sim_card_toml(f"C{i + 1}", host, prefix=prefix)
        for i, (host, prefix) in enumerate(zip(hosts, prefixes, strict=True))
    )
    return write_config(tmp_path, cards), hosts, prefixes


def test_a_shot_armed_and_soft_triggered_over_ca_is_a_run_of_exactly_the_shot(ioc):
    pre, post = 2000, 3000
    put(ioc.pv("MODE"), "TRANSIENT")
    put(ioc.pv("MODE:TRANSIENT:PRE"), pre)
    put(ioc.pv("MODE:TRANSIENT:POST"), post)
    put(ioc.pv("MODE:TRANSIENT:SET_ARM"), 1)
    wait_for(
        lambda: (
            get(ioc.pv("MODE:TRANS_ACT:STATE")) == 2 and get(ioc.pv("MODE:TRANS_ACT:PRE")) >= pre
        ),
        "RUN_PRE with PRE samples taken",
    )
    put(ioc.pv("SIG:SOFT_TRIGGER"), 1)
    wait_for(lambda: get(ioc.pv("SHOT")) == 1, "shot 1 archived")
    (record,) = runs(ioc.data_dir, "C1")
    assert record.state == "complete" and record.samples == pre + post
    header, chans = read_run([f.path for f in record.files])
    assert (header["pre"], header["post"], header["trigger_index"]) == (pre, post, pre)
    assert header["shot"] == 1 and header["trigger"] == "soft"
    start = int(sim_knob(ioc.host, "SIM:SHOT_START"))
    want = shot_words(ioc.config, start, pre + post)
    for ch in range(16):
        np.testing.assert_array_equal(chans[ch], want[:, ch])
    # The last shot's waveforms: trigger at t = 0, decimated to the display length.
    tb = ca_read(ioc.pv("1:AI:TW:TB"), timeout=10).data
    assert tb[0] == pytest.approx(-pre / RATE) and len(tb) <= 1024
    # Back to streaming: the stream opens again.
    put(ioc.pv("MODE"), "CONTINUOUS")
    before = get(ioc.pv("STREAM:BUFFERS"))
    wait_for(lambda: get(ioc.pv("STREAM:BUFFERS")) > before, "the stream again")


def test_a_mode_switch_during_a_run_is_refused_and_an_abort_is_recorded(ioc):
    from caproto import ErrorResponseReceived

    put(ioc.pv("RUN:START"), 1)
    wait_for(lambda: get(ioc.pv("RUN:STATE_RBV")) == 2, "RUNNING")
    with pytest.raises(ErrorResponseReceived):
        put(ioc.pv("MODE"), "TRANSIENT")
    assert "stop the run before changing the mode" in text(ioc.pv("LAST_ERROR"))
    put(ioc.pv("RUN:STOP"), 1)
    wait_for(lambda: get(ioc.pv("RUN:STATE_RBV")) == 0, "IDLE")
    put(ioc.pv("MODE"), "TRANSIENT")
    put(ioc.pv("MODE:TRANSIENT:SET_ARM"), 1)
    wait_for(lambda: get(ioc.pv("MODE:TRANS_ACT:STATE")) == 1, "ARM")
    put(ioc.pv("MODE:TRANSIENT:SET_ABORT"), 1)
    wait_for(lambda: len(runs(ioc.data_dir, "C1")) == 2, "the aborted shot recorded")
    shot = [r for r in runs(ioc.data_dir, "C1") if r.state == "fault"]
    assert len(shot) == 1 and "aborted" in shot[0].fault


def test_ten_shots_with_auto_rearm_on_two_cards(tmp_path):
    config, hosts, prefixes = two_cards(tmp_path)
    post = 5000
    with ioc_process(config, prefixes[0], hosts[0]) as ioc:
        wait_for(lambda: get(prefixes[1] + "CONNECTED") == 1, "the second card")
        for p in prefixes:
            put(p + "MODE", "TRANSIENT")
            put(p + "MODE:TRANSIENT:POST", post)
            put(p + "MODE:TRANSIENT:SOFT_TRIGGER", "Yes")  # each shot triggers itself
            put(p + "MODE:TRANSIENT:AUTO_REARM", "Yes")
        for p in prefixes:
            put(p + "MODE:TRANSIENT:SET_ARM", 1)
        for p in prefixes:
            wait_for(lambda p=p: get(p + "SHOT") >= 10, f"{p} ten shots", timeout=120)
            put(p + "MODE:TRANSIENT:AUTO_REARM", "No")
        for card in ("C1", "C2"):
            records = sorted(runs(ioc.data_dir, card), key=lambda r: r.started)[:10]
            assert [r.state for r in records] == ["complete"] * 10
            assert all(r.samples == post for r in records)
            shots = [read_run([f.path for f in r.files])[0]["shot"] for r in records]
            assert shots == list(range(1, 11)), (card, shots)


def test_cards_armed_together_take_one_shot_each_with_one_number(tmp_path):
    config, hosts, prefixes = two_cards(tmp_path)
    ioc_prefix = "DTACQ:test:"
    leader, follower = prefixes
    with ioc_process(config, leader, hosts[0]) as ioc:
        wait_for(lambda: get(follower + "CONNECTED") == 1, "the second card")
        for p in prefixes:
            put(p + "MODE", "TRANSIENT")
            put(p + "MODE:TRANSIENT:POST", 2000)
        # The leader takes a shot of its own first: the counters differ (1 and 0).
        put(leader + "MODE:TRANSIENT:SOFT_TRIGGER", "Yes")
        put(leader + "MODE:TRANSIENT:SET_ARM", 1)
        wait_for(lambda: get(leader + "SHOT") == 1, "the leader's own shot")
        put(leader + "MODE:TRANSIENT:SOFT_TRIGGER", "No")
        put(follower + "MODE:TRANSIENT:TRIGGER", "d0 rising")  # waits for a front-panel edge
        put(ioc_prefix + "SHOTS:ARM", 1)
        wait_for(lambda: get(follower + "MODE:TRANS_ACT:STATE") == 1, "the follower armed")
        wait_for(lambda: get(leader + "MODE:TRANS_ACT:STATE") == 1, "the leader armed")
        # The simulated cards share no trigger wire: each gets its edge.
        sim_knob(hosts[1], "SIM:EXT_TRIGGER", "0,1")
        put(leader + "SIG:SOFT_TRIGGER", 1)
        for p in prefixes:
            wait_for(lambda p=p: get(p + "SHOT") == 2, f"{p} shot 2")
        for card in ("C1", "C2"):
            newest = max(runs(ioc.data_dir, card), key=lambda r: r.started)
            header, _ = read_run([f.path for f in newest.files])
            assert header["shot"] == 2 and newest.samples == 2000, (card, header["shot"])


def test_a_shot_reaches_the_experiments_database(pouchdb, tmp_path, loopback):
    from test_faults import couch_archive, documents

    prefix = new_prefix()
    config = ioc_toml(
        tmp_path, loopback, prefix, site_extra=SIGNALS, archive_extra=couch_archive(pouchdb)
    )
    post = 4000
    with ioc_process(config, prefix, loopback) as ioc:
        put(ioc.pv("MODE"), "TRANSIENT")
        put(ioc.pv("MODE:TRANSIENT:POST"), post)
        put(ioc.pv("MODE:TRANSIENT:SOFT_TRIGGER"), "Yes")
        put(ioc.pv("RUN:NAME"), "a shot for the database")
        put(ioc.pv("MODE:TRANSIENT:SET_ARM"), 1)
        wait_for(lambda: get(ioc.pv("SHOT")) == 1, "shot 1 archived")
        run_id = text(ioc.pv("RUN:ID_RBV"))

        def delivered() -> list[dict]:
            docs = documents(pouchdb)
            ours = [d for d in docs if d["dtacq_run"]["run_id"] == run_id]
            return [d for d in ours if d.get("_attachments") and d["dtacq_run"]["files"]]

        docs = wait_for(delivered, "the shot's document with its file", 60)
        doc = docs[0]
        shot = doc["dtacq_run"]["header"]  # the shot's own fields, beside the old ones
        assert (shot["shot"], shot["pre"], shot["post"], shot["trigger_index"]) == (1, 0, post, 0)
        assert doc["measurement_name"] == "a shot for the database"
        assert doc["dtacq_run"]["samples"] == post and doc["dtacq_run"]["state"] == "complete"
