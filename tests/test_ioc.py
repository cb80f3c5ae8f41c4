"""The IOC as operators use it: a real `dtacq-ioc run` process, pyepics (libca) and caproto.

The card is a simulated ACQ425ELF at its real ports on a loopback address of the
test's own; the IOC starts the simulator itself, as `dtacq-ioc run` does.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import epics
import numpy as np
import pytest
from caproto import ChannelType, ErrorResponseReceived
from caproto.sync.client import read as ca_read
from caproto.sync.client import write as ca_write
from caproto.threading.client import Context
from ioc_support import caget, castr, ioc_process, ioc_toml, new_prefix, wait_for

from dtacq_ioc.archive.dig import read_run
from dtacq_ioc.archive.sqlite import SqliteCatalog
from dtacq_ioc.card.knobs import KnobClient
from dtacq_ioc.card.models import module_spec
from dtacq_ioc.config import load_config
from dtacq_ioc.readout.display import amplitude_spectrum
from dtacq_ioc.sim.signals import SignalTable, SiteSignals

SINE = '[{kind = "sine", amplitude_v = 5.0, freq_hz = 1000.0}]'
SIGNALS = f"signals = {SINE}"


@pytest.fixture
def ioc(tmp_path, loopback):
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=SIGNALS)
    with ioc_process(config, prefix, loopback) as running_ioc:
        yield running_ioc


@pytest.fixture(params=["process", "thread"])
def ioc_either_readout(request, tmp_path, loopback):
    """The IOC with its readout in a process per card (the default) or in a thread."""
    prefix = new_prefix()
    extra = f'readout = "{request.param}"'
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=SIGNALS, ioc_extra=extra)
    with ioc_process(config, prefix, loopback) as running_ioc:
        yield running_ioc


def sim_knob(host: str, knob: str, value: object = None, site: int = 0) -> str:
    """Talk to the simulated card directly, as an engineer with nc would."""
    client = KnobClient("sim", host, site, 4220 + site, 5.0)
    try:
        return client.query(knob) if value is None else client.set(knob, value)
    finally:
        client.close()


def put(name: str, value, wait: bool = True):
    return epics.caput(name, value, wait=wait, timeout=10.0)


def assert_put_refused(name: str, value) -> None:
    """caproto's sync client reports a failed put (pyepics does not tell put failures apart)."""
    with pytest.raises(ErrorResponseReceived):
        ca_write(name, value, notify=True, timeout=10)


def test_identity_and_settings_readable_with_pyepics_and_caproto(ioc):
    assert caget(ioc.pv("MODEL")) == "acq2106"
    assert caget(ioc.pv("1:MODEL")) == "ACQ425ELF"
    assert caget(ioc.pv("1:NCHAN")) == 16
    assert caget(ioc.pv("CONNECTED"), as_string=True) == "Yes"
    assert caget(ioc.pv("SAMPLE_RATE_RBV")) == pytest.approx(1e6)
    ctx = Context()
    try:
        model, state, desc = ctx.get_pvs(
            ioc.pv("1:MODEL"), ioc.pv("STATE"), ioc.pv("CLKDIV.DESC"), timeout=5
        )
        assert model.read().data[0] == b"ACQ425ELF"
        assert state.read(data_type=ChannelType.STRING).data[0] == b"IDLE"
        assert desc.read().data[0] == b"Clock divider"
        units = ctx.get_pvs(ioc.pv("SAMPLE_RATE_RBV"))[0].read(data_type="control")
        assert units.metadata.units == b"Hz"
    finally:
        ctx.disconnect()


def test_clkdiv_put_changes_readback_and_the_cards_actual_rate(ioc):
    assert put(ioc.pv("CLKDIV"), 200) == 1
    wait_for(lambda: caget(ioc.pv("CLKDIV_RBV")) == 200, "CLKDIV_RBV 200")
    assert caget(ioc.pv("SAMPLE_RATE_RBV")) == pytest.approx(500_000)
    assert sim_knob(ioc.host, "clkdiv", site=1) == "200"
    # The stream itself now runs at the new rate: count samples over a measured interval.
    wait_for(lambda: caget(ioc.pv("STREAM:MBPS")) > 0, "stream flowing")
    s0, t0 = caget(ioc.pv("STREAM:SAMPLES")), time.monotonic()
    wait_for(lambda: caget(ioc.pv("STREAM:SAMPLES")) > s0 + 1_500_000, "1.5 M samples")
    s1, t1 = caget(ioc.pv("STREAM:SAMPLES")), time.monotonic()
    assert (s1 - s0) / (t1 - t0) == pytest.approx(500_000, rel=0.25)


