"""Runs fed with buffers built by hand: files, records, faults, overruns, settings errors.

The catalog is the real SQLite one; the data directory is a real one under tmp_path.
"""

from __future__ import annotations

import errno
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from dtacq_ioc.archive.catalog import open_catalog
from dtacq_ioc.archive.dig import encode_header, read_dig, read_run
from dtacq_ioc.archive.records import sha256_of
from dtacq_ioc.card.models import MODULES
from dtacq_ioc.config import ArchiveConfig
from dtacq_ioc.contract import StreamLayout
from dtacq_ioc.readout.integrity import CounterCheck
from dtacq_ioc.readout.run import Run, RunSettings, RunState, SettingsError, StreamInfo, file_header
from dtacq_ioc.readout.transform import ChannelMap, SiteChannels
from dtacq_ioc.readout.triggers import TriggerError, TriggerRegistry

NCHAN = 4
BUF = 100


def info(module: str = "ACQ425ELF", word: int = 2) -> StreamInfo:
    spec = MODULES[module]
    return StreamInfo(
        card="CARD",
        host="127.0.0.9",
        sample_rate_hz=10000.0,
        channel_map=ChannelMap([SiteChannels(1, spec, NCHAN, word, (0, 1, 2, 3))]),
        word_size=word,
        gains={1: [0, 1, 2, 3]},
        gain_labels={},
        buffer_samples=BUF,
    )


class Feeder:
    """Makes consecutive buffers the way the stream does (counter = sample index + 1)."""

    def __init__(self, word: int = 2):
        self.layout = StreamLayout((1,), (NCHAN,), word)
        self.next = 0
        self.check = CounterCheck()
        self.rng = np.random.default_rng(7)

    def buffer(self, n: int = BUF, skip: int = 0) -> np.ndarray:
        self.next += skip
        b = np.zeros(n, dtype=self.layout.sample_dtype)
        b["ai"] = self.rng.integers(-30000, 30000, size=(n, NCHAN))
        b["spad"][:, 0] = np.arange(self.next, self.next + n) + 1
        self.next += n
        return b

    def feed(self, run: Run, n: int = BUF, skip: int = 0) -> np.ndarray:
        b = self.buffer(n, skip)
        run.feed(b, self.check.check(b["spad"][:, 0]))
        return b


@pytest.fixture
def catalog(tmp_path):
    cat = open_catalog(ArchiveConfig(data_dir=tmp_path / "data"))
    yield cat
    cat.close()


def make_run(tmp_path, catalog, settings=None, stream=None, **kw) -> Run:
    settings = settings or RunSettings()
    settings.check()  # as Readout.start_run does before it builds the run
    trigger = TriggerRegistry(None).create(settings.trigger, dict(settings.trigger_args))
    return Run(settings, stream or info(), tmp_path / "data", catalog, trigger, **kw)


def finish(run: Run) -> None:
    run.stop()
    assert run.wait(30)


def test_run_writes_selected_channels_and_records_it(tmp_path, catalog):
    states = []
    settings = RunSettings(
        channel_list=(3, 1), measurement_name="m1", log="hello", logitems={"coil": "A"}
    )
    run = make_run(tmp_path, catalog, settings, on_state=lambda r: states.append(r.state))
    assert catalog.get_run(run.run_id).state == "running"
    f = Feeder()
    sent = [f.feed(run) for _ in range(3)]
    finish(run)
    assert states == [RunState.RUNNING, RunState.STOPPING, RunState.IDLE]
    assert run.directory == (tmp_path / "data" / "CARD" / run.run_id).resolve()
    header, chans = read_run(run.directory)
    ai = np.concatenate([b["ai"] for b in sent])
    np.testing.assert_array_equal(chans[3], ai[:, 3])
    np.testing.assert_array_equal(chans[1], ai[:, 1])
    assert header["channel_list"] == [3, 1] and header["byte_depth"] == 2
    assert header["measurement_name"] == "m1" and header["coil"] == "A"
    assert header["current_gains"] == {"1": {"0": 0, "1": 1, "2": 2, "3": 3}}  # 0-based
    assert header["gain_conversion"] == {"0": "x1", "1": "x2", "2": "x4", "3": "x8"}
    assert header["first_counter"] == 1 and header["ip"] == "127.0.0.9"
    # The file is named by the date with URL-safe separators; the header has it as the
    # old server wrote it, and its own name.
    assert run.files[0].name == f"{run.date}-0.dig" == header["filename"]
    assert header["date"] == str(datetime.fromtimestamp(run.started, UTC).replace(tzinfo=None))
    rec = catalog.get_run(run.run_id)
    assert rec.state == "complete" and rec.samples == 300 and rec.bytes_written == 300 * 4
    assert [f.sha256 for f in rec.files] == [sha256_of(f.path) for f in rec.files]
    assert rec.files[0].size == Path(rec.files[0].path).stat().st_size


