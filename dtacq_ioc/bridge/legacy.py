"""The nEDM digitizer protocol of the old WebSocket server, mapped onto the IOC's PVs.

Requests are JSON text ``{"cmd": NAME, "args": {...}, "embed": bool}``. Every
reply is a binary frame: int32 LE header length, the JSON header padded with
spaces to a multiple of 4, then an optional payload (the result, unless
``embed`` put it in the header). Unsolicited ``announce`` messages use the same
framing. Nothing here talks to a card: every command reads or writes PVs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtacq_ioc.bridge.session import BadRequest, Session
from dtacq_ioc.bridge.source import Delta, PvEntry, WriteRefused
from dtacq_ioc.config import CardConfig

log = logging.getLogger(__name__)

NO_RUN = 0xDEADBEEF
DEFAULT_TRIGGER = "always"  # the IOC's built-in "write every buffer"
COUNTER_FLAG = 0xFF00
STOP_TIMEOUT_S = 60.0
START_TIMEOUT_S = 15.0
GAIN_CMD = re.compile(r"^\s*(?:set\.site\s+(\d)\s+)?gain(\d{1,3})?\s*[= ]\s*(\d{1,3})\s*$")
SOURCE_HINTS = ("\n", "class ", "def ", "import ", "(", ":")


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One reply: int32 LE length, space-padded JSON header, payload."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    return struct.pack("<i", len(text)) + text + payload


def parse_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The inverse of `frame` (used by clients and tests)."""
    (length,) = struct.unpack_from("<i", data)
    return json.loads(data[4 : 4 + length]), data[4 + length :]


@dataclass(frozen=True)
class SiteView:
    site: int
    nchan: int
    word_size: int