def test_bad_puts_are_refused_and_change_nothing(ioc):
    before = caget(ioc.pv("CLKDIV"))
    # Below the module's limit: caproto refuses it before any code of ours runs.
    assert_put_refused(ioc.pv("CLKDIV"), [10])
    # Within the limit but a rate below the 5 kHz minimum: the IOC refuses it.
    assert_put_refused(ioc.pv("CLKDIV"), [60000])
    assert caget(ioc.pv("CLKDIV")) == before
    assert caget(ioc.pv("CLKDIV_RBV")) == before
    assert "below the minimum" in castr(ioc.pv("LAST_ERROR"))
    assert_put_refused(ioc.pv("RUN:CHANNELS"), b"0,banana")
    assert_put_refused(ioc.pv("RUN:TRIGGER"), [b"no_such_trigger"])
    assert caget(ioc.pv("RUN:TRIGGER")) == "always"
    assert castr(ioc.pv("RUN:CHANNELS")) == ""
    # The refusal marks the setpoint (WRITE/MAJOR), not the card's readbacks...
    assert severity(ioc.pv("CLKDIV")) == 2 and severity(ioc.pv("CLKDIV_RBV")) == 0
    # ...and the next good put clears it.
    assert put(ioc.pv("CLKDIV"), 200) == 1
    assert severity(ioc.pv("CLKDIV")) == 0


def test_text_settings_accept_empty_puts(ioc):
    ca_write(ioc.pv("RUN:LOG"), b"a log line", notify=True, timeout=10)
    assert castr(ioc.pv("RUN:LOG")) == "a log line"
    ca_write(ioc.pv("RUN:LOG"), b"", notify=True, timeout=10)
    assert castr(ioc.pv("RUN:LOG")) == ""


def severity(name: str) -> int:
    pv = epics.get_pv(name, form="time", connect=True)
    return pv.get_with_metadata(use_monitor=False, form="time")["severity"]


def test_gain_put_reaches_the_card_and_scales_volts(ioc):
    labels = caget(ioc.pv("1:GAIN:01"), as_string=True)
    assert labels == "x1"
    assert put(ioc.pv("1:GAIN:01"), "x2") == 1
    wait_for(lambda: sim_knob(ioc.host, "gain1", site=1) == "1", "gain1 on the card")
    # A 5 V sine on the ±5 V range: the volts readback still shows 5 V peaks.
    wait_for(lambda: abs(caget(ioc.pv("1:AI:CH:01:MAX")) - 5.0) < 0.1, "5 V peaks at x2")
    assert put(ioc.pv("1:GAIN:ALL"), "x4") == 1
    wait_for(lambda: sim_knob(ioc.host, "gains", site=1) == "2" * 16, "all gains x4")
    assert caget(ioc.pv("1:GAIN:07"), as_string=True) == "x4"


def test_waveform_monitor_sees_the_sine_at_the_display_rate(ioc):
    frames: list[tuple[float, np.ndarray]] = []
    pv = epics.PV(ioc.pv("1:AI:WF:01:V"), auto_monitor=True)
    pv.add_callback(lambda value=None, **kw: frames.append((time.monotonic(), value)))
    try:
        wait_for(lambda: len(frames) >= 21, "21 waveform updates")
    finally:
        pv.clear_callbacks()
        pv.disconnect()
    times = [t for t, _ in frames[1:]]
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 5.0 < rate < 15.0, rate  # display rate 10 Hz
    wf = frames[-1][1]
    assert len(wf) == 1024
    assert wf.max() == pytest.approx(5.0, abs=0.05) and wf.min() == pytest.approx(-5.0, abs=0.05)
    # 1 kHz at 1 MHz: 1000 samples a period, so the waveform repeats 1000 samples on.
    np.testing.assert_allclose(wf[1000:], wf[:24], atol=0.01)
    spec = caget(ioc.pv("1:AI:SPEC:01"))
    freq = caget(ioc.pv("1:AI:SPEC:FREQ"))
    assert freq[int(np.argmax(spec))] == pytest.approx(1000, abs=2 * freq[1])


