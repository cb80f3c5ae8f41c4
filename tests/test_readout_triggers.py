"""Triggers: the built-ins, the old contract's actions, and loading from a directory."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from support import ROOT

from dtacq_ioc.readout.triggers import (
    End,
    EndReadoutNow,
    OpenNewReadoutFile,
    Rotate,
    TriggerContext,
    TriggerError,
    TriggerRegistry,
    Write,
    normalise,
)

CTX = TriggerContext(
    sample_rate_hz=1000.0,
    channels=(0, 1),
    channel_list=(0, 1),
    bytes_per_output_sample=4,
    volts_per_code={0: 0.001, 1: 0.001},
)


def make(name: str, ctx: TriggerContext = CTX, directory: Path | None = None, **args):
    trig = TriggerRegistry(directory).create(name, args)
    trig.setup(ctx)
    return trig


def buf(x0, x1=None) -> dict[int, np.ndarray]:
    x0 = np.asarray(x0, dtype=np.int32)
    return {0: x0, 1: np.zeros_like(x0) if x1 is None else np.asarray(x1, dtype=np.int32)}


def test_old_contract_actions():
    assert normalise(False, 10) == []
    assert normalise(True, 10) == [Write(0, 10)]
    assert normalise(np.bool_(True), 10) == [Write(0, 10)]
    assert normalise((2, 5), 10) == [Write(2, 5)]
    got = normalise([None, OpenNewReadoutFile, (3, 7), OpenNewReadoutFile(), (8, 99)], 10)
    assert got == [Write(0, 10), Rotate(), Write(3, 7), Rotate(), Write(8, 10)]
    assert normalise([(-5, 2), (6, 6), EndReadoutNow], 10) == [Write(0, 2), End()]
    with pytest.raises(TriggerError, match="bad action 'x'"):
        normalise(["x"], 10)
    with pytest.raises(TriggerError, match="returned int"):
        normalise(3, 10)


def test_always():
    assert make("always").trigger(buf([1, 2])) is True


def test_threshold_writes_while_above_with_hysteresis():
    # level 1.0 V = 1000 codes, hysteresis 0.2 V: off below 800 codes
    t = make("threshold", channel=0, level=1.0, hysteresis=0.2)
    assert t.trigger(buf([0, 500, 999])) is False
    assert t.trigger(buf([0, 1001, 900])) is True  # rises: this buffer is written
    assert t.trigger(buf([850, 900, 810])) is True  # inside the band: still on
    assert t.trigger(buf([900, 700, 900])) is True  # falls below the band here
    assert t.trigger(buf([900, 900, 900])) is False  # off, and not above the level
    assert make("threshold", channel=1, level=1.0).trigger(buf([5000], [0])) is False


def test_threshold_refuses_unknown_channel_and_bad_arguments():
    with pytest.raises(TriggerError, match="unknown channel 7"):
        make("threshold", channel=7, level=1.0)
    with pytest.raises(TriggerError, match="bad arguments"):
        make("threshold", level=1.0)
    with pytest.raises(TriggerError, match="hysteresis must be >= 0"):
        make("threshold", channel=0, level=1.0, hysteresis=-1)


def test_sample_count_writes_exactly_n_then_ends():
    t = make("sample_count", samples=25)
    assert t.trigger(buf(np.zeros(10))) is True
    assert t.trigger(buf(np.zeros(10))) is True
    assert normalise(t.trigger(buf(np.zeros(10))), 10) == [Write(0, 5), End()]
    with pytest.raises(EndReadoutNow):
        t.trigger(buf(np.zeros(10)))


def test_time_limit_counts_samples_at_the_card_rate():
    t = make("time_limit", seconds=0.015)  # 15 samples at 1 kHz
    assert t.trigger(buf(np.zeros(10))) is True
    assert normalise(t.trigger(buf(np.zeros(10))), 10) == [Write(0, 5), End()]
    with pytest.raises(TriggerError, match="seconds must be > 0"):
        make("time_limit", seconds=0)


def test_rotate_by_bytes_splits_at_exact_samples():
    t = make("rotate", bytes=40)  # 4 bytes per sample -> 10 samples per file
    acts = [normalise(t.trigger(buf(np.zeros(n))), n) for n in (7, 7, 16)]
    assert acts[0] == [Write(0, 7)]
    assert acts[1] == [Write(0, 3), Rotate(), Write(3, 7)]
    assert acts[2] == [Write(0, 6), Rotate(), Write(6, 16)]
    assert normalise(t.trigger(buf(np.zeros(1))), 1) == [Rotate(), Write(0, 1)]


def test_rotate_by_seconds_and_with_downsampling():
    t = make("rotate", seconds=0.005)  # 5 samples
    assert normalise(t.trigger(buf(np.zeros(12))), 12) == [
        Write(0, 5),
        Rotate(),
        Write(5, 10),
        Rotate(),
        Write(10, 12),
    ]
    ds = TriggerContext(
        sample_rate_hz=1000.0, channels=(0,), downsample=4, bytes_per_output_sample=8
    )
    t = make("rotate", ctx=ds, bytes=20)  # 2 output samples of 8 bytes = 8 raw samples
    assert t.per_file == 8
    with pytest.raises(TriggerError, match="exactly one"):
        make("rotate", bytes=10, seconds=1.0)


def test_unknown_name_lists_what_is_available(tmp_path):
    with pytest.raises(TriggerError) as info:
        TriggerRegistry(ROOT / "triggers").create("nope")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown trigger 'nope'" in message
    assert "always" in message and "pulse_windows" in message and "rotate" in message


def test_arguments_are_a_small_dict_of_plain_values():
    reg = TriggerRegistry(None)
    with pytest.raises(TriggerError, match="must be a number or a string"):
        reg.create("threshold", {"channel": [1], "level": 1.0})
    with pytest.raises(TriggerError, match="bad trigger argument name"):
        reg.create("always", {"__class__": 1})
    with pytest.raises(TriggerError, match="must be a dict"):
        reg.create("always", "import os")  # type: ignore[arg-type]


def test_triggers_from_a_directory_by_class_name_or_NAME(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from dataclasses import dataclass\n"
        "class EveryOther(Trigger):\n"  # old style: Trigger without an import
        "    def __init__(self, **args):\n"
        "        super().__init__(**args)\n"
        "        self.n = 0\n"
        "    def trigger(self, v):\n"
        "        self.n += 1\n"
        "        if self.n > 3:\n"
        "            raise EndReadoutNow\n"
        "        return [None, OpenNewReadoutFile] if self.n % 2 else False\n"
        "@dataclass\n"
        "class Helper:\n"
        "    x: int = 0\n"
        "class Named(Trigger):\n"
        "    NAME = 'named_one'\n"
    )
    reg = TriggerRegistry(tmp_path)
    assert reg.names() == [
        *["always", "rotate", "sample_count", "threshold", "time_limit"],
        *["EveryOther", "named_one"],
    ]
    t = make("EveryOther", directory=tmp_path)
    assert normalise(t.trigger(buf([1])), 1) == [Write(0, 1), Rotate()]
    assert t.trigger(buf([1])) is False
    t.trigger(buf([1]))
    with pytest.raises(EndReadoutNow):
        t.trigger(buf([1]))
    assert make("named_one", directory=tmp_path).trigger(buf([1])) is True


def test_a_broken_file_is_one_line_and_its_traceback_is_logged(tmp_path, caplog):
    (tmp_path / "good.py").write_text("class Good(Trigger):\n    pass\n")
    (tmp_path / "bad.py").write_text("def broken(:\n")
    with caplog.at_level(logging.ERROR), pytest.raises(TriggerError) as info:
        TriggerRegistry(tmp_path).create("Good")
    message = str(info.value)
    assert "\n" not in message and "bad.py" in message and "SyntaxError" in message
    assert "Traceback" in caplog.text
    # built-ins never depend on the directory
    assert TriggerRegistry(tmp_path).create("always").trigger(buf([1])) is True


def test_example_trigger_file_works():
    t = make("pulse_windows", directory=ROOT / "triggers", channel=0, level=1.0, before=1, after=2)
    x = np.array([0, 0, 2000, 2000, 0, 0, 0, 3000, 0, 0])
    assert normalise(t.trigger(buf(x)), 10) == [Rotate(), Write(1, 4), Rotate(), Write(6, 9)]
    assert t.trigger(buf(np.zeros(4))) is False
