"""A blocking TCP service: one listening socket, a thread per connection.

Like the card's inetd-style services (a process per connection), each client
gets its own thread and blocking socket. `stop()` refuses new connections,
shuts down every open one so its thread wakes, and joins them all.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket], None]


class TcpService:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        handler: Handler,
        wake: Callable[[], None] | None = None,
    ):
        self.name = name
        self.wake = wake  # wakes handlers that wait on something other than their socket
        self.host = host
        self.port = port
        self.handler = handler
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind and listen now (so a failure raises here), then accept on a thread."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"{self.name}: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self._stopping.clear()
        self._listener = sock
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True
            )
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError as exc:
            log.debug("%s: connection ended: %s", self.name, exc)
        except Exception:
            log.exception("%s: handler failed", self.name)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            # shutdown() wakes a thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self.wake is not None:
            self.wake()
        for thread in conns.values():
            thread.join()
        self._listener = None
        self._accept_thread = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_stopping(self, timeout: float) -> bool:
        """Sleep up to `timeout`, waking early (True) when the service stops."""
        return self._stopping.wait(timeout)
