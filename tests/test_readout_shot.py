"""A transient shot archived as a run: simulator -> driver -> .dig file + catalog record."""

from __future__ import annotations

import numpy as np
import pytest
from card_helpers import card_config, connected, simulated
from sim_helpers import signal_table

from dtacq_ioc.archive.catalog import CouchCatalog, open_catalog
from dtacq_ioc.archive.couchdb import CouchClient
from dtacq_ioc.archive.dig import read_run
from dtacq_ioc.archive.sqlite import SqliteCatalog
from dtacq_ioc.card.transient import ShotIncomplete, TransientSettings, TriggerSource
from dtacq_ioc.readout.run import RunSettings, SettingsError, StreamInfo
from dtacq_ioc.readout.shot import ShotInfo, archive_shot
from dtacq_ioc.readout.transform import ChannelMap, SiteChannels

TIMEOUT = 10.0


def stream_info(card) -> StreamInfo:
    layout = card.layout
    sites = [
        SiteChannels(s, card.site_info(s).spec, n, layout.word_size, tuple(card.gains(s)))
        for s, n in zip(layout.sites, layout.nchan, strict=True)
    ]
    return StreamInfo(
        card=card.name,
        host=card.config.host,
        sample_rate_hz=card.sample_rate_hz(),
        channel_map=ChannelMap(sites),
        word_size=layout.word_size,
        gains={s: card.gains(s) for s in layout.sites},
        gain_labels={},
        buffer_samples=1,
    )


@pytest.fixture
def shot_rig(tmp_path, loopback):
    """(sim card, driver card, a finished pre-trigger shot's settings) on one ACQ425ELF."""
    config = card_config(tmp_path, loopback)
    with simulated(config) as sim, connected(config) as card:
        card.configure_stream()
        tr = card.transient()
        settings = tr.configure(TransientSettings(pre=3000, post=7000))
        tr.arm(TIMEOUT)
        mon = tr.monitor
        assert mon.wait_for(lambda: mon.status.elapsed >= 3000, TIMEOUT)
        tr.soft_trigger()
        tr.wait_done(TIMEOUT)
        yield sim.card("DIG"), card, settings


def test_a_shot_becomes_a_run_with_every_sample_and_the_trigger_index(shot_rig, tmp_path):
    sim, card, settings = shot_rig
    shot = card.transient().read_shot()
    catalog = SqliteCatalog(tmp_path / "runs.sqlite")
    try:
        run_settings = RunSettings(channel_list=(0, 5, 15), measurement_name="pulse", log="one")
        record = archive_shot(
            shot.channels,
            shot.received,
            ShotInfo.from_shot(shot, str(settings.trigger)),
            run_settings,
            stream_info(card),
            tmp_path / "data",
            catalog,
        )
        assert (record.state, record.fault, record.samples) == ("complete", "", 10_000)
        stored = catalog.get_run(record.run_id)
        assert stored.state == "complete" and stored.files == record.files
        assert stored.header["trigger_index"] == 3000
    finally:
        catalog.close()
    header, data = read_run(tmp_path / "data" / "DIG" / record.run_id)
    assert (header["pre"], header["post"], header["shot"]) == (3000, 7000, 1)
    assert (header["trigger"], header["trigger_index"]) == ("soft", 3000)
    assert header["channel_list"] == [0, 5, 15] and header["freq_hz"] == card.sample_rate_hz()
    assert header["measurement_name"] == "pulse" and header["first_counter"] is None
    first = int(card.knob(0).query("SIM:SHOT_START"))
    words = signal_table(sim).site_words(1, first, 10_000)
    for ch in (0, 5, 15):
        np.testing.assert_array_equal(data[ch], words[:, ch])


def test_a_short_shot_is_recorded_as_a_fault_with_what_came(shot_rig, tmp_path):
    _, card, settings = shot_rig
    card.knob(0).set("SIM:SHOT_CUT", 2 * 2500)
    with pytest.raises(ShotIncomplete) as err:
        card.transient().read_shot()
    shot = err.value.shot
    catalog = SqliteCatalog(tmp_path / "runs.sqlite")
    try:
        record = archive_shot(
            shot.channels,
            shot.received,
            ShotInfo.from_shot(shot, str(settings.trigger)),
            RunSettings(),
            stream_info(card),
            tmp_path / "data",
            catalog,
            fault=str(err.value),
        )
        assert (record.state, record.samples) == ("fault", 2500)
        assert record.fault == "DIG: shot 1 short: channel 1 gave 2500 of 10000 samples " \
            "(16 channels short)"  # fmt: skip
        assert catalog.get_run(record.run_id).fault == record.fault
        # No data at all (an abort): recorded without files.
        lost = archive_shot(
            None,
            None,
            ShotInfo(shot=2, pre=3000, post=7000, trigger=str(TriggerSource(0))),
            RunSettings(),
            stream_info(card),
            tmp_path / "data",
            catalog,
            fault="aborted",
        )
        assert (lost.state, lost.fault, lost.files, lost.samples) == ("fault", "aborted", [], 0)
        assert catalog.get_run(lost.run_id).header["trigger"] == "d0 rising"
    finally:
        catalog.close()
    _, data = read_run(tmp_path / "data" / "DIG" / record.run_id)
    assert len(data[0]) == 2500
    with pytest.raises(SettingsError, match="downsample must be 1"):
        archive_shot(None, None, ShotInfo(1, 0, 1, "soft"), RunSettings(downsample=2),
                     stream_info(card), tmp_path / "data", catalog)  # fmt: skip


def test_a_shot_reaches_couchdb_like_any_run(shot_rig, pouchdb, tmp_path):
    _, card, settings = shot_rig
    shot = card.transient().read_shot()
    archive = pouchdb.archive(tmp_path / "data")
    catalog = open_catalog(archive)
    assert isinstance(catalog, CouchCatalog)
    try:
        record = archive_shot(
            shot.channels,
            shot.received,
            ShotInfo.from_shot(shot, str(settings.trigger)),
            RunSettings(upload=True),
            stream_info(card),
            archive.data_dir,
            catalog,
        )
        assert catalog.spool.wait_idle(30)
        stored = catalog.get_run(record.run_id)
        assert catalog.upload_state(record.run_id).state == "delivered"
        with CouchClient(pouchdb.settings()) as client:
            doc = client.get_document(stored.doc_id)
            assert all(client.file_confirmed(doc, f) for f in record.files)
    finally:
        catalog.close()
    found = [v for v in _values(doc) if isinstance(v, dict) and v.get("trigger_index") == 3000]
    assert found, doc  # the shot's header reached the document


def _values(doc):
    """Every nested value of a JSON document."""
    stack = [doc]
    while stack:
        v = stack.pop()
        yield v
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