def test_a_run_through_pvs_archives_exactly_what_the_card_sent(ioc_either_readout):
    ioc = ioc_either_readout
    assert put(ioc.pv("CLKDIV"), 1000) == 1  # 100 kHz
    wait_for(lambda: caget(ioc.pv("SAMPLE_RATE_RBV")) == 100_000, "100 kHz")
    assert put(ioc.pv("RUN:NAME"), "pv run") == 1
    assert put(ioc.pv("RUN:LOG"), "started from pyepics") == 1
    assert put(ioc.pv("RUN:START"), 1) == 1
    wait_for(lambda: caget(ioc.pv("RUN:STATE_RBV"), as_string=True) == "RUNNING", "RUNNING")
    wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) > 150_000, "1.5 s of samples")
    assert put(ioc.pv("RUN:STOP"), 1) == 1
    result = wait_for(lambda: castr(ioc.pv("RUN:LAST_RESULT")), "a run result")
    result = json.loads(result)
    assert result["state"] == "IDLE" and not result["fault"], result
    header, chans = read_run([ioc.data_dir / f for f in result["files"]])
    assert header["measurement_name"] == "pv run" and header["log"] == "started from pyepics"
    config = load_config(ioc.config)
    spec = module_spec("ACQ425ELF")
    sim_site = config.cards[0].sim.sites[0]
    table = SignalTable([SiteSignals(1, spec, sim_site.signals, (0,) * 16, False)], 100_000)
    n = len(chans[0])
    assert n == result["samples"] > 150_000
    want = table.site_words(1, header["first_counter"] - 1, n)
    for ch in range(16):
        np.testing.assert_array_equal(chans[ch], want[:, ch])
    catalog = SqliteCatalog(ioc.data_dir / "runs.sqlite")
    try:
        record = catalog.get_run(result["run_id"])
        assert record.state == "complete" and record.samples == n
    finally:
        catalog.close()
    recent = json.loads(castr(ioc.pv("RUN:RECENT")))
    assert recent[0]["run_id"] == result["run_id"]


def test_access_rules_refuse_writes_from_other_hosts(tmp_path, loopback):
    prefix = new_prefix()
    config = ioc_toml(
        tmp_path, loopback, prefix, ioc_extra='[ioc.access]\nwrite_hosts = ["control-room"]'
    )
    with ioc_process(config, prefix, loopback) as ioc:
        pv = epics.PV(ioc.pv("CLKDIV"))
        assert pv.wait_for_connection(5)
        assert pv.read_access and not pv.write_access
        with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
            pv.put(200, wait=True)
        assert caget(ioc.pv("CLKDIV")) == 100
        pv.disconnect()


def test_settings_are_autosaved_and_restored(tmp_path, loopback):
    # A new prefix per start: pyepics must not answer from the previous IOC's channels.
    def start():
        prefix = new_prefix()
        return ioc_process(ioc_toml(tmp_path, loopback, prefix), prefix, loopback)

    with start() as ioc:
        assert put(ioc.pv("CLKDIV"), 250) == 1
        assert put(ioc.pv("RUN:NAME"), "kept across restarts") == 1
        assert put(ioc.pv("1:GAIN:03"), "x8") == 1
        saved = tmp_path / "autosave" / "test.json"
        wait_for(lambda: saved.exists() and "kept across" in saved.read_text(), "autosave file")
    with start() as ioc:
        assert caget(ioc.pv("CLKDIV")) == 250
        assert caget(ioc.pv("CLKDIV_RBV")) == 250  # applied to the (restarted) card
        assert castr(ioc.pv("RUN:NAME")) == "kept across restarts"
        wait_for(lambda: caget(ioc.pv("1:GAIN:03"), as_string=True) == "x8", "gain restored")
        assert sim_knob(ioc.host, "gain3", site=1) == "3"
    saved.write_text("{ not json")
    with start() as ioc:
        assert caget(ioc.pv("CLKDIV")) == 100  # defaults
        assert caget(ioc.pv("CLKDIV_RBV")) == 100
        assert "corrupt" in castr(ioc.pv("LAST_ERROR"))


