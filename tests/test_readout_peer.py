"""The pipe between the IOC and a readout process: calls both ways, notes in order,
refusals in words, a silent end answered by a timeout, and the other end going away."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

from dtacq_ioc.readout.peer import Peer, PeerGone
from dtacq_ioc.readout.run import SettingsError


class Unpicklable(Exception):
    def __init__(self, a: int, b: int):  # pickle rebuilds it with one argument: it fails
        super().__init__(f"bad {a} {b}")


@pytest.fixture
def pair():
    """Two peers over a real pipe: `ioc` and `worker`, with what each was sent."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    notes: list[tuple[str, Any]] = []
    gone = threading.Event()
    sleeping, slept = threading.Event(), threading.Event()

    def serve(method: str, args: tuple[Any, ...]) -> Any:
        if method == "echo":
            return args
        if method == "ask_back":  # a call that calls back before it answers
            return worker.call("echo", "from the worker")
        if method == "refuse":
            raise SettingsError("unknown site 7 on C1")
        if method == "odd":
            raise Unpicklable(1, 2)
        if method == "sleep":
            sleeping.set()
            time.sleep(args[0])
            slept.set()
            return "late"
        raise ValueError(method)

    ioc = Peer(ours, "C1", serve, lambda kind, payload: notes.append((kind, payload)),
               on_gone=gone.set)  # fmt: skip
    worker = Peer(theirs, "C1-worker", serve, lambda kind, payload: None)
    ioc.start()
    worker.start()
    try:
        yield ioc, worker, notes, gone, (sleeping, slept)
    finally:
        ioc.close()
        worker.close()
        ioc.join(5)
        worker.join(5)


def test_calls_go_both_ways_and_notes_arrive_in_order(pair):
    ioc, worker, notes, _, _ = pair
    assert ioc.call("echo", 1, "two", [3]) == (1, "two", [3])
    assert ioc.call("ask_back") == ("from the worker",)
    for i in range(100):
        worker.note("tick", i)
    assert worker.call("echo", "after the notes") == ("after the notes",)
    deadline = time.monotonic() + 5
    while len(notes) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert notes == [("tick", i) for i in range(100)]


def test_refusals_cross_as_themselves_or_in_words(pair):
    ioc, _, _, _, _ = pair
    with pytest.raises(SettingsError, match="unknown site 7 on C1"):
        ioc.call("refuse")
    with pytest.raises(RuntimeError, match="bad 1 2"):
        ioc.call("odd")
    assert ioc.call("echo", "still talking") == ("still talking",)


def test_a_call_with_no_answer_times_out_and_its_late_answer_is_dropped(pair):
    ioc, _, _, _, (_, slept) = pair
    with pytest.raises(TimeoutError, match=r"no answer to sleep within 0\.2 s"):
        ioc.call("sleep", 1.0, timeout=0.2)
    assert slept.wait(5)  # its answer goes out now, to nobody
    assert ioc.call("echo", "next") == ("next",)


def test_the_other_end_going_fails_waiting_calls_and_is_reported(pair):
    ioc, worker, _, gone, (sleeping, _) = pair
    waiting: list[BaseException] = []

    def wait_for_answer() -> None:
        try:
            ioc.call("sleep", 5.0)
        except BaseException as exc:
            waiting.append(exc)

    caller = threading.Thread(target=wait_for_answer)
    caller.start()
    assert sleeping.wait(5)
    worker.close()  # tells the IOC's end, which closes its own: both readers end
    assert gone.wait(5), "the pipe's end was never reported"
    caller.join(5)
    assert len(waiting) == 1 and isinstance(waiting[0], PeerGone)
    with pytest.raises(PeerGone):
        ioc.call("echo")
    ioc.note("tick", 1)  # a note to a gone peer is dropped, not raised
