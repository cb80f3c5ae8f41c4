"""The spad counter check, on counters built by hand."""

from __future__ import annotations

import logging

import numpy as np

from dtacq_ioc.readout.integrity import CounterCheck, Gap


def counter(start: int, n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.uint64) + start) % (1 << 32)).astype(np.uint32)


def test_clean_counter_across_buffers_has_no_gaps():
    check = CounterCheck()
    assert check.check(counter(1, 1000)) == []
    assert check.check(counter(1001, 500)) == []
    assert check.errors == 0 and check.samples == 1500


def test_wrap_at_2_32_is_not_a_jump():
    check = CounterCheck()
    assert check.check(counter((1 << 32) - 5, 10)) == []
    # and the wrap falling exactly on a buffer boundary
    check = CounterCheck()
    assert check.check(counter((1 << 32) - 3, 3)) == []
    assert check.check(counter(0, 3)) == []
    assert check.errors == 0


def test_jump_inside_a_buffer_gives_position_and_size():
    c = counter(1, 100)
    c[40:] += 7  # 7 samples lost before sample 40
    gaps = CounterCheck().check(c)
    assert gaps == [Gap(position=40, size=7, expected=41, got=48)]


def test_jump_between_buffers_is_at_position_zero(caplog):
    check = CounterCheck(name="CARD")
    check.check(counter(1, 10))
    with caplog.at_level(logging.WARNING):
        gaps = check.check(counter(14, 10))
    assert gaps == [Gap(position=0, size=3, expected=11, got=14)]
    assert check.errors == 1
    assert "CARD" in caplog.text and "skipped 3" in caplog.text


def test_jump_across_the_wrap_and_backwards():
    check = CounterCheck()
    check.check(counter((1 << 32) - 2, 2))  # ends at 0xffffffff
    assert check.check(counter(5, 2)) == [Gap(0, 5, 0, 5)]
    c = counter(100, 5)
    c[3] = 50  # a corrupt word: back by 53, then forward again
    gaps = check.check(c)
    assert [(g.position, g.size) for g in gaps] == [(0, 93), (3, -53), (4, 53)]
    assert check.errors == 4


def test_many_jumps_are_all_counted_but_logged_briefly(caplog):
    c = counter(1, 1000)
    c[::2] += 100  # every other sample is off
    with caplog.at_level(logging.WARNING):
        gaps = CounterCheck().check(c)
    assert len(gaps) == 999
    assert len(caplog.records) <= 6 and "994 more" in caplog.text


def test_disabled_check_skips_and_reset_forgets():
    off = CounterCheck(enabled=False)
    assert off.check(np.zeros(10, dtype=np.uint32)) == []
    check = CounterCheck()
    check.check(counter(1, 10))
    check.reset()
    assert check.check(counter(1, 10)) == []
