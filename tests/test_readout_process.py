"""A card's readout in a process of its own: a simulator process, the real driver in the
readout process, .dig files, and the IOC's SQLite catalog answering over the pipe.

The files are compared sample by sample with what the simulator sent, as in
test_readout_sim; here what is new is the process boundary: the display ring read
from shared memory, a refusal crossing in words, the process dying under a run, and
the IOC's end closing with a run open.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest
from ioc_support import wait_for
from support import sim_card_toml, sim_process, write_config
from test_readout_sim import check_files_match_table

from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.card.card import Card
from dtacq_ioc.config import load_config
from dtacq_ioc.readout.process import ReadoutProcess
from dtacq_ioc.readout.run import RunSettings, SettingsError
from dtacq_ioc.sim.signals import SignalTable, SiteSignals

CLKDIV = 1000  # ACQ425 at 100 MHz / 1000 = 100 kHz


@pytest.fixture
def setup(tmp_path, loopback):
    """(card in the test's process, readout process, catalog, stream states seen)."""
    path = write_config(tmp_path, sim_card_toml("C1", loopback, card_extra="buffer_bytes = 65536"))
    config = load_config(path)
    catalog = open_catalog(config.archive)
    states: list[str] = []
    with sim_process(path, loopback):
        card = Card(config.card("C1"))
        card.connect()
        card.set_clkdiv(CLKDIV)
        readout = ReadoutProcess(
            config.card("C1"), config.ioc, config.archive, catalog,
            on_state=lambda stats: states.append(stats.state),
        )  # fmt: skip
        try:
            yield card, readout, catalog, states
        finally:
            readout.close()
            card.close()
            catalog.close()


def table_of(card: Card) -> SignalTable:
    site = card.site_info(1)
    signals = card.config.sim.sites[0].signals
    sites = [SiteSignals(1, site.spec, signals, tuple(card.gains(1)), site.data32)]
    return SignalTable(sites, card.sample_rate_hz(), seed=0)


def signalled_under_a_run(readout: ReadoutProcess, signum: int) -> Any:
    """A run with samples in its files, `signum` sent to the readout process, the run done."""
    readout.start()
    run = readout.start_run(RunSettings())
    wait_for(lambda: run.status()["samples"] > 50_000, "samples in the run's files")
    os.kill(readout.pid, signum)
    assert run.wait(30), "the run never read done"
    return run


def streaming(readout: ReadoutProcess) -> bool:
    stats = readout.stats()
    return stats.state == "streaming" and stats.buffers > 2


def test_a_run_in_the_readout_process_writes_exactly_what_the_card_sent(setup):
    card, readout, catalog, _ = setup
    readout.start()
    wait_for(lambda: streaming(readout), "the stream's counters from the readout process")
    # The display ring is the process's, read here from shared memory.
    first = readout.display.snapshot()
    wait_for(lambda: readout.display.snapshot().updates > first.updates + 2, "display updates")
    snap = readout.display.snapshot()
    assert snap.samples == 4096 and snap.raw.shape == (16, 4096) and snap.counter > 0
    assert snap.sample_rate_hz == pytest.approx(100_000.0)
    settings = RunSettings(trigger="time_limit", trigger_args={"seconds": 2.0})
    run = readout.start_run(settings)
    assert run.wait(60), "the run never ended"
    st = run.status()
    assert st["state"] == "IDLE" and st["fault"] == "", st
    assert check_files_match_table(run, table_of(card)) == 200_000
    rec = catalog.get_run(run.run_id)  # the IOC's catalog, told over the pipe
    assert rec.state == "complete" and rec.samples == 200_000 and rec.counter_errors == 0
    assert [f.sha256 for f in rec.files] == [f.sha256 for f in run.files] != []
    assert readout.stats().counter_errors == 0 and streaming(readout)


def test_a_refused_run_comes_back_in_words_and_changes_nothing(setup):
    _, readout, catalog, _ = setup
    readout.start()
    wait_for(lambda: streaming(readout), "the stream")
    with pytest.raises(SettingsError, match="unknown site 7 on C1"):
        readout.start_run(RunSettings(sites=(7,)))
    assert readout.run is None and catalog.list_runs() == []
    buffers = readout.stats().buffers
    wait_for(lambda: readout.stats().buffers > buffers, "the stream going on")


def test_a_readout_process_killed_under_a_run_faults_it_and_the_next_start_streams(setup):
    card, readout, catalog, states = setup
    run = signalled_under_a_run(readout, signal.SIGKILL)
    st = run.status()
    assert st["state"] == "FAULT" and "readout process ended" in st["fault"], st
    wait_for(lambda: states[-1:] == ["ended"], "the stream's end reported")
    assert "readout process ended" in readout.stats().reason
    # Closed by the IOC's end, with every file on disk, the one being written included.
    rec = catalog.get_run(run.run_id)
    assert rec.state == "interrupted" and "readout process ended" in rec.fault
    assert check_files_match_table(rec, table_of(card)) == rec.samples > 50_000
    # What the link does next: stop with the reason, then start again.
    readout.stop(reason="C1: link lost")
    readout.start()
    wait_for(lambda: streaming(readout), "a stream from a new readout process")
    again = readout.start_run(RunSettings(trigger="time_limit", trigger_args={"seconds": 1.0}))
    assert again.wait(60) and again.status()["state"] == "IDLE"
    assert check_files_match_table(again, table_of(card)) == 100_000


def test_closing_the_iocs_end_closes_the_run_with_every_sample_in_its_files(setup):
    card, readout, catalog, _ = setup
    seen = threading.Event()
    readout.buffer_tap = lambda words: seen.set()  # run buffers cross while someone watches
    readout.start()
    run = readout.start_run(RunSettings())
    assert seen.wait(30), "no run buffer came over the pipe"
    wait_for(lambda: run.status()["samples"] > 50_000, "samples in the run's files")
    readout.close()
    assert run.done and run.status()["state"] == "IDLE"
    rec = catalog.get_run(run.run_id)
    assert rec.state == "complete" and rec.samples == run.status()["samples"]
    assert check_files_match_table(run, table_of(card)) == rec.samples


def test_sigterm_to_the_readout_process_alone_closes_its_run_complete(setup):
    card, readout, catalog, _ = setup
    run = signalled_under_a_run(readout, signal.SIGTERM)
    assert run.status()["state"] == "IDLE", run.status()
    rec = catalog.get_run(run.run_id)
    assert rec.state == "complete" and rec.samples == run.status()["samples"] > 0
    assert check_files_match_table(run, table_of(card)) == rec.samples