def test_sigterm_mid_run_closes_the_run_and_its_files(tmp_path, loopback):
    prefix = new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix)
    with ioc_process(config, prefix, loopback) as ioc:
        put(ioc.pv("CLKDIV"), 1000)
        assert put(ioc.pv("RUN:START"), 1) == 1
        wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) > 50_000, "run under way")
        run_id = castr(ioc.pv("RUN:ID_RBV"))
        ioc.proc.send_signal(signal.SIGTERM)
        assert ioc.proc.wait(30) == 0
    catalog = SqliteCatalog(tmp_path / "data" / "runs.sqlite")
    try:
        record = catalog.get_run(run_id)
    finally:
        catalog.close()
    assert record.state in ("complete", "fault") and record.samples > 50_000
    _, chans = read_run([f.path for f in record.files])
    assert len(chans[0]) == record.samples


def test_hostile_measurement_names_never_become_paths(ioc, tmp_path):
    name = "../../../../tmp/evil/..\\x/\x01name"
    assert put(ioc.pv("CLKDIV"), 1000) == 1
    assert put(ioc.pv("RUN:NAME"), name) == 1
    assert put(ioc.pv("RUN:START"), 1) == 1
    wait_for(lambda: caget(ioc.pv("RUN:SAMPLES_RBV")) > 20_000, "a run under way")
    assert put(ioc.pv("RUN:STOP"), 1) == 1
    result = json.loads(wait_for(lambda: castr(ioc.pv("RUN:LAST_RESULT")), "a run result"))
    root = ioc.data_dir.resolve()
    files = [(ioc.data_dir / f).resolve() for f in result["files"]]
    assert files and all(f.is_relative_to(root / "C1") for f in files)
    header, _ = read_run(files)
    assert header["measurement_name"] == name  # kept verbatim, as text only
    assert not (tmp_path.parent / "evil").exists() and not Path("/tmp/evil").exists()


def test_a_watched_spectrum_updates_at_the_display_rate(ioc):
    # Unwatched spectra are computed only when read; a monitor makes them live.
    frames: list[float] = []
    pv = epics.PV(ioc.pv("1:AI:SPEC:01"), auto_monitor=True)
    pv.add_callback(lambda value=None, **kw: frames.append(time.monotonic()))
    try:
        wait_for(lambda: len(frames) >= 12, "12 spectrum updates")
    finally:
        pv.clear_callbacks()
        pv.disconnect()
    rate = (len(frames) - 2) / (frames[-1] - frames[1])
    assert rate > 5.0, rate  # display rate 10 Hz, not the 1 Hz idle refresh


def unmonitored_read(name: str) -> tuple[np.ndarray, float]:
    """A read without a subscription, and the value's timestamp: the PV stays unwatched
    (pyepics' caget would subscribe to an array this small and keep the subscription)."""
    pv = epics.PV(name, form="time", auto_monitor=False)
    try:
        assert pv.wait_for_connection(5.0), name
        got = pv.get_with_metadata(use_monitor=False, form="time", timeout=5.0)
    finally:
        pv.disconnect()
    assert got is not None, name
    return got["value"], got["timestamp"]


def latest_frame_time(ioc) -> float:
    """When the newest frame was published: AI:COUNTER changes with every frame."""
    pv = epics.get_pv(ioc.pv("AI:COUNTER"), form="time", connect=True)
    return pv.get_with_metadata(use_monitor=False, form="time")["timestamp"]


def simulated_volts(ioc, rate_hz: float, samples: int) -> np.ndarray:
    """The first `samples` samples (rows) the simulated site 1 sends, in volts at gain x1."""
    spec = module_spec("ACQ425ELF")
    signals = load_config(ioc.config).cards[0].sim.sites[0].signals
    table = SignalTable([SiteSignals(1, spec, signals, (0,) * 16, False)], rate_hz)
    return table.site_words(1, 0, samples) * spec.volts_per_code(0)


