"""End to end: a simulator process, the real driver, the readout, .dig files and SQLite.

Every sample in the files is compared with what the simulator sent (its
`SignalTable`, addressed by the spad counter the file header records).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from ioc_support import wait_for
from support import sim_card_toml, sim_process, write_config
from test_readout_run import GatedFile

from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.archive.dig import read_dig
from dtacq_ioc.card.card import Card
from dtacq_ioc.config import load_config
from dtacq_ioc.readout.pipeline import Readout
from dtacq_ioc.readout.run import RunSettings, RunState, SettingsError
from dtacq_ioc.sim.signals import SignalTable, SiteSignals

CLKDIV = 1000  # ACQ425 at 100 MHz / 1000 = 100 kHz: quick to check, many buffers


@pytest.fixture
def setup(tmp_path, loopback):
    """(config, card, readout, catalog, simulator process); the card at its real ports."""
    path = write_config(tmp_path, sim_card_toml("C1", loopback, card_extra="buffer_bytes = 65536"))
    config = load_config(path)
    catalog = open_catalog(config.archive)
    with sim_process(path, loopback) as proc:
        card = Card(config.card("C1"))
        card.connect()
        card.set_clkdiv(CLKDIV)
        readout = Readout(card, config.ioc, config.archive, catalog)
        try:
            yield config, card, readout, catalog, proc
        finally:
            readout.close()
            card.close()
            catalog.close()


def expected_table(card: Card, readout: Readout) -> SignalTable:
    site = card.site_info(1)
    sim_site = card.config.sim.sites[0]
    sites = [SiteSignals(1, site.spec, sim_site.signals, tuple(readout.gains[1]), site.data32)]
    return SignalTable(sites, readout.sample_rate_hz, seed=0)


def check_files_match_table(run, table: SignalTable) -> int:
    """Every sample of every file equals the simulator's words for its counter."""
    total = 0
    for f in run.files:
        header, chans = read_dig(f.path)
        n = len(chans[0])
        start = header["first_counter"] - 1
        want = table.site_words(1, start, n)
        for ch in header["channel_list"]:
            np.testing.assert_array_equal(chans[ch], want[:, ch], err_msg=f"{f.name} ch {ch}")
        total += n
    return total


def wait_state(run, timeout: float = 60.0) -> None:
    assert run.wait(timeout), f"run still {run.state} after {timeout} s"


def test_a_run_writes_exactly_what_the_card_sent(setup):
    config, card, readout, catalog, _ = setup
    readout.start()
    run = readout.start_run(
        RunSettings(trigger="time_limit", trigger_args={"seconds": 2.0}, measurement_name="e2e")
    )
    wait_state(run)
    assert run.state is RunState.IDLE, run.fault
    table = expected_table(card, readout)
    assert check_files_match_table(run, table) == 200_000
    rec = catalog.get_run(run.run_id)
    assert rec.state == "complete" and rec.samples == 200_000 and rec.counter_errors == 0
    assert rec.header["freq_hz"] == pytest.approx(100_000.0)
    assert rec.bytes_written == 200_000 * 16 * 2
    # the stream keeps going for the display after the run
    snap = readout.display.snapshot()
    assert snap.samples == config.ioc.display_samples and readout.stats().counter_errors == 0
    assert readout.streaming
    stats = readout.stats()
    assert stats.state == "streaming" and stats.mb_per_s > 0 and stats.buffers > 0


def test_not_ready_when_the_stream_reopens_ends_the_run(setup):
    _, card, readout, catalog, _ = setup
    readout.start()
    # the first stream up before the card turns NOT READY: only the run's reopen meets it
    wait_for(lambda: readout.stats().buffers > 0, "the first stream's buffers")
    card.knob(0).set("SIM:NOT_READY", 1)
    run = readout.start_run(RunSettings(buffer_bytes=40 * 1000))  # reopens the stream
    wait_state(run)
    assert run.state is RunState.FAULT and "NOT READY" in run.fault
    assert catalog.get_run(run.run_id).state == "interrupted" and run.files == []


def test_counter_jump_ends_the_run_in_fault_with_its_data(setup):
    _, card, readout, catalog, _ = setup
    card.knob(0).set("SIM:DROP", "30000,7")
    readout.start()
    run = readout.start_run(RunSettings(channel_list=(0, 5, 15)))
    wait_state(run)
    assert run.state is RunState.FAULT and "counter jump" in run.fault and "got" in run.fault
    rec = catalog.get_run(run.run_id)
    assert rec.state == "fault" and rec.counter_errors >= 1 and rec.fault == run.fault
    assert check_files_match_table(run, expected_table(card, readout)) == rec.samples > 0


