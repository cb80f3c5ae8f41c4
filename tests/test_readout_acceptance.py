"""Acceptance: 10 s x 100 kHz x 16 channels from a simulated ACQ425 into .dig files, the
SQLite catalog and CouchDB (pouchdb-server), lossless and byte-checked end to end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COUCH_DB, COUCH_WRITER
from support import sim_card_toml, sim_process, write_config

from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.archive.couchdb import CouchClient
from dtacq_ioc.archive.dig import read_run
from dtacq_ioc.archive.records import sha256_of
from dtacq_ioc.card.card import Card
from dtacq_ioc.config import load_config
from dtacq_ioc.readout.pipeline import Readout
from dtacq_ioc.readout.run import RunSettings, RunState
from dtacq_ioc.sim.signals import SignalTable, SiteSignals

SECONDS, RATE = 10, 100_000


@pytest.mark.timeout(180)
def test_ten_seconds_at_100_khz_reach_files_sqlite_and_couchdb(tmp_path, loopback, pouchdb):
    user, password = COUCH_WRITER
    archive = f"""
backend = "couchdb"
[archive.couchdb]
url = "{pouchdb.url}"
db = "{COUCH_DB}"
user = "{user}"
password = "{password}"
"""
    path = write_config(tmp_path, sim_card_toml("ACC", loopback), extra=archive)
    config = load_config(path)
    catalog = open_catalog(config.archive)
    try:
        with sim_process(path, loopback):
            card = Card(config.card("ACC"))
            card.connect()
            card.set_clkdiv(100_000_000 // RATE)
            readout = Readout(card, config.ioc, config.archive, catalog)
            try:
                readout.start()
                run = readout.start_run(
                    RunSettings(
                        trigger="time_limit",
                        trigger_args={"seconds": SECONDS},
                        measurement_name="acceptance",
                        log="10 s at 100 kHz",
                        logitems={"operator": "pytest"},
                        upload=True,
                    )
                )
                assert run.wait(60), run.state
                gains = tuple(readout.gains[1])
            finally:
                readout.close()
                card.close()
        assert run.state is RunState.IDLE, run.fault
        n = SECONDS * RATE

        # Files: every sample equals what the simulator sent for its counter.
        header, chans = read_run(run.directory)
        assert len(chans[0]) == n and header["freq_hz"] == RATE
        site = card.site_info(1)
        sent = SignalTable(
            [SiteSignals(1, site.spec, card.config.sim.sites[0].signals, gains, site.data32)],
            RATE,
            seed=0,
        ).site_words(1, header["first_counter"] - 1, n)
        for ch in range(16):
            np.testing.assert_array_equal(chans[ch], sent[:, ch], err_msg=f"channel {ch}")

        # SQLite: the complete record with sizes and digests of the files on disk.
        rec = catalog.get_run(run.run_id)
        assert (rec.state, rec.samples, rec.counter_errors, rec.overruns) == ("complete", n, 0, 0)
        assert rec.bytes_written == n * 16 * 2
        for f in rec.files:
            assert f.sha256 == sha256_of(f.path)

        # CouchDB: the measurement document in the old shape, with every file attached.
        assert catalog.spool.wait_idle(120)
        assert catalog.upload_state(run.run_id).state == "delivered"
        with CouchClient(pouchdb.settings()) as client:
            doc = client.get_document(catalog.get_run(run.run_id).doc_id)
            assert doc["type"] == "measurement" and doc["measurement_name"] == "acceptance"
            assert doc["operator"] == "pytest" and doc["channel_list"] == list(range(16))
            assert doc["byte_depth"] == 2 and doc["freq_hz"] == RATE
            assert all(client.file_confirmed(doc, f) for f in rec.files)
    finally:
        catalog.close()