def test_32_bit_words_are_written_unshifted(tmp_path, catalog):
    run = make_run(tmp_path, catalog, stream=info("ACQ437ELF", 4))
    f = Feeder(word=4)
    b = f.feed(run)
    finish(run)
    header, chans = read_run(run.directory)
    assert header["bit_shift"] == 8 and header["byte_depth"] == 4
    np.testing.assert_array_equal(chans[2], b["ai"][:, 2])


def test_downsampled_run_stores_float64_means_of_codes(tmp_path, catalog):
    run = make_run(tmp_path, catalog, RunSettings(downsample=8), stream=info("ACQ437ELF", 4))
    f = Feeder(word=4)
    sent = [f.feed(run, n) for n in (100, 60, 45)]
    finish(run)
    header, chans = read_run(run.directory)
    assert header["is_float"] is True and header["byte_depth"] == 8 and header["bit_shift"] == 0
    codes = np.concatenate([b["ai"] for b in sent]) >> 8
    means = codes[: 205 // 8 * 8].reshape(-1, 8, NCHAN).mean(axis=1)
    np.testing.assert_allclose(chans[0], means[:, 0])
    assert run.record.samples == 200  # 25 means of 8 in the files; 5 samples wait for a block


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_counter_jump_policy(tmp_path, catalog, policy):
    alarms = []
    run = make_run(tmp_path, catalog, on_counter_error=policy, on_alarm=alarms.append)
    f = Feeder()
    first = f.feed(run)
    f.feed(run, skip=0)
    b = f.buffer(BUF)
    b["spad"][60:, 0] += 5  # 5 samples lost before sample 60 of the third buffer
    run.feed(b, f.check.check(b["spad"][:, 0]))
    f.next += 5
    f.feed(run)
    if policy == "continue":
        finish(run)
    assert run.wait(30)
    rec = catalog.get_run(run.run_id)
    assert rec.counter_errors == 1 and "counter jump at sample 260" in alarms[0]
    _, chans = read_run(run.directory)
    np.testing.assert_array_equal(chans[0][:BUF], first["ai"][:, 0])
    # Readbacks, record and files agree: the samples after a jump are never counted.
    assert run.status()["samples"] == rec.samples == len(chans[0])
    if policy == "stop":
        assert run.state is RunState.FAULT and rec.state == "fault"
        assert "expected 261, got 266" in rec.fault
        assert len(chans[0]) == 260  # everything before the jump, nothing after
    else:
        assert run.state is RunState.IDLE and rec.state == "complete" and not rec.fault
        assert len(chans[0]) == 400


class GatedFile:
    """A file whose writes wait until the gate opens: a disk that is stuck."""

    def __init__(self, path: Path, gate: threading.Event):
        self.f = open(path, "xb", buffering=0)  # noqa: SIM115
        self.gate = gate

    def write(self, data) -> int:
        assert self.gate.wait(60), "gate never opened"
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()


class SteppedFile(GatedFile):
    """A disk that takes one write (header or chunk) per permit."""

    def __init__(self, path: Path, permits: threading.Semaphore):
        self.f = open(path, "xb", buffering=0)  # noqa: SIM115
        self.permits = permits

    def write(self, data) -> int:
        assert self.permits.acquire(timeout=60), "no permit given"
        return self.f.write(data)


def wait_free(run: Run, n: int) -> None:
    deadline = time.monotonic() + 30
    while run.output.writer.pool.free < n:
        assert time.monotonic() < deadline, f"the writer never freed {n} buffers"
        time.sleep(0.005)


def test_after_an_overrun_a_run_resumes_only_with_half_the_pool_free(tmp_path, catalog):
    # A writer that stays behind would otherwise start a new file for every buffer.
    permits = threading.Semaphore(0)
    run = make_run(tmp_path, catalog, queue_buffers=4, opener=lambda p: SteppedFile(p, permits))
    f = Feeder()
    sent = [f.feed(run) for _ in range(4)]  # the pool is full
    f.feed(run)  # overrun 1
    permits.release(2)  # the first file's header and chunk 0
    wait_free(run, 1)
    f.feed(run)  # one buffer free of four: still dropped (overrun 2)
    assert run.overruns == 2
    permits.release()  # chunk 1
    wait_free(run, 2)
    resumed = f.feed(run)  # half the pool free: taken, into a new file
    permits.release(100)
    finish(run)
    rec = catalog.get_run(run.run_id)
    assert rec.overruns == 2 and rec.state == "complete" and rec.samples == 5 * BUF
    assert len(rec.files) == 2
    _, c0 = read_dig(rec.files[0].path)
    _, c1 = read_dig(rec.files[1].path)
    np.testing.assert_array_equal(c0[0], np.concatenate([b["ai"] for b in sent])[:, 0])
    np.testing.assert_array_equal(c1[0], resumed["ai"][:, 0])


def test_a_stuck_disk_costs_counted_overruns_never_the_stream(tmp_path, catalog):
    gate = threading.Event()
    alarms = []
    run = make_run(
        tmp_path,
        catalog,
        queue_buffers=2,
        opener=lambda p: GatedFile(p, gate),
        on_alarm=alarms.append,
    )
    f = Feeder()
    sent = [f.feed(run) for _ in range(5)]  # returns at once although nothing is written
    assert run.overruns == 3 and alarms == [f"run {run.run_id}: writer overrun (1)"]
    gate.set()
    deadline = time.monotonic() + 30
    while run.output.writer.pool.free < 2:  # the writer catches up
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sent.append(f.feed(run))
    finish(run)
    rec = catalog.get_run(run.run_id)
    assert rec.overruns == 3 and rec.state == "complete" and rec.samples == 300
    # the data after the overrun starts a new file, so each file is unbroken
    assert len(rec.files) == 2
    h0, c0 = read_dig(rec.files[0].path)
    h1, c1 = read_dig(rec.files[1].path)
    np.testing.assert_array_equal(c0[1], np.concatenate([sent[0]["ai"], sent[1]["ai"]])[:, 1])
    np.testing.assert_array_equal(c1[1], sent[5]["ai"][:, 1])
    assert (h0["first_counter"], h1["first_counter"]) == (1, 501)


def test_a_disk_error_ends_the_run_in_fault(tmp_path, catalog):
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = make_run(tmp_path, catalog, opener=full)
    Feeder().feed(run)
    assert run.wait(30)
    assert run.state is RunState.FAULT and "No space left on device" in run.fault
    assert catalog.get_run(run.run_id).state == "fault"


class Disk:
    """Room left on a disk shared by a run's files: past it a write is cut short, then fails."""

    def __init__(self, room: int):
        self.room = room

    def open(self, path: Path) -> FullFile:
        return FullFile(path, self)


class FullFile:
    def __init__(self, path: Path, disk: Disk):
        self.f = open(path, "xb", buffering=0)  # noqa: SIM115
        self.disk = disk

    def write(self, data) -> int:
        if self.disk.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.f.write(memoryview(data)[: self.disk.room])
        self.disk.room -= n
        return n

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()


def test_a_disk_that_fills_mid_run_leaves_files_that_match_the_record(tmp_path, catalog):
    probe = make_run(tmp_path, catalog)
    header = len(encode_header(file_header(probe.header, probe.date, 0, 1)))  # same for every run
    finish(probe)
    disk = Disk(header + 250 * 8 + 3)  # the third buffer's write is cut short
    run = make_run(tmp_path, catalog, opener=disk.open)
    f = Feeder()
    for _ in range(3):
        f.feed(run)
    assert run.wait(30) and run.state is RunState.FAULT
    rec = catalog.get_run(run.run_id)
    assert rec.state == "fault" and "No space left on device" in rec.fault
    _, chans = read_run(run.directory)
    assert rec.samples == run.status()["samples"] == len(chans[0]) == 200
    (file,) = rec.files
    assert file.size == Path(file.path).stat().st_size == header + 200 * 8  # cut back
    assert file.sha256 == sha256_of(file.path)


def test_a_disk_full_from_the_start_leaves_no_file_and_no_directory(tmp_path, catalog):
    run = make_run(tmp_path, catalog, opener=Disk(10).open)  # not even the header fits
    Feeder().feed(run)
    assert run.wait(30) and run.state is RunState.FAULT
    rec = catalog.get_run(run.run_id)
    assert rec.state == "fault" and "No space left on device" in rec.fault
    assert (rec.samples, rec.files) == (0, [])
    assert not run.directory.exists()


def test_a_run_the_catalog_cannot_record_is_not_started_and_leaves_nothing(tmp_path, catalog):
    catalog.close()  # as good as a catalog on a full disk: it cannot take the row
    with pytest.raises(OSError, match="the catalog cannot record a run"):
        make_run(tmp_path, catalog)
    assert list((tmp_path / "data").glob("CARD/*")) == []


def test_trigger_ranges_rotation_and_end(tmp_path, catalog):
    run = make_run(tmp_path, catalog, RunSettings(trigger="rotate", trigger_args={"bytes": 800}))
    f = Feeder()
    sent = [f.feed(run, 150) for _ in range(3)]  # 8 bytes a sample: 100 samples per file
    finish(run)
    assert [len(read_dig(p.path)[1][0]) for p in run.files] == [100, 100, 100, 100, 50]
    _, chans = read_run(run.directory)
    np.testing.assert_array_equal(chans[2], np.concatenate([b["ai"][:, 2] for b in sent]))
    run = make_run(
        tmp_path, catalog, RunSettings(trigger="sample_count", trigger_args={"samples": 130})
    )
    sent = [f.feed(run) for _ in range(2)]
    assert run.wait(30) and run.state is RunState.IDLE
    _, chans = read_run(run.directory)
    np.testing.assert_array_equal(chans[0], np.concatenate([b["ai"][:, 0] for b in sent])[:130])
    f.feed(run)  # an ended run ignores buffers
    assert run.samples_received == 200 and run.samples == 130


def test_a_failing_trigger_faults_the_run(tmp_path, catalog):
    (tmp_path / "trig").mkdir()
    (tmp_path / "trig" / "t.py").write_text(
        "class Boom(Trigger):\n    def trigger(self, v):\n        return 1 / 0\n"
    )
    run = Run(
        RunSettings(trigger="Boom"),
        info(),
        tmp_path / "data",
        catalog,
        TriggerRegistry(tmp_path / "trig").create("Boom"),
    )
    Feeder().feed(run)
    assert run.wait(30)
    assert run.state is RunState.FAULT
    assert run.fault == "trigger Boom failed: ZeroDivisionError: division by zero"


def test_stream_end_keeps_the_data_and_records_why(tmp_path, catalog):
    run = make_run(tmp_path, catalog)
    f = Feeder()
    b = f.feed(run, 37)
    run.stream_ended("CARD: stream closed by the card after 296 bytes")
    assert run.wait(30)
    rec = catalog.get_run(run.run_id)
    assert rec.state == "interrupted" and "closed by the card" in rec.fault
    np.testing.assert_array_equal(read_run(run.directory)[1][0], b["ai"][:, 0])


def test_no_files_when_not_saving(tmp_path, catalog):
    run = make_run(tmp_path, catalog, RunSettings(save_files=False))
    Feeder().feed(run)
    finish(run)
    assert not run.directory.exists() and run.record.samples == 100 and run.files == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (RunSettings(channel_list=(0, 9)), "unknown channel 9 (channels are 0..3)"),
        (RunSettings(downsample=0), "downsample must be >= 1, got 0"),
        (RunSettings(channel_list=(1, 1)), "channel_list repeats channels [1]"),
        (RunSettings(logitems={"channel_list": 1}), "logitem 'channel_list' clashes"),
        (RunSettings(trigger="import os"), "trigger must be a trigger name"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, catalog, settings, message):
    with pytest.raises(SettingsError) as exc:
        make_run(tmp_path, catalog, settings)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "data" / "CARD").exists()


