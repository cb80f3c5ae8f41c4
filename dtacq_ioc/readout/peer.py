"""One end of the pipe between the IOC and a card's readout process.

Both ends are alike: either may `call` a method of the other and wait for its answer,
or send a one-way `note`. One thread per end reads the pipe; notes and replies are
handled on it in the order they were sent, calls each on a thread of their own (a
call may itself call back, as a run starting in the readout process tells the IOC's
catalog, and must not hold up the reader meanwhile).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from dtacq_ioc.readout.guarded import call_guarded

log = logging.getLogger(__name__)

OnCall = Callable[[str, tuple[Any, ...]], Any]
OnNote = Callable[[str, Any], None]


class PeerGone(ConnectionError):
    """The other end closed the pipe (or its process ended) before answering."""


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class Peer:
    def __init__(
        self,
        conn: Connection,
        name: str,
        on_call: OnCall,
        on_note: OnNote,
        on_gone: Callable[[], None] | None = None,
    ):
        self.conn = conn
        self.name = name
        self.on_call = on_call
        self.on_note = on_note
        self.on_gone = on_gone
        self.gone = threading.Event()
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, name=f"peer-{name}", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call `method` at the other end and return its answer (its exception raised here);
        TimeoutError when `timeout` passes first (a late answer is then dropped)."""
        ident = next(self._ids)
        pending = self._pending[ident] = _Pending()
        try:
            self._send(("call", ident, method, args))
            if not pending.done.wait(timeout):
                raise TimeoutError(f"{self.name}: no answer to {method} within {timeout} s")
        finally:
            self._pending.pop(ident, None)
        if pending.error is not None:
            raise pending.error
        return pending.value

    def note(self, kind: str, payload: Any = None) -> None:
        """Send without waiting for an answer; nothing happens once the other end is gone."""
        with contextlib.suppress(PeerGone):
            self._send(("note", kind, payload))

    def close(self) -> None:
        """Tell the other end we are done: it closes its end, and our reader then ours
        (closing it under the reader's feet would not wake the reader)."""
        with contextlib.suppress(PeerGone):
            self._send(("bye",))

    def join(self, timeout: float | None = None) -> None:
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self.gone.is_set() or self.conn.closed:
                raise PeerGone(f"{self.name}: the readout process is gone")
            try:
                self.conn.send(message)
            except (OSError, ValueError) as exc:
                raise PeerGone(f"{self.name}: the readout process is gone ({exc})") from None

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "bye":
                break
            if kind == "note":
                call_guarded(self.on_note, message[1], message[2], what=f"{self.name}: note")
            elif kind == "reply":
                _, ident, ok, value = message
                pending = self._pending.get(ident)
                if pending is not None:
                    if ok:
                        pending.value = value
                    else:
                        pending.error = value
                    pending.done.set()
            elif kind == "call":
                threading.Thread(
                    target=self._serve, args=message[1:], name=f"{self.name}-{message[2]}",
                    daemon=True,
                ).start()  # fmt: skip
        self.gone.set()
        with self._send_lock:
            self.conn.close()
        for pending in list(self._pending.values()):
            pending.error = PeerGone(f"{self.name}: the readout process ended")
            pending.done.set()
        call_guarded(self.on_gone, what=f"{self.name}: pipe end")

    def _serve(self, ident: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            reply: tuple[Any, ...] = ("reply", ident, True, self.on_call(method, args))
        except Exception as exc:
            reply = ("reply", ident, False, portable(exc))
        with contextlib.suppress(PeerGone):
            self._send(reply)


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling as itself, else a RuntimeError with its words."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:
        pass
    return RuntimeError(str(exc))
