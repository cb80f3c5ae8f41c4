"""A client that acts as the experiment's old digitizer page (nEDM-Interface,
``digitizer_control_template``): it sends what the page's JavaScript sends, with the
same keys (``embed`` only where the page sets it, ``ip: true`` on card commands), and
reads every reply the way the page reads it:

- the header is ``Int32`` LE length + JSON; a reply without the key ``ok`` is shown to
  the user as an error, whatever else it says;
- ``announce`` messages with an object ``msg`` are acted on by ``msg.type``
  (``FileUpload`` shows ``msg.url``, ``DocUpload`` ``msg.id``, ``JobFinished`` ends the
  run on the page), a string ``msg`` is shown as a notice;
- ``readBuffer``: after the header, ``Uint32`` n (``0xdeadbeef``: the run is over),
  n ``Int32`` channel ids, then the data, ``(bytes left) / n`` bytes per channel, as
  ``Int16Array`` or ``Int32Array`` by ``getChannels().readout_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import websockets

DONE = 0xDEADBEEF


@dataclass
class Reply:
    header: dict[str, Any]
    data: bytes  # the whole message, as the page's `obj.data`
    offset: int  # where the payload starts, as the page's `obj.offset`

    @property
    def refused(self) -> bool:
        return "ok" not in self.header  # exactly the page's test

    @property
    def result(self) -> Any:
        return self.header.get("result")


@dataclass
class Buffer:
    """A readBuffer reply decoded as showNewData does."""

    done: bool = False
    channels: list[int] = field(default_factory=list)
    data: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def header_only(self) -> bool:
        return not self.done and all(a.size == 0 for a in self.data.values())


class OldPage:
    def __init__(self, ws: Any):
        self.ws = ws
        self.errors: list[str] = []  # what the page would show as errors
        self.notices: list[str] = []  # announces with a string msg
        self.events: list[dict[str, Any]] = []  # announces with an object msg
        self.settings: dict[str, Any] = {}
        self._replies: dict[str, asyncio.Queue[Reply]] = {}
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        self._reader.cancel()

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._read_all()

    async def _read_all(self) -> None:
        async for message in self.ws:
            assert isinstance(message, bytes), "the page reads every reply as an ArrayBuffer"
            (length,) = struct.unpack_from("<i", message)
            header = json.loads(message[4 : 4 + length].decode())
            reply = Reply(header, message, length + 4)
            if reply.refused:
                self.errors.append(str(header.get("error")))
            if header.get("cmd") == "announce":
                msg = header.get("msg")
                (self.events if isinstance(msg, dict) else self.notices).append(msg)
                if isinstance(msg, dict) and msg.get("error"):
                    self.errors.append(str(msg["error"]))
                self._changed.set()
                continue
            self._replies.setdefault(str(header.get("cmd")), asyncio.Queue()).put_nowait(reply)

    async def _replies_for(self, cmd: str) -> Reply:
        """The next reply to `cmd` (for requests sent by hand)."""
        return await self._replies.setdefault(cmd, asyncio.Queue()).get()

    async def _send(self, obj: dict[str, Any], no_digi: bool = False, timeout=60.0) -> Reply:
        if not no_digi:
            obj["ip"] = True  # sendObj's marker of a card command
        await self.ws.send(json.dumps(obj))
        queue = self._replies.setdefault(obj["cmd"], asyncio.Queue())
        return await asyncio.wait_for(queue.get(), timeout)

    async def wait_event(self, kind: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next announce of this type not yet taken."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("type") == kind:
                    return self.events.pop(i)
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))

    # -- what the page sends, button by button --

    async def initialize(self) -> Reply:  # x.onopen
        reply = await self._send({"cmd": "initializeWebPage", "embed": True}, no_digi=True)
        return reply

    async def request_control(self, ip: str) -> Reply:  # .reqDigi
        return await self._send({"cmd": "requestDigitizerControl", "args": {"ip_addr": ip}},
                                no_digi=True)  # fmt: skip

    async def release(self) -> Reply:  # .relDigi (data-no-digitizer)
        return await self._send({"cmd": "releaseDigitizerControl"}, no_digi=True)

    async def get_channels(self) -> Reply:  # after requestDigitizerControl
        reply = await self._send({"cmd": "getChannels", "embed": True})
        if not reply.refused:
            self.settings = dict(reply.result)
        return reply

    async def set_frequency_khz(self, khz: float) -> Reply:  # .set_frequency
        s = self.settings
        clock = s["ext_frequency"] if s["ext_frequency"] != 0 else s["sysclk"]
        clkdiv = clock / s["divide"] / (khz * 1000)
        return await self.set_clkdiv(clkdiv)

    async def set_clkdiv(self, clkdiv: float) -> Reply:
        reply = await self._send({"cmd": "setClkDiv", "embed": True, "args": {"clkdiv": clkdiv}})
        if reply.result is not None:
            self.settings["current_clk_div"] = reply.result
        return reply

    async def use_external_clock(self, freq: float | None) -> Reply:  # .set_freq_ext
        reply = await self._send(
            {"cmd": "useExternalClock", "embed": True, "args": {"freq_in_hz": freq}}
        )
        if reply.result is not None:
            self.settings["ext_frequency"] = reply.result
        return reply

    async def send_gains(self, gains: dict[tuple[str, int], int]) -> Reply:  # .sendGainsToCard
        cmds = [f"set.site {m} gain{ch + 1} {code}" for (m, ch), code in gains.items()]
        return await self._send({"cmd": "performCmd", "embed": True, "args": {"cmd": cmds}})

    async def check_trigger(self, source: str) -> Reply:
        return await self._send({"cmd": "checkTrigger", "embed": True,
                                 "args": {"trigger": source}})  # fmt: skip

    async def start(self, **args: Any) -> Reply:  # .startButton
        return await self._send({"cmd": "startReadout", "args": args})

    async def stop(self) -> Reply:  # .stopButton
        return await self._send({"cmd": "stopReadout"})

    async def read_buffer(self, channels: list[int]) -> Buffer:  # sendAndReceive
        reply = await self._send({"cmd": "readBuffer", "args": {"channels": channels}})
        if reply.refused:
            return Buffer()
        view, offset = reply.data, reply.offset
        (n,) = struct.unpack_from("<I", view, offset)
        if n == DONE:
            return Buffer(done=True)
        header_size = 4 + 4 * n + offset
        chs = list(struct.unpack_from(f"<{n}i", view, offset + 4))
        per_channel = (len(view) - header_size) // n
        dtype = "<i4" if self.settings.get("readout_size") == 4 else "<i2"
        data = {
            ch: np.frombuffer(view, dtype, per_channel // np.dtype(dtype).itemsize,
                              header_size + i * per_channel)
            for i, ch in enumerate(chs)
        }  # fmt: skip
        return Buffer(channels=chs, data=data)
