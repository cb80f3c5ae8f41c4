"""ophyd 1.11 and bluesky 1.15 against a real IOC: a card's settings, a waveform, run control.

ophyd reaches the IOC through pyepics (libca). Stock pyepics drops the status of a put
callback, so ophyd cannot see why a put was refused; what it can see is the IOC's
limits (a set outside them raises at once), a readback that never follows (the set's
own timeout), and the IOC's LAST_ERROR.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from ioc_support import castr, ioc_process, ioc_toml, new_prefix, wait_for
from support import random_loopback

DISPLAY_SAMPLES = 256
MIN_RATE_HZ = 5000.0  # the config's min_sample_rate_hz (its default)


@pytest.fixture(scope="module")
def ioc(tmp_path_factory) -> Iterator:
    host, prefix = random_loopback(), new_prefix()
    config = ioc_toml(tmp_path_factory.mktemp("ophyd"), host, prefix,
                      display_samples=DISPLAY_SAMPLES)  # fmt: skip
    with ioc_process(config, prefix, host) as running:
        yield running


@pytest.fixture(scope="module")
def signals(ioc):
    from ophyd import EpicsSignal, EpicsSignalRO, EpicsSignalWithRBV

    sigs = {
        # limits=True: ophyd checks a set against the IOC's control limits before the put.
        "clkdiv": EpicsSignalWithRBV(ioc.pv("CLKDIV"), name="clkdiv", limits=True),
        "wf": EpicsSignalRO(ioc.pv("1:AI:WF:01"), name="wf"),
        # Actions read back 0 once done: their set completes with the put (put_complete).
        "start": EpicsSignal(ioc.pv("RUN:START"), name="start", put_complete=True),
        "stop": EpicsSignal(ioc.pv("RUN:STOP"), name="stop", put_complete=True),
        "run_state": EpicsSignalRO(ioc.pv("RUN:STATE_RBV"), name="run_state", string=True),
        "rate": EpicsSignalRO(ioc.pv("SAMPLE_RATE_RBV"), name="rate"),
        "sysclk": EpicsSignalRO(ioc.pv("SYSCLK_RBV"), name="sysclk"),
        "divider": EpicsSignalRO(ioc.pv("1:DIVIDER_RBV"), name="divider"),
    }
    for sig in sigs.values():
        sig.wait_for_connection(timeout=10)
    yield sigs
    for sig in sigs.values():
        sig.destroy()


def test_connect_read_and_describe(signals):
    clk, wf = signals["clkdiv"], signals["wf"]
    reading = clk.read()["clkdiv"]
    assert isinstance(reading["value"], int) and reading["timestamp"] > 0
    desc = clk.describe()["clkdiv"]
    assert desc["dtype"] == "integer" and desc["shape"] == []
    assert desc["lower_ctrl_limit"] < desc["upper_ctrl_limit"]
    assert desc["lower_ctrl_limit"] <= reading["value"] <= desc["upper_ctrl_limit"]
    wf_desc = wf.describe()["wf"]
    assert wf_desc["dtype"] == "array" and wf_desc["shape"] == [DISPLAY_SAMPLES]
    assert len(wf.read()["wf"]["value"]) == DISPLAY_SAMPLES
    assert signals["run_state"].get() == "IDLE"


def test_set_waits_for_the_readback(signals):
    clk = signals["clkdiv"]
    for value in (250, 200):
        clk.set(value, timeout=10).wait(timeout=10)
        assert clk.get() == value  # the readback, CLKDIV_RBV
        assert clk.get_setpoint() == value


def test_a_set_outside_the_limits_fails_at_once(signals):
    from ophyd.utils import LimitError

    clk = signals["clkdiv"]
    hi = clk.limits[1]
    t0 = time.monotonic()
    with pytest.raises(LimitError):
        clk.set(hi + 1000, timeout=5).wait(timeout=5)
    assert time.monotonic() - t0 < 2.0


def test_a_refused_set_fails_within_its_timeout_says_why_and_blocks_nothing(ioc, signals):
    """A clkdiv within the limits whose rate would be below min_sample_rate_hz."""
    clk = signals["clkdiv"]
    clock = signals["sysclk"].get() / signals["divider"].get()
    refused = int(clock / MIN_RATE_HZ) + 1
    lo, hi = clk.limits
    assert lo <= refused <= hi, (refused, clk.limits)
    t0 = time.monotonic()
    status = clk.set(refused, timeout=2.0)
    with pytest.raises(Exception):  # noqa: B017 - ophyd's StatusTimeoutError or a put failure
        status.wait(timeout=10)
    assert time.monotonic() - t0 < 4.0
    text = wait_for(lambda: (t := castr(ioc.pv("LAST_ERROR"))) and str(refused) in t and t,
                    "LAST_ERROR naming the refused value", 5)  # fmt: skip
    assert "CLKDIV" in text and "\n" not in text.strip(), text
    assert clk.get() != refused
    t0 = time.monotonic()
    clk.set(250, timeout=10).wait(timeout=10)  # the next set is not held up
    assert clk.get() == 250 and time.monotonic() - t0 < 5.0


def test_run_control_starts_and_stops_a_run(signals):
    state = signals["run_state"]
    signals["start"].set(1, timeout=10).wait(timeout=10)
    wait_for(lambda: state.get() == "RUNNING", "the run started")
    signals["stop"].set(1, timeout=10).wait(timeout=10)
    wait_for(lambda: state.get() == "IDLE", "the run stopped")


def test_a_bluesky_count_gives_documents_that_validate(signals):
    import event_model
    from bluesky import RunEngine
    from bluesky.plans import count

    docs: list[tuple[str, dict]] = []
    engine = RunEngine({}, call_returns_result=True)
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    result = engine(count([signals["clkdiv"], signals["rate"], signals["wf"]], num=3))
    assert result.exit_status == "success"
    names = [name for name, _ in docs]
    assert names[0] == "start" and names[-1] == "stop" and names.count("event") == 3
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    assert descriptor["data_keys"]["wf"]["shape"] == [DISPLAY_SAMPLES]
    event = next(doc for name, doc in docs if name == "event")
    assert len(event["data"]["wf"]) == DISPLAY_SAMPLES
    assert docs[-1][1]["exit_status"] == "success"


def test_pyepics_reads_the_applied_value_right_after_a_put_with_wait(ioc):
    """A put completes once the setting reached the card and its readback was read back."""
    import epics

    for value in (300, 250):
        assert epics.caput(ioc.pv("CLKDIV"), value, wait=True, timeout=10) == 1
        assert epics.caget(ioc.pv("CLKDIV"), use_monitor=False, timeout=5) == value
        assert epics.caget(ioc.pv("CLKDIV_RBV"), use_monitor=False, timeout=5) == value
