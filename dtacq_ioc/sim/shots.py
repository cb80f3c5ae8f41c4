"""Transient shots: set_arm, the start trigger, the pre-trigger event, POST samples, the data.

A shot walks ARM -> (RUN_PRE while PRE samples fill, when PRE > 0) -> RUN_POST ->
POST_PROCESS -> IDLE on a thread of its own, each step a 2235 status line. The
master site's `trg` triplet starts it; with PRE > 0 its `event0` ends the
pre-trigger part. A triplet "1,1,x" (line d1) or a disabled one listens to
`soft_trigger`; "1,N,edge" listens to front-panel line dN (SIM:EXT_TRIGGER).
SOFT_TRIGGER=1 fires one soft trigger as soon as the card is armed.

Samples are counted from the start trigger (index 0, spad counter 1). An event at
sample e keeps [e - pre, e + POST) with pre = min(PRE, e): an event before PRE
samples are in gives a shorter pre-trigger part, which the status line reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dtacq_ioc.sim.shotdata import ShotData
from dtacq_ioc.sim.signals import SiteSignals, TableCache
from dtacq_ioc.sim.state import ARM, IDLE, POST_PROCESS, RUN_POST, RUN_PRE, CardState

log = logging.getLogger(__name__)

SOFT_LINE = 1  # the soft trigger drives d1 (HAPI: INT_TRG_DX)
PROGRESS_S = 0.5  # a running shot sends its elapsed count this often
RISING, FALLING = 1, 0


@dataclass(frozen=True)
class Listener:
    """What one stage of a shot waits for: a line and an edge."""

    line: int
    edge: int

    @classmethod
    def from_triplet(cls, triplet: str) -> Listener:
        enabled, line, edge = (int(f) for f in triplet.split(","))
        if not enabled:
            return cls(SOFT_LINE, RISING)  # the simulator's choice: a disabled input is soft
        return cls(line, edge)

    def hears(self, line: int, edges: tuple[int, ...]) -> bool:
        return line == self.line and self.edge in edges

    def describe(self) -> str:
        return "soft" if self.line == SOFT_LINE else f"d{self.line}"


@dataclass(frozen=True)
class ShotPlan:
    """Everything a shot needs, taken when it is armed."""

    pre: int
    post: int
    demux: bool
    auto_soft: bool
    rate_hz: float
    start: Listener
    event: Listener
    sites: tuple[SiteSignals, ...]
    spad: tuple[int, ...]


class ShotControl:
    """set_arm / soft_trigger / set_abort / SIM:EXT_TRIGGER for one card."""

    def __init__(self, state: CardState, tables: TableCache, stop_stream: Callable[[], None]):
        self.state = state
        self.tables = tables
        self.stop_stream = stop_stream
        self._cond = threading.Condition(state.lock)
        self._gen = 0  # bumped by arm, abort and stop: an older shot thread gives up
        self._listen: Listener | None = None
        self._fired: float | None = None
        self._thread: threading.Thread | None = None

    # -- knob actions (called with the state lock held by the knob session) ----------

    def arm(self) -> str:
        st = self.state
        with st.lock:
            self._gen += 1
            st.stream_gen += 1  # arming tears a running stream down
            self.stop_stream()
            master = st.master()
            tr = st.transient
            plan = ShotPlan(
                pre=tr.pre,
                post=tr.post,
                demux=tr.demux != 0,  # -1 (card default) demuxes, as DEMUX=1
                auto_soft=tr.soft_trigger == 1,
                rate_hz=st.sample_rate_hz(),
                start=Listener.from_triplet(master.triplets["trg"]),
                event=Listener.from_triplet(master.triplets["event0"]),
                sites=tuple(st.stream_sites()),
                spad=st.spad_words(),
            )
            st.shot_busy = True
            st.last_shot = None  # the card's memory is about to be overwritten
            st.pre, st.post, st.demux = plan.pre, plan.post, int(plan.demux)
            st.set_state(ARM, elapsed=0)
            self._cond.notify_all()  # an older shot thread gives up now
            gen = self._gen
            self._listen, self._fired = plan.start, None
            if plan.auto_soft:
                self._trigger(SOFT_LINE, (RISING, FALLING))
            self._thread = threading.Thread(
                target=self._run, args=(gen, plan), name=f"{st.card.name}-shot", daemon=True
            )
            self._thread.start()
        return ""

    def soft_trigger(self) -> str:
        with self.state.lock:
            self._trigger(SOFT_LINE, (RISING, FALLING))
        return ""

    def external(self, line: int, edges: tuple[int, ...]) -> None:
        with self.state.lock:
            self._trigger(line, edges)

    def abort(self) -> str:
        st = self.state
        with st.lock:
            self._gen += 1
            self._listen = None
            self._cond.notify_all()
            if st.shot_busy:  # a stream's state is the stream's own
                st.shot_busy = False
                st.set_state(IDLE)
        return ""

    def stop(self) -> None:
        """The card goes down (stop or reboot): end any shot without a state change."""
        with self.state.lock:
            self._gen += 1
            self._listen = self._fired = None
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the shot thread -----------------------------------------------------------

    def _trigger(self, line: int, edges: tuple[int, ...]) -> None:
        """A trigger edge: heard only by a stage waiting for it (with the lock held)."""
        if self.state.faults.no_trigger:
            return
        if self._listen is not None and self._listen.hears(line, edges):
            self._listen, self._fired = None, time.monotonic()
            self._cond.notify_all()

    def _await(self, gen: int, listener: Listener, progress: Callable[[], None]) -> float | None:
        """Wait for the listener to fire; its time, or None when the shot is over."""
        if self._fired is None and self._listen is None:
            self._listen = listener
        while True:
            if self._gen != gen:  # first: a newer shot's trigger is not ours
                return None
            if self._fired is not None:
                fired, self._fired = self._fired, None
                return fired
            self._cond.wait(PROGRESS_S)
            if self._gen == gen and self._fired is None:
                progress()

    def _sleep_until(self, gen: int, deadline: float, progress: Callable[[], None]) -> bool:
        while self._gen == gen:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self._cond.wait(min(left, PROGRESS_S))
            if self._gen == gen and deadline - time.monotonic() > 0:
                progress()
        return False

    def _run(self, gen: int, plan: ShotPlan) -> None:
        st = self.state
        rate = plan.rate_hz
        with st.lock:
            started = self._await(gen, plan.start, lambda: None)
            if started is None:
                return
            t0 = started

            def elapsed() -> int:
                return int((time.monotonic() - t0) * rate)

            def report() -> None:
                st.set_state(st.state, elapsed=elapsed())

            event = 0
            if plan.pre > 0:
                st.set_state(RUN_PRE, elapsed=0)
                fired = self._await(gen, plan.event, report)
                if fired is None:
                    return
                event = int((fired - t0) * rate)
            pre = min(plan.pre, event)
            st.pre = pre
            st.set_state(RUN_POST, elapsed=event)
            # An unclocked card (rate 0) never gets its POST samples: the shot waits.
            end = t0 + (event + plan.post) / rate if rate > 0 else float("inf")
            if not self._sleep_until(gen, end, report):
                return
            st.set_state(POST_PROCESS, elapsed=event + plan.post)
        table = self.tables.get(plan.sites, rate)  # outside the lock: it may take a while
        data = ShotData(
            table=table,
            first=event - pre,
            count=pre + plan.post,
            spad=plan.spad,
            demux=plan.demux,
            channels=[(s.site, c) for s in plan.sites for c in range(s.spec.nchan)],
        )
        with st.lock:
            if self._gen != gen:
                return
            st.last_shot = data
            st.shot += 1
            st.shot_busy = False
            st.set_state(IDLE)
        log.info(
            "%s: shot %d done: %d samples, trigger %s at sample %d",
            st.card.name,
            st.shot,
            data.count,
            plan.event.describe() if plan.pre else plan.start.describe(),
            event,
        )