class LegacySession(Session):
    kind = "nEDM"

    def onOpen(self) -> None:
        self.card: CardConfig | None = None
        self.control = False
        self.watched: set[str] = set()
        super().onOpen()

    def closed(self) -> None:
        self._release("connection closed")
        for name in self.watched:
            self.services.source.unsubscribe(name, self)
        self.watched = set()

    # PV listener: values are read on demand from the shared entries.
    def pv_update(self, entry: PvEntry, delta: Delta) -> None:
        pass

    def pv_missing(self, entry: PvEntry) -> None:
        pass

    # -- framing --

    def error(self, text: str, request: Any) -> None:
        cmd = request if isinstance(request, str) else None
        self.outbox.reply(frame({"cmd": cmd, "ok": False, "error": text}), binary=True)

    def result(self, cmd: str, result: Any, embed: bool) -> None:
        header: dict[str, Any] = {"cmd": cmd, "ok": True}
        payload = b""
        if embed:
            if isinstance(result, bytes):
                result = base64.b64encode(result).decode("ascii")
            header["result"] = result
        elif isinstance(result, bytes):
            payload = result
        elif result is not None:
            payload = json.dumps(result, separators=(",", ":")).encode()
        self.outbox.reply(frame(header, payload), binary=True)

    def announce(self, msg: str) -> None:
        for session in list(self.services.sessions):
            if isinstance(session, LegacySession) and session is not self:
                session.outbox.reply(frame({"cmd": "announce", "msg": msg}), binary=True)

    def ack_auth(self) -> None:
        self.outbox.reply(frame({"cmd": "auth", "ok": True}), binary=True)

    # -- dispatch --

    def handle(self, message: dict[str, Any]) -> None:
        cmd = message.get("cmd")
        if not isinstance(cmd, str):
            raise BadRequest('a request needs a string "cmd"')
        handler = COMMANDS.get(cmd)
        if handler is None:
            raise BadRequest(f"unknown command {cmd[:64]!r}")
        args = message.get("args") or {}
        if not isinstance(args, dict):
            raise BadRequest(f"{cmd}: args must be a JSON object")
        embed = bool(message.get("embed", False))

        async def serve() -> None:
            self.result(cmd, await handler(self, args), embed)

        self.run(serve(), cmd)

    # -- PV access --

    def pv(self, suffix: str) -> str:
        assert self.card is not None
        return self.card.prefix + suffix

    async def read(self, suffix: str) -> Any:
        name = self.pv(suffix)
        self.watched.add(name)
        try:
            entry = await self.services.source.entry(name, self)
        except WriteRefused as exc:
            raise BadRequest(f"{exc} (is the IOC for {self.card.host} running?)") from None
        return entry.value

    async def write(self, suffix: str, value: Any, confirm: bool = True) -> None:
        """Write a PV; with confirm, wait (briefly) until its monitor shows the new value,
        so a following read in the same page sequence sees it."""
        await self.read(suffix)  # connects the PV (and tells a missing IOC apart)
        try:
            await self.services.source.write(self.pv(suffix), value)
        except WriteRefused as exc:
            # A refusing putter leaves its reason in LAST_ERROR; CA itself says little.
            why = await self.read("LAST_ERROR") if suffix != "LAST_ERROR" else ""
            raise BadRequest(f"{exc}: {why}" if why else str(exc)) from None
        if confirm:
            await self.wait_for(suffix, lambda v: v == value, 1.0)

    async def wait_for(self, suffix: str, ok: Callable[[Any], bool], timeout: float) -> Any:
        """Wait until the PV's value satisfies ok; return the last value seen either way."""
        name = self.pv(suffix)
        value = await self.read(suffix)
        deadline = time.monotonic() + timeout
        entry = self.services.source.entries[name]
        while not ok(value):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(entry.updated.wait(), left)
            except TimeoutError:
                break
            entry = self.services.source.entries.get(name, entry)
            value = entry.value
        return value

    async def sites(self) -> list[SiteView]:
        text = await self.read("SITES")
        sites = [int(s) for s in str(text).replace(" ", "").split(",") if s.isdigit()]
        counts = await asyncio.gather(*(self.read(f"{s}:NCHAN") for s in sites))
        sizes = await asyncio.gather(*(self.read(f"{s}:WORD_SIZE") for s in sites))
        return [SiteView(s, int(n), int(w)) for s, n, w in zip(sites, counts, sizes, strict=True)]

    # -- access to a card --

    def _card_for(self, args: dict[str, Any]) -> CardConfig:
        host = args.get("ip_addr")
        for card in self.services.config.cards:
            if host in (card.host, card.name):
                return card
        raise BadRequest(f"{host!r} is not one of the digitizers {self._hosts()}")

    def _hosts(self) -> list[str]:
        return [c.host for c in self.services.config.cards]

    def need_card(self) -> CardConfig:
        if self.card is None:
            raise BadRequest(
                "no digitizer selected: requestDigitizerControl or requestBufferStream"
            )
        return self.card

    def need_control(self, what: str) -> CardConfig:
        card = self.need_card()
        if not self.control or self.services.owners.get(card.host) is not self:
            raise BadRequest(f"{what} needs control of {card.host} (requestDigitizerControl)")
        return card

    def _release(self, why: str) -> None:
        if self.card is not None and self.services.owners.get(self.card.host) is self:
            del self.services.owners[self.card.host]
            self.announce(f"{self.card.host} released ({why})")
            log.info("%s: released %s (%s)", self.peer_name, self.card.host, why)
        self.control = False


# -- commands --


async def initialize_web_page(s: LegacySession, args: dict[str, Any]) -> Any:
    return s._hosts()