def test_unknown_trigger_and_small_buffer(tmp_path, catalog):
    with pytest.raises(TriggerError, match="unknown trigger 'nope'; available: always"):
        make_run(tmp_path, catalog, RunSettings(trigger="nope"))
    with pytest.raises(SettingsError, match="below one sample"):
        RunSettings(buffer_bytes=10).buffer_samples(40, 1000, 1 << 20)
    assert RunSettings(buffer_bytes=1000).buffer_samples(40, 7, 1 << 20) == 25


def test_settings_from_a_clients_dict_with_old_names():
    s = RunSettings.from_dict(
        {
            "mod_list": [1],
            "buffer_size": 4096,
            "should_save": False,
            "channel_list": [0, 2],
            "downsample": 2,
            "logitems": {"x": 1},
            "trigger": "always",
        }
    )
    assert (s.sites, s.buffer_bytes, s.save_files, s.channel_list) == ((1,), 4096, False, (0, 2))
    with pytest.raises(SettingsError, match="unknown run setting 'code'"):
        RunSettings.from_dict({"code": "print(1)"})
    with pytest.raises(SettingsError, match="trigger must be a trigger name"):
        RunSettings.from_dict({"trigger": "class T(Trigger): pass"})


def test_a_state_callback_may_stop_the_run(tmp_path, catalog):
    def on_state(run: Run) -> None:
        if run.state is RunState.RUNNING:
            run.stop()  # on the socket thread, inside feed()

    run = make_run(tmp_path, catalog, on_state=on_state)
    Feeder().feed(run)
    assert run.wait(30) and run.state is RunState.IDLE
    assert run.output.samples_written == 0 and run.overruns == 0
