"""Puts as Channel Access clients make them: each refusal in words and alone, each
accepted put complete before the client hears, and no client able to flood the log."""

from __future__ import annotations

import epics
import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType, ErrorResponseReceived
from caproto.sync.client import read as ca_read
from caproto.sync.client import write as ca_write
from ioc_support import castr, ioc_process, ioc_toml, new_prefix, wait_for
from support import output


@pytest.fixture
def ioc(tmp_path, loopback):
    prefix = new_prefix()
    with ioc_process(ioc_toml(tmp_path, loopback, prefix), prefix, loopback) as running_ioc:
        yield running_ioc


def _alarm(name: str) -> tuple[AlarmStatus, AlarmSeverity]:
    md = ca_read(name, data_type=ChannelType.TIME_STRING, timeout=10)  # any type reads so
    return AlarmStatus(md.metadata.status), AlarmSeverity(md.metadata.severity)


def _message(err: ErrorResponseReceived) -> str:
    """The refusal's words, as a client's error message shows them."""
    return bytes(err.args[0].error_message).rstrip(b"\0").decode()


def test_a_put_completes_with_the_readback_published(ioc):
    ca_write(ioc.pv("CLKDIV"), 250, notify=True, timeout=20)
    # No waiting: the put answered only once the card had it and the readback was read.
    assert ca_read(ioc.pv("CLKDIV_RBV"), timeout=10).data[0] == 250
    assert ca_read(ioc.pv("CLKDIV"), timeout=10).data[0] == 250
    assert ca_read(ioc.pv("SAMPLE_RATE_RBV"), timeout=10).data[0] == pytest.approx(400000.0)


@pytest.mark.parametrize(
    ("suffix", "value", "reason"),
    [
        ("CLKDIV", 3, "3 is outside 50..65535"),
        ("EXT_CLOCK", 5, "5 is not a state index 0..1 (Internal, External)"),
        ("RUN:SAVE", 2, "2 is not a state index 0..1 (No, Yes)"),
        ("EXT_CLOCK_FREQ", float("nan"), "nan is not a finite number"),
        ("RUN:CHANNELS", "0-100000", "'0-100000' is not within the channels 0..15"),
        ("RUN:CHANNELS", "1,1", "channel 1 is listed twice"),
        ("RUN:TRIGGER_ARGS", "[1]", "'[1]' is not a JSON object"),
        ("RUN:TRIGGER", "nope", "unknown trigger 'nope'"),
    ],
)
def test_a_refused_put_names_pv_value_and_reason_and_alarms_only_that_pv(
    ioc, suffix, value, reason
):
    with pytest.raises(ErrorResponseReceived) as err:
        ca_write(ioc.pv(suffix), value, notify=True, timeout=20)
    assert reason in _message(err.value)
    last = castr(ioc.pv("LAST_ERROR"))  # set before the client heard of the refusal
    assert reason in last and suffix in last and "\n" not in last
    for word in ("Error", "Exception", "Traceback"):
        assert word not in last
    assert _alarm(ioc.pv(suffix)) == (AlarmStatus.WRITE, AlarmSeverity.MAJOR_ALARM)
    for other in ("STATE", "HEARTBEAT", "HOST", "CLKDIV_RBV", "RUN:STATE_RBV", "BUFFER_SIZE"):
        if other != suffix:
            assert _alarm(ioc.pv(other))[1] == AlarmSeverity.NO_ALARM, other
    # The value was never stored; every PV still reads.
    assert ca_read(ioc.pv(suffix), timeout=10) is not None


def test_the_iocs_last_error_keeps_the_newest_across_its_updates(tmp_path, loopback):
    """A card's refusal, then one of the IOC's own PVs': the IOC's LAST_ERROR, which its
    status loop refreshes from every card once a second, keeps the newer of the two."""
    # Status PVs of this IOC's own, so that no channel pyepics keeps for the session (it
    # keeps one per name) can be answered by another test's IOC.
    prefix, status = new_prefix(), new_prefix()
    config = ioc_toml(tmp_path, loopback, prefix, ioc_extra=f'prefix = "{status}"')
    with ioc_process(config, prefix, loopback) as ioc:
        with pytest.raises(ErrorResponseReceived):
            ca_write(ioc.pv("CLKDIV"), 3, notify=True, timeout=20)
        with pytest.raises(ErrorResponseReceived):
            ca_write(status + "SHOTS:ARM", 5, notify=True, timeout=20)
        beat = ca_read(status + "HEARTBEAT", timeout=10).data[0]
        wait_for(lambda: ca_read(status + "HEARTBEAT", timeout=10).data[0] >= beat + 2,
                 "two more updates of the status PVs")  # fmt: skip
        last = castr(status + "LAST_ERROR")
    assert "SHOTS:ARM" in last and "5 is not a state index" in last, last