def distance_to_signal(wf: np.ndarray, signal: np.ndarray) -> float:
    """The largest difference between `wf` and the stretch of `signal` it fits best."""
    windows = np.lib.stride_tricks.sliding_window_view(signal, len(wf))
    return float(np.abs(windows - wf).max(axis=1).min())


def test_unwatched_raw_waveforms_and_statistics_are_read_from_the_latest_frame(ioc):
    # No frame writes an unwatched PV (most of them, most frames): a read brings it up.
    wait_for(lambda: caget(ioc.pv("STREAM:SAMPLES")) > 0, "samples streaming")
    suffixes = ("1:AI:WF:03", "1:AI:WF:03:V", "1:AI:CH:03", "1:AI:CH:03:MIN",
                "1:AI:CH:03:MAX", "1:AI:CH:03:RMS")  # fmt: skip

    def one_frame() -> list[Any] | None:
        published = latest_frame_time(ioc)
        reads = [unmonitored_read(ioc.pv(s)) for s in suffixes]
        assert all(stamp >= published for _, stamp in reads), "older than the latest frame"
        return [v for v, _ in reads] if len({stamp for _, stamp in reads}) == 1 else None

    raw, volts, mean, low, high, rms = wait_for(one_frame, "six PVs of one frame")
    assert len(raw) == 1024 and raw.dtype.kind == "i" and np.ptp(raw) > 100
    np.testing.assert_allclose(volts, raw * (volts[np.argmax(raw)] / raw.max()), rtol=1e-12)
    assert (low, high) == pytest.approx((volts.min(), volts.max()), rel=1e-12)
    assert mean == pytest.approx(volts.mean(), rel=1e-9, abs=1e-12)
    assert rms == pytest.approx(float(np.sqrt(np.mean(volts**2))), rel=1e-9)


def test_unwatched_volts_and_spectra_are_read_from_the_latest_frame(ioc):
    # Nobody monitors these PVs, so no frame computes them: a read must.
    n = 1024  # display_samples
    period = 5000  # the slowest channel read here: 200 Hz at 1 MHz
    signal = simulated_volts(ioc, 1e6, period + n)
    wait_for(lambda: caget(ioc.pv("STREAM:SAMPLES")) > 0, "samples streaming")
    for ch in (1, 2):  # 5 V at 1 kHz (the config), 1 V at 200 Hz (the simulator's default)
        published = latest_frame_time(ioc)
        volts, stamp = unmonitored_read(ioc.pv(f"1:AI:WF:{ch:02d}:V"))
        assert stamp >= published, "older than the latest frame"
        assert len(volts) == n and np.abs(volts).max() > 0.5
        assert distance_to_signal(volts, signal[:, ch - 1]) < 1e-9

    def same_frame() -> tuple[np.ndarray, np.ndarray] | None:
        published = latest_frame_time(ioc)
        spec, spec_stamp = unmonitored_read(ioc.pv("1:AI:SPEC:01"))
        volts, volts_stamp = unmonitored_read(ioc.pv("1:AI:WF:01:V"))
        assert spec_stamp >= published, "older than the latest frame"
        return (spec, volts) if spec_stamp == volts_stamp else None

    spec, volts = wait_for(same_frame, "a spectrum and volts of one frame")
    np.testing.assert_allclose(spec, amplitude_spectrum(volts[None], 1e6)[0][0], atol=1e-9)
    freq, _ = unmonitored_read(ioc.pv("1:AI:SPEC:FREQ"))
    peak = int(np.argmax(spec))
    assert freq[peak] == pytest.approx(1000, abs=freq[1]) and spec[peak] == pytest.approx(
        5, rel=0.05
    )
    # caproto's client (caproto-get) reads the same way.
    other = ca_read(ioc.pv("1:AI:SPEC:02"), timeout=5)
    assert len(other.data) == n // 2 + 1 and other.data.max() > 0.1