def test_disconnect_mid_run_closes_a_readable_run(setup):
    _, card, readout, catalog, _ = setup
    ended = threading.Event()
    readout.on_state = lambda stats: stats.state == "ended" and ended.set()
    card.knob(0).set("SIM:CLOSE_AFTER", 2_000_010)  # not a whole number of samples
    readout.start()
    run = readout.start_run(RunSettings())
    wait_state(run)
    assert ended.wait(30)
    assert run.state is RunState.FAULT and "closed by the card" in run.fault
    rec = catalog.get_run(run.run_id)
    assert rec.state == "interrupted"
    got = check_files_match_table(run, expected_table(card, readout))
    assert got == rec.samples and 0 < got <= 2_000_010 // 40  # 40-byte samples
    assert not readout.streaming and "closed" in readout.stats().reason


def test_a_disk_that_cannot_keep_up_costs_counted_overruns_and_a_readable_run(setup):
    """The simulator streams while the disk is stuck: overruns are counted, the stream
    goes on, and every sample that reached a file is exactly what the card sent."""
    config, card, _, catalog, _ = setup
    gate = threading.Event()
    archive = replace(config.archive, writer_queue_buffers=2)
    readout = Readout(card, config.ioc, archive, catalog, opener=lambda p: GatedFile(p, gate))
    try:
        readout.start()
        run = readout.start_run(RunSettings(measurement_name="slow disk"))
        buffers = readout.stats().buffers
        wait_for(lambda: run.overruns >= 3, "overruns while the disk is stuck")
        assert readout.stats().buffers > buffers + 3  # the stream never waited
        gate.set()
        readout.stop_run(60)
        assert run.state is RunState.IDLE, run.fault
        rec = catalog.get_run(run.run_id)
        assert rec.overruns == run.overruns >= 3 and rec.state == "complete"
        got = check_files_match_table(run, expected_table(card, readout))
        assert got == rec.samples > 0
    finally:
        readout.close()


@pytest.fixture
def setup437(tmp_path, loopback):
    path = write_config(tmp_path, sim_card_toml("C2", loopback, module="ACQ437ELF"))
    config = load_config(path)
    catalog = open_catalog(config.archive)
    with sim_process(path, loopback):
        card = Card(config.card("C2"))
        card.connect()
        readout = Readout(card, config.ioc, config.archive, catalog)
        try:
            yield card, readout, catalog
        finally:
            readout.close()
            card.close()
            catalog.close()


def test_acq437_downsampled_run_and_stream_reopening(setup437):
    card, readout, catalog = setup437
    readout.start()
    first_stream_buffer = readout.buffer_samples
    settings = RunSettings(
        channel_list=(1, 4),
        downsample=16,
        buffer_bytes=72 * 1000,  # 72-byte samples: the stream reopens with 1000 per buffer
        trigger="time_limit",
        trigger_args={"seconds": 1.0},
    )
    run = readout.start_run(settings)
    assert readout.buffer_samples == 1000 != first_stream_buffer
    with pytest.raises(SettingsError, match="a run is already active"):
        readout.start_run(RunSettings())
    wait_state(run)
    assert run.state is RunState.IDLE, run.fault
    table = expected_table(card, readout)
    (f,) = run.files
    header, chans = read_dig(f.path)
    assert header["is_float"] and header["byte_depth"] == 8 and header["downsample"] == 16
    rows = len(chans[1])
    words = table.site_words(1, header["first_counter"] - 1, rows * 16)
    codes = (words >> 8).reshape(rows, 16, -1).mean(axis=1)
    np.testing.assert_array_equal(chans[1], codes[:, 1])
    np.testing.assert_array_equal(chans[4], codes[:, 4])
    assert run.output.samples_written == round(readout.sample_rate_hz)
    assert catalog.get_run(run.run_id).header["bit_shift"] == 0
    # a refused run leaves the stream as it was
    with pytest.raises(SettingsError, match="unknown channel 16"):
        readout.start_run(RunSettings(channel_list=(16,), buffer_bytes=72 * 500))
    with pytest.raises(ValueError, match="unknown trigger 'nope'"):
        readout.start_run(RunSettings(trigger="nope", buffer_bytes=72 * 500))
    assert readout.buffer_samples == 1000 and readout.streaming