def test_a_good_put_clears_the_write_alarm(ioc):
    with pytest.raises(ErrorResponseReceived):
        ca_write(ioc.pv("RUN:DOWNSAMPLE"), 0, notify=True, timeout=20)
    assert _alarm(ioc.pv("RUN:DOWNSAMPLE"))[1] == AlarmSeverity.MAJOR_ALARM
    ca_write(ioc.pv("RUN:DOWNSAMPLE"), 4, notify=True, timeout=20)
    assert _alarm(ioc.pv("RUN:DOWNSAMPLE")) == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)


def test_a_thousand_refusals_add_a_few_log_lines_and_no_traceback(ioc):
    before = len(output(ioc.proc).splitlines())
    pv = epics.PV(ioc.pv("CLKDIV"), auto_monitor=False)
    assert pv.wait_for_connection(timeout=10)
    for _ in range(1000):
        pv.put(1, wait=True, timeout=10)  # refused: below the lower limit; answered each time
    added = output(ioc.proc).splitlines()[before:]
    assert len([line for line in added if "refused" in line]) <= 3, added[:10]
    assert not [line for line in added if "Traceback" in line]
    assert len(added) <= 10, added[:20]


HOSTILE_VALUES = (1e300, -1e300, float("nan"), float("inf"), float("-inf"), -1, 99, "",
                  "not a number", "x" * 10_000)  # fmt: skip


def test_a_put_fuzz_over_every_writable_pv_leaves_every_pv_readable(ioc):
    """Hostile values to every setpoint (actions excepted: they act), then every PV of the
    card still answers a read of every type family, and a fresh client is served."""
    from caproto import AccessRights
    from caproto import ErrorResponseReceived as Refused
    from caproto.threading.client import Context

    from dtacq_ioc.config import load_config
    from dtacq_ioc.ioc.cardgroup import served_suffixes

    config = load_config(ioc.config)
    suffixes = sorted(served_suffixes(config.cards[0], config.ioc))
    ctx = Context()
    try:
        pvs = ctx.get_pvs(*(ioc.pv(s) for s in suffixes), timeout=10)
        for pv in pvs:
            pv.wait_for_connection(timeout=10)
        actions = ("START", "STOP", "RESET", "REBOOT", "SET_ARM", "SET_ABORT", "SOFT_TRIGGER")
        writable = [
            pv.name for pv in pvs
            if pv.channel.access_rights & AccessRights.WRITE and not pv.name.endswith(actions)
        ]  # fmt: skip
        assert len(writable) > 20, writable
    finally:
        ctx.disconnect()
    import psutil

    process = psutil.Process(ioc.proc.pid)
    rss_before = process.memory_info().rss
    refused = 0
    for name in writable:
        for value in HOSTILE_VALUES:
            try:
                ca_write(name, value, notify=True, timeout=20)
            except Refused:
                refused += 1
            except (ValueError, TypeError, OverflowError):
                refused += 1  # the client itself cannot encode it for this PV's type
    assert refused > len(writable)
    for suffix in suffixes:
        for family in (ChannelType.TIME_STRING, ChannelType.CTRL_DOUBLE, ChannelType.CTRL_ENUM):
            try:
                ca_read(ioc.pv(suffix), data_type=family, timeout=10)
            except Refused as exc:  # a failed-read status is an answer; an abort is not
                assert "read failed" in _message(exc), (suffix, family, _message(exc))
    # The IOC still serves: a fresh put and read of a setting; nothing it logged is a traceback.
    ca_write(ioc.pv("RUN:DOWNSAMPLE"), 3, notify=True, timeout=20)
    assert ca_read(ioc.pv("RUN:DOWNSAMPLE"), timeout=10).data[0] == 3
    assert "Traceback" not in output(ioc.proc)
    grown = (process.memory_info().rss - rss_before) / 2**20
    assert grown < 50, f"the IOC grew {grown:.0f} MiB over the fuzz"