async def request_control(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s._card_for(args)
    s.require_write(f"control of {card.host}")
    owner = s.services.owners.get(card.host)
    if owner is not None and owner is not s:
        raise BadRequest(f"{card.host} is controlled by another client ({owner.peer_name})")
    if s.card is not None and s.card.host != card.host:
        s._release("control moved to another card")
    s.card, s.control = card, True
    s.services.owners[card.host] = s
    s.announce(f"{card.host} is now controlled by {s.peer_name}")
    log.info("%s: controls %s", s.peer_name, card.host)
    return True


async def request_stream(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s._card_for(args)
    if s.card is not None and s.card.host != card.host:
        s._release("switched to a buffer stream")
    s.card = card
    s.control = s.services.owners.get(card.host) is s
    return True


async def release_control(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("releaseDigitizerControl")
    s._release("released by its owner")
    return True


async def get_channels(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_card()
    sites = await s.sites()
    modules = []
    for site in sites:
        p = f"{site.site}:"
        model, divider, min_clkdiv, max_buffer = await asyncio.gather(
            s.read(p + "MODEL"), s.read(p + "DIVIDER_RBV"), s.read(p + "CLKDIV_MIN"),
            s.read(p + "BUFFER_MAX"),
        )  # fmt: skip
        gains, labels = await _gains(s, site)
        modules.append(
            {
                "site": site.site, "model": model, "nchan": site.nchan,
                "word_size": site.word_size, "divider": divider, "min_clkdiv": min_clkdiv,
                "max_buffer": max_buffer, "gains": gains,
                "gain_labels": {str(i): label for i, label in enumerate(labels)},
            }
        )  # fmt: skip
    clkdiv, ext, ext_freq, sysclk, rate, buffer = await asyncio.gather(
        s.read("CLKDIV_RBV"), s.read("EXT_CLOCK"), s.read("EXT_CLOCK_FREQ"),
        s.read("SYSCLK_RBV"), s.read("SAMPLE_RATE_RBV"), s.read("BUFFER_SIZE"),
    )  # fmt: skip
    sample_bytes = sum(m.nchan * m.word_size for m in sites)
    return {
        "modules": modules, "clkdiv": clkdiv, "sysclk": sysclk,
        "ext_clock_freq": ext_freq if ext else None, "sample_rate": rate,
        "buffer_size": buffer, "min_buffer": sample_bytes,
        "max_buffer": min((m["max_buffer"] for m in modules), default=0),
    }  # fmt: skip


async def _gains(s: LegacySession, site: SiteView) -> tuple[list[int], tuple[str, ...]]:
    names = [f"{site.site}:GAIN:{ch:02d}" for ch in range(1, site.nchan + 1)]
    values = await asyncio.gather(*(s.read(n) for n in names))
    entry = s.services.source.entries.get(s.pv(names[0])) if names else None
    labels = entry.shape.labels if entry is not None and entry.shape is not None else ()
    return [int(v) for v in values], labels


async def read_current_gains(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_card()
    result = {}
    for site in await s.sites():
        gains, _ = await _gains(s, site)
        result[str(site.site)] = {str(ch): g for ch, g in enumerate(gains)}
    return result


async def set_clkdiv(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("setClkDiv")
    clkdiv = args.get("clkdiv")
    if not isinstance(clkdiv, int) or isinstance(clkdiv, bool) or clkdiv < 1:
        raise BadRequest(f"setClkDiv: clkdiv must be a positive integer, not {clkdiv!r}")
    sites = await s.sites()
    minimum = max([int(await s.read(f"{x.site}:CLKDIV_MIN")) for x in sites] or [1])
    if clkdiv < minimum:
        raise BadRequest(f"setClkDiv: {clkdiv} is below the module minimum {minimum}")
    await s.write("CLKDIV", clkdiv)
    return await s.wait_for("CLKDIV_RBV", lambda v: v == clkdiv, 5.0)


async def use_external_clock(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("useExternalClock")
    freq = args.get("freq_in_hz")
    if freq is None:
        await s.write("EXT_CLOCK", 0)
    elif isinstance(freq, int | float) and not isinstance(freq, bool) and freq > 0:
        await s.write("EXT_CLOCK_FREQ", float(freq))
        await s.write("EXT_CLOCK", 1)
    else:
        raise BadRequest("useExternalClock: freq_in_hz must be a positive number or null")
    return {"ext_clock_freq": freq, "sample_rate": await s.read("SAMPLE_RATE_RBV")}


async def perform_cmd(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("performCmd")
    cmds = args.get("cmd")
    cmds = [cmds] if isinstance(cmds, str) else cmds
    if not isinstance(cmds, list) or not all(isinstance(c, str) for c in cmds):
        raise BadRequest("performCmd: cmd must be a string or a list of strings")
    sites = [x.site for x in await s.sites()]
    writes = []
    for cmd in cmds:  # parse all first: a bad one refuses the lot
        m = GAIN_CMD.match(cmd)
        if m is None:
            raise BadRequest(
                f"performCmd accepts only gain settings (gainN=code, gain=code); refused {cmd!r}"
            )
        site_text, channel, code = m.groups()
        targets = [int(site_text)] if site_text else sites[:1] if channel else sites
        for site in targets:
            if site not in sites:
                raise BadRequest(f"performCmd: site {site} is not one of {sites}")
            knob = f"GAIN:{int(channel):02d}" if channel else "GAIN:ALL"
            writes.append((f"{site}:{knob}", int(code)))
    for suffix, code in writes:
        await s.write(suffix, code)
    return [f"{suffix}={code}" for suffix, code in writes]


def _trigger_dir(s: LegacySession) -> str:
    d = s.services.config.ioc.trigger_dir
    return str(d) if d else "(none configured: [ioc] trigger_dir)"


async def _trigger_names(s: LegacySession) -> list[str]:
    text = await s.read("TRIGGERS")
    try:
        names = json.loads(text or "[]")
    except ValueError:
        names = []
    return [n for n in names if isinstance(n, str)]


async def _check_trigger(s: LegacySession, trigger: Any) -> str:
    if trigger in (None, ""):
        return DEFAULT_TRIGGER
    if not isinstance(trigger, str):
        raise BadRequest("trigger must be the name of a trigger")
    names = await _trigger_names(s)
    if trigger in names:
        return trigger
    if any(h in trigger for h in SOURCE_HINTS):
        raise BadRequest(
            "trigger source code is not run by this server: put the trigger class in a "
            f"Python file in {_trigger_dir(s)} and send its name; available: {names}"
        )
    raise BadRequest(f"unknown trigger {trigger!r}; available: {names} (in {_trigger_dir(s)})")


async def check_trigger(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_card()
    return await _check_trigger(s, args.get("trigger"))


def _arg(args: dict[str, Any], key: str, kinds: Any, default: Any, what: str) -> Any:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"startReadout: {key} must be {what}")
    if not isinstance(value, kinds):
        raise BadRequest(f"startReadout: {key} must be {what}, not {type(value).__name__}")
    return value


async def start_readout(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s.need_control("startReadout")
    state = await s.read("RUN:STATE_RBV")
    if state in (1, 2):  # STARTING, RUNNING
        raise BadRequest(f"startReadout: a readout of {card.host} is already running")
    sites = [x.site for x in await s.sites()]
    mod_list = _arg(args, "mod_list", list, sites, "a list of sites")
    if not set(mod_list) <= set(sites) or not mod_list:
        raise BadRequest(f"startReadout: mod_list {mod_list} must name sites among {sites}")
    channels = _arg(args, "channel_list", list, [], "a list of channel indices")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels):
        raise BadRequest("startReadout: channel_list must hold channel indices (0-based)")
    downsample = _arg(args, "downsample", int, 1, "an integer >= 1")
    if downsample < 1:
        raise BadRequest("startReadout: downsample must be >= 1")
    logitems = _arg(args, "logitems", dict, {}, "a JSON object")
    trigger_args = _arg(args, "trigger_args", dict, {}, "a JSON object")
    writes: list[tuple[str, Any]] = [
        ("RUN:TRIGGER", await _check_trigger(s, args.get("trigger"))),
        ("RUN:TRIGGER_ARGS", json.dumps(trigger_args)),
        ("RUN:NAME", _arg(args, "measurement_name", str, "", "a string")),
        ("RUN:LOG", _arg(args, "log", str, "", "a string")),
        ("RUN:SAVE", int(bool(_arg(args, "should_save", (bool, int), False, "a boolean")))),
        ("RUN:UPLOAD", int(bool(_arg(args, "should_upload", (bool, int), False, "a boolean")))),
        ("RUN:DOWNSAMPLE", downsample),
        ("RUN:CHANNELS", ",".join(str(c) for c in channels)),
        ("RUN:LOGITEMS", json.dumps(logitems)),
    ]
    size = _arg(args, "buffer_size", int, 0, "a number of bytes")
    if size:
        writes.insert(0, ("BUFFER_SIZE", size))
    for suffix, value in writes:
        # The IOC (caproto) does not answer a put of an empty CHAR array: send one space.
        await s.write(suffix, value if value != "" else " ")
    before = await s.read("RUN:ID_RBV")
    await s.write("RUN:START", 1, confirm=False)
    state = await s.wait_for("RUN:STATE_RBV", lambda v: v in (2, 4), START_TIMEOUT_S)
    if state != 2:
        error = await s.read("LAST_ERROR")
        raise BadRequest(f"startReadout failed: {error or 'the run did not start'}")
    run_id = await s.wait_for("RUN:ID_RBV", lambda v: v != before, 2.0)
    return {"run_id": run_id}


async def stop_readout(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("stopReadout")
    run_id = await s.read("RUN:ID_RBV")
    await s.write("RUN:STOP", 1, confirm=False)
    state = await s.wait_for("RUN:STATE_RBV", lambda v: v in (0, 4), STOP_TIMEOUT_S)

    def finished(text: Any) -> bool:
        try:
            return json.loads(text or "{}").get("run_id") == run_id
        except (ValueError, AttributeError):
            return False

    text = await s.wait_for("RUN:LAST_RESULT", finished, 10.0)
    try:
        last = json.loads(text or "{}")
    except ValueError:
        last = {}
    done: dict[str, Any] = {"type": "JobFinished"}
    fault = last.get("fault") if isinstance(last, dict) else None
    if state == 4 or fault:
        done["error"] = fault or await s.read("LAST_ERROR") or "readout failed"
    return [{"type": "RunResult", **last} if isinstance(last, dict) else last, done]


async def read_buffer(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_card()
    channels = args.get("channels")
    include_counter = bool(args.get("include_counter", False))
    sites = await s.sites()
    total = sum(x.nchan for x in sites)
    if (
        not isinstance(channels, list)
        or not channels
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels)
        or not all(0 <= c < total for c in channels)
    ):
        raise BadRequest(f"readBuffer: channels must be a list of indices in 0..{total - 1}")
    if await s.read("RUN:STATE_RBV") != 2:
        return struct.pack("<I", NO_RUN)
    names = []
    for c in channels:
        for site in sites:
            if c < site.nchan:
                names.append(f"{site.site}:AI:WF:{c + 1:02d}")
                break
            c -= site.nchan
    arrays = await asyncio.gather(*(s.read(n) for n in names))
    counter = await s.read("AI:COUNTER") if include_counter else None
    length = min(len(a) for a in arrays)
    n = len(channels) | (COUNTER_FLAG if include_counter else 0)
    header = [n, *channels] + ([int(counter) & 0xFFFFFFFF] if include_counter else [])
    parts = [np.asarray(header, dtype="<u4").tobytes()]
    parts += [np.asarray(a[:length]).tobytes() for a in arrays]
    return b"".join(parts)


async def reset_readout(s: LegacySession, args: dict[str, Any]) -> Any:
    s.need_control("resetReadout")
    await s.write("RESET", 1, confirm=False)
    return True


async def reboot_card(s: LegacySession, args: dict[str, Any]) -> Any:
    card = s.need_control("rebootCard")
    await s.write("REBOOT", 1, confirm=False)
    s._release(f"{card.host} rebooting")
    return True


Handler = Callable[[LegacySession, dict[str, Any]], Awaitable[Any]]

COMMANDS: dict[str, Handler] = {
    "initializeWebPage": initialize_web_page,
    "requestDigitizerControl": request_control,
    "requestBufferStream": request_stream,
    "releaseDigitizerControl": release_control,
    "getChannels": get_channels,
    "setClkDiv": set_clkdiv,
    "useExternalClock": use_external_clock,
    "readCurrentGains": read_current_gains,
    "performCmd": perform_cmd,
    "startReadout": start_readout,
    "stopReadout": stop_readout,
    "readBuffer": read_buffer,
    "resetReadout": reset_readout,
    "rebootCard": reboot_card,
    "checkTrigger": check_trigger,
}
