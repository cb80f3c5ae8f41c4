"""Transient run control: set_arm, soft_trigger, set_abort and the state they walk through.

A triggered shot runs POST samples at the card's sample rate (RUN_POST), passes
through POST_PROCESS, and ends IDLE with `shot` counted up, each step a
2235 status line. The data of a shot (port 53000) is not simulated.
"""

from __future__ import annotations

import threading

from dtacq_ioc.sim.state import ARM, IDLE, POST_PROCESS, RUN_POST, CardState


class ShotControl:
    def __init__(self, state: CardState):
        self.state = state
        self._timer: threading.Timer | None = None

    def arm(self) -> str:
        st = self.state
        with st.lock:
            self._cancel()
            st.pre, st.post = st.transient.pre, st.transient.post
            st.set_state(ARM, elapsed=0)
        return ""

    def soft_trigger(self) -> str:
        st = self.state
        with st.lock:
            if st.state != ARM:
                return ""  # a trigger with nothing armed is ignored, as on the card
            st.set_state(RUN_POST)
            rate = st.sample_rate_hz()
            if rate <= 0:
                return ""  # unclocked: the shot waits for a clock that never comes
            self._timer = threading.Timer(st.post / rate, self._finish)
            self._timer.daemon = True
            self._timer.start()
        return ""

    def abort(self) -> str:
        with self.state.lock:
            self._cancel()
            if self.state.state != IDLE:
                self.state.set_state(IDLE)
        return ""

    def _finish(self) -> None:
        st = self.state
        with st.lock:
            if st.state != RUN_POST:
                return
            st.set_state(POST_PROCESS, elapsed=st.post)
            st.shot += 1
            st.set_state(IDLE)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stop(self) -> None:
        with self.state.lock:
            self._cancel()
