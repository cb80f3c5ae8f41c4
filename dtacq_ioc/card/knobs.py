"""Knob client: the line protocol of a card's site service on TCP 4220+site.

One connection per site, reused for every request and reopened when it breaks.
The prompt is switched on at connect because it is the only end-of-reply marker:
a reply has any number of lines and the server ends it with ``acq400.<site> <e> >``
(no newline), so the client reads until that pattern closes the received text.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

from dtacq_ioc.card.errors import CardError, KnobError, KnobTimeout

log = logging.getLogger(__name__)

# The prompt closes every reply; it follows the reply's last LF, or opens the
# buffer when the reply is empty.
_PROMPT = re.compile(rb"(?:\A|\n)(acq400\.\d+ (\d+) >)\Z")
_PROMPT_TAIL = 64  # the prompt is short; only the buffer's tail needs the regex
_RECV_BYTES = 65536
_MAX_REPLY_BYTES = 16 << 20  # far above the card's 16 KiB limit: a runaway peer, not a card
_FORBIDDEN = (";", "\n", "\r")


def _check_text(what: str, text: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse text that would be read by the card as more than one command."""
    bad = [repr(c) for c in (*_FORBIDDEN, *extra) if c in text]
    if bad:
        raise ValueError(f"bad {what} {text!r}: contains {', '.join(bad)}")
    if not text.isascii():
        raise ValueError(f"bad {what} {text!r}: not ASCII")
    if what == "knob" and not text:
        raise ValueError("bad knob '': empty name")


class KnobClient:
    """Blocking client of one site's knob service; safe to share between threads."""

    def __init__(self, card: str, host: str, site: int, port: int, timeout: float):
        self.card = card
        self.host = host
        self.site = site
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KnobClient({self.card!r}, {self.host}:{self.port}, site {self.site})"

    # -- public requests ------------------------------------------------------------

    def command(self, line: str) -> list[str]:
        """Send one raw line (it may hold ';'-separated commands); return the reply lines.

        Raises KnobError if any reply line starts with ERROR.
        """
        _check_text("command", line.replace(";", ""))
        lines = self._request(line, line)
        self._raise_errors(line, lines)
        return lines

    def query_lines(self, knob_or_glob: str) -> list[str]:
        """Every line of a query's reply (a glob gives one line per matching knob)."""
        _check_text("knob", knob_or_glob, (" ", "="))
        return self.command(knob_or_glob)

    def query(self, knob: str) -> str:
        """A knob's value; a ``NAME VALUE`` reply (PV-style knobs) gives VALUE."""
        lines = self.query_lines(knob)
        prefix = f"{knob} "
        values = [ln[len(prefix) :] if ln.startswith(prefix) else ln for ln in lines]
        return "\n".join(values)

    def set(self, knob: str, value: object) -> str:
        """Set a knob; return the reply text (usually empty)."""
        _check_text("knob", knob, (" ", "="))
        text = str(value)
        _check_text("value", text)
        lines = self._request(f"{knob}={text}", knob)
        self._raise_errors(knob, lines)
        return "\n".join(lines)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- connection -----------------------------------------------------------------

    def _connect(self, knob: str, deadline: float) -> socket.socket:
        try:
            sock = socket.create_connection(
                (self.host, self.port), timeout=max(deadline - time.monotonic(), 0.001)
            )
        except TimeoutError:
            raise KnobTimeout(self.card, self.site, knob, self.timeout) from None
        except OSError as exc:
            raise CardError(
                self.card,
                f"{self.card} site {self.site}: cannot connect to {self.host}:{self.port}: "
                f"{exc.strerror or exc}",
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            self._exchange(sock, "prompt on", knob, deadline)
        except _Broken as exc:
            # A card that accepts and then closes (it is going down for a reboot)
            # is a lost connection like any other, which wait_ready() retries.
            self._drop()
            raise self._lost(knob, exc) from None
        except BaseException:
            self._drop()
            raise
        log.debug("%s site %d: connected to %s:%d", self.card, self.site, self.host, self.port)
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _request(self, line: str, knob: str) -> list[str]:
        deadline = time.monotonic() + self.timeout
        with self._lock:
            reused = self._sock is not None
            sock = self._sock or self._connect(knob, deadline)
            try:
                return self._exchange(sock, line, knob, deadline)
            except _Broken as exc:
                self._drop()
                if not (reused and exc.before_reply):
                    raise self._lost(knob, exc) from None
            # A reused connection the card closed while idle (a reboot, a restarted
            # knob server): reconnect and send again; nothing of this line reached it.
            log.info("%s site %d: connection lost, reconnecting", self.card, self.site)
            sock = self._connect(knob, deadline)
            try:
                return self._exchange(sock, line, knob, deadline)
            except _Broken as exc:
                self._drop()
                raise self._lost(knob, exc) from None

    def _lost(self, knob: str, exc: _Broken) -> CardError:
        return CardError(
            self.card, f"{self.card} site {self.site}: {knob}: connection lost ({exc.reason})"
        )

    def _exchange(self, sock: socket.socket, line: str, knob: str, deadline: float) -> list[str]:
        """Send one line and read its reply up to the prompt."""
        try:
            sock.sendall(line.encode("ascii") + b"\n")
        except OSError as exc:
            raise _Broken(str(exc), before_reply=True) from None
        buf = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop()  # a late reply would answer the next request
                raise KnobTimeout(self.card, self.site, knob, self.timeout)
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(_RECV_BYTES)
            except TimeoutError:
                continue  # the deadline check above raises
            except OSError as exc:
                raise _Broken(str(exc), before_reply=not buf) from None
            if not chunk:
                raise _Broken("closed by the card", before_reply=not buf)
            buf += chunk
            if buf.endswith(b">"):
                tail_start = max(len(buf) - _PROMPT_TAIL, 0)
                match = _PROMPT.search(buf, tail_start)
                if match:
                    if match.group(2) != b"0":
                        log.debug(
                            "%s site %d: %s: prompt flag %s",
                            self.card,
                            self.site,
                            knob,
                            match.group(2).decode(),
                        )
                    return _lines(bytes(buf[: match.start(1)]))
            if len(buf) > _MAX_REPLY_BYTES:
                self._drop()
                raise CardError(
                    self.card, f"{self.card} site {self.site}: {knob}: reply without a prompt"
                )

    def _raise_errors(self, knob: str, lines: list[str]) -> None:
        for ln in lines:
            if ln.startswith("ERROR"):
                raise KnobError(self.card, self.site, knob, ln)


class _Broken(Exception):
    """The connection failed; before_reply says no reply byte had arrived."""

    def __init__(self, reason: str, before_reply: bool):
        self.reason = reason
        self.before_reply = before_reply
        super().__init__(reason)


def _lines(body: bytes) -> list[str]:
    """Reply text before the prompt: each line ends in LF (a set's reply is one empty line)."""
    text = body.decode("latin-1").replace("\r", "")
    return text.split("\n")[:-1]
