"""One knob connection (port 4220+site): LF-terminated lines in, replies and the prompt out."""

from __future__ import annotations

import socket
from collections.abc import Callable

from dtacq_ioc.sim.knobtable import KnobTable, Reply, split_command
from dtacq_ioc.sim.state import CardState

MAX_LINE = 4096  # the card's input line limit


class KnobSession:
    """Per-connection state, as the card's forked server keeps it: the prompt flag."""

    def __init__(
        self,
        table: KnobTable,
        state: CardState,
        conn: socket.socket,
        sleep: Callable[[float], bool],
    ):
        self.table = table
        self.sleep = sleep  # returns True when the card goes down meanwhile
        self.state = state
        self.conn = conn
        self.prompt = False

    def serve(self) -> None:
        buf = b""
        discarding = False  # inside an over-long line: drop bytes up to its LF
        while True:
            data = self.conn.recv(65536)
            if not data:
                return
            buf += data
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_LINE:
                        if not discarding:
                            self._answer(
                                Reply([f"ERROR: line longer than {MAX_LINE} bytes"], failed=True)
                            )
                        discarding = True
                        buf = b""
                    break
                line, buf = buf[:nl], buf[nl + 1 :]
                if discarding or len(line) > MAX_LINE:
                    if not discarding:
                        self._answer(
                            Reply([f"ERROR: line longer than {MAX_LINE} bytes"], failed=True)
                        )
                    discarding = False
                    continue
                self._answer(self.execute(line.decode("latin-1")))

    def execute(self, line: str) -> Reply:
        reply = Reply()
        with self.state.lock:
            for command in line.split(";"):
                name, value = split_command(command.strip(" \t\r"))
                if name == "prompt":
                    if value in ("on", "off"):
                        self.prompt = value == "on"
                        reply.lines.append("")
                    else:
                        reply.lines.append("ERROR: prompt takes on or off")
                        reply.failed = True
                    continue
                self.table.run(command, reply)
        return reply

    def _answer(self, reply: Reply) -> None:
        silent = self.state.faults.hang_left()
        if silent > 0 and self.sleep(silent):  # network loss: nothing comes back for a while
            return
        delay = self.state.faults.knob_delay_s
        if delay > 0 and self.sleep(delay):  # the knob-delay fault: a slow card
            return
        text = "".join(f"{line}\n" for line in reply.lines)
        if self.prompt:
            text += f"acq400.{self.table.site} {int(reply.failed)} >"
        if text:
            self.conn.sendall(text.encode("latin-1", "replace"))
        for action in reply.after:  # e.g. a reboot, which takes this connection down
            action()
