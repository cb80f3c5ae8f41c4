"""PVs through Channel Access: one CA subscription per PV, shared by every listener.

The bridge is a CA client like any other (caproto's asyncio client on the
process's loop), so it serves this project's IOC, several IOCs, or any IOC.
Each PV's latest state is kept here in PVWS field form; listeners get the
changes (encoded once, shared by all of them) and a newcomer gets the full state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from caproto import AccessRights, ChannelType
from caproto.asyncio.client import Context

from dtacq_ioc.bridge.encode import (
    TEXT_ENCODING,
    UNDEFINED,
    Shape,
    enum_labels,
    looks_like_text,
    metadata_fields,
    severity_name,
    stamp_fields,
)
from dtacq_ioc.caproto_adapter import forget_search
from dtacq_ioc.contract import TEXT_SUFFIXES  # the IOC's long strings; others by content

log = logging.getLogger(__name__)


DESC_TIMEOUT_S = 2.0  # how long to look for a record's DESC field
# caproto's PV objects (and the timeouts' tracebacks) form reference cycles: forgotten
# ones are freed only by a full collection, which a busy process seldom runs by itself;
# meanwhile thousands pile up and leave the heap fragmented (RSS that never comes back).
FORGOTTEN_PER_COLLECT = 500


class WriteRefused(Exception):
    """A write that was not done; the message says why, in one line."""


class Listener(Protocol):
    def pv_update(self, entry: PvEntry, delta: Delta) -> None: ...

    def pv_missing(self, entry: PvEntry) -> None: ...


@dataclass
class Delta:
    """What changed in one PV; its JSON text is built once for every listener."""

    name: str
    fields: dict[str, Any]
    _json: bytes | None = None

    def json(self) -> bytes:
        if self._json is None:
            self._json = pvws_update(self.name, self.fields)
        return self._json


def pvws_update(name: str, fields: dict[str, Any]) -> bytes:
    """A PVWS update message: the one encoding, shared by every listener and the outbox."""
    return json.dumps({"type": "update", "pv": name, **fields}, separators=(",", ":")).encode()


@dataclass
class PvEntry:
    name: str
    listeners: set[Any] = field(default_factory=set)
    pv: Any = None
    shape: Shape | None = None
    connected: bool = False
    searching: bool = True  # no server has answered the name search yet
    missing: bool = False  # no server answered in time, or the channel did not connect
    meta: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # latest value fields
    value: Any = None  # latest value as Python/numpy (for the nEDM protocol)
    timestamp: float = 0.0
    updated: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    sub: Any = None
    tokens: tuple[int, int] | None = None
    last_response: Any = None  # kept to re-send once metadata is known
    limits: tuple[float, float] | None = None  # control limits, checked before writing
    desc_task: asyncio.Task | None = None

    @property
    def writable(self) -> bool:
        rights = getattr(self.pv, "access_rights", None)
        return bool(rights is not None and rights & AccessRights.WRITE)

    def full(self) -> dict[str, Any]:
        """Everything a newcomer must know: metadata, then the latest value."""
        if not self.connected:
            return {"severity": UNDEFINED, "connected": False}
        return {**self.meta, **self.fields}


class PvSource:
    """Shared CA subscriptions keyed by PV name."""

    def __init__(self, search_timeout_s: float = 3.0, io_timeout_s: float = 5.0):
        self.search_timeout_s = search_timeout_s
        self.io_timeout_s = io_timeout_s
        self.context: Context | None = None
        self.entries: dict[str, PvEntry] = {}
        self._forgotten = 0  # names forgotten since the last garbage collection

    async def start(self) -> None:
        self.context = Context(timeout=self.io_timeout_s)

    async def close(self) -> None:
        for entry in list(self.entries.values()):
            for task in (entry.task, entry.desc_task):
                if task:
                    task.cancel()
        self.entries.clear()
        if self.context is not None:
            with contextlib.suppress(Exception):
                await self.context.disconnect()
            self.context = None

    # -- subscriptions --

    def subscribe(self, name: str, listener: Listener) -> PvEntry:
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = PvEntry(name)
            entry.task = asyncio.get_running_loop().create_task(self._connect(entry))
        entry.listeners.add(listener)
        return entry

    def unsubscribe(self, name: str, listener: Listener) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        entry.listeners.discard(listener)
        if not entry.listeners:
            del self.entries[name]
            if entry.searching:
                # Now, not in the cancelled task: a new subscriber must get a new search.
                if entry.task:
                    entry.task.cancel()
                self._forget(entry.name)
            else:
                asyncio.get_running_loop().create_task(self._drop(entry))

    def _forget(self, name: str) -> None:
        if self.context is not None and forget_search(self.context, name):
            self._forgotten += 1
            if self._forgotten >= FORGOTTEN_PER_COLLECT:
                self._forgotten = 0
                t0 = time.perf_counter()
                gc.collect()
                log.debug(
                    "collected after forgetting names: %.1f ms", 1e3 * (time.perf_counter() - t0)
                )

    async def _drop(self, entry: PvEntry) -> None:
        if entry.task:
            entry.task.cancel()
        if entry.pv is not None and entry.tokens is not None:
            conn_token, sub_token = entry.tokens
            entry.pv.connection_state_callback.remove_callback(conn_token)
            if entry.sub is not None:
                with contextlib.suppress(Exception):
                    await entry.sub.remove_callback(sub_token)

    async def _connect(self, entry: PvEntry) -> None:
        assert self.context is not None
        (pv,) = await self.context.get_pvs(entry.name, timeout=self.io_timeout_s)
        entry.pv = pv
        try:
            await pv.wait_for_search(timeout=self.search_timeout_s)
        except TimeoutError:  # caproto's own timeout error is one
            self._not_found(entry, f"no server answered within {self.search_timeout_s:g} s")
            return
        entry.searching = False

        async def on_state(_pv: Any, state: str) -> None:
            await self._state_changed(entry, state)

        async def on_value(_sub: Any, response: Any) -> None:
            self._value(entry, response)

        # caproto holds callbacks weakly: the entry keeps them alive.
        entry._callbacks = (on_state, on_value)  # type: ignore[attr-defined]  # kept alive here
        conn_token = pv.connection_state_callback.add_callback(on_state, run=True)
        entry.sub = pv.subscribe(data_type="time")
        entry.tokens = (conn_token, entry.sub.add_callback(on_value))
        try:
            await pv.wait_for_connection(timeout=self.search_timeout_s)
        except Exception:
            entry.missing = True
            wait = self.search_timeout_s
            log.info("PV %s: found, but not connected within %.1f s", entry.name, wait)
            for listener in list(entry.listeners):
                listener.pv_missing(entry)

    def _not_found(self, entry: PvEntry, why: str) -> None:
        """Forget a name no server answered: it costs nothing more (see searches.py)."""
        entry.searching = False
        entry.missing = True
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
        self._forget(entry.name)
        # One line per name would let a client fill the log; sessions summarise.
        log.debug("PV %s: %s; forgotten", entry.name, why)
        for listener in list(entry.listeners):
            listener.pv_missing(entry)
        entry.listeners.clear()

    async def _state_changed(self, entry: PvEntry, state: str) -> None:
        if state == "connected":
            try:
                await self._read_metadata(entry)
            except Exception as exc:
                log.warning("PV %s: metadata read failed: %s", entry.name, exc)
                return
            entry.missing = False
            entry.connected = True
            entry.fields = {}  # the next value goes out with its metadata
            if entry.last_response is not None:
                self._value(entry, entry.last_response)
        elif state in ("disconnected", "destroyed") and entry.connected:
            entry.connected = False
            entry.last_response = None
            self._emit(entry, {"severity": UNDEFINED, "connected": False})

    async def _read_metadata(self, entry: PvEntry) -> None:
        pv = entry.pv
        native = ChannelType(pv.channel.native_data_type)
        count = int(pv.channel.native_data_count)
        ctrl = await pv.read(data_type="control", timeout=self.io_timeout_s)
        text = False
        if native == ChannelType.CHAR and count > 1:
            raw = np.asarray(ctrl.data).astype("u1").tobytes()
            text = entry.name.endswith(TEXT_SUFFIXES) or looks_like_text(raw)
        labels = enum_labels(ctrl) if native == ChannelType.ENUM else ()
        entry.shape = Shape(native, count, text, labels)
        entry.meta = metadata_fields(ctrl, entry.shape)
        lo = getattr(ctrl.metadata, "lower_ctrl_limit", None)
        hi = getattr(ctrl.metadata, "upper_ctrl_limit", None)
        entry.limits = None
        if isinstance(lo, int | float) and isinstance(hi, int | float) and lo < hi:
            entry.limits = (float(lo), float(hi))
        entry.meta["connected"] = True
        entry.meta["readonly"] = not entry.writable
        if "description" not in entry.meta and "." not in entry.name:
            # Not awaited: a server without record fields must not delay the first value.
            entry.desc_task = asyncio.create_task(self._describe(entry))

    async def _describe(self, entry: PvEntry) -> None:
        """Add the record's DESC field, when the server has one (not every CA server does)."""
        assert self.context is not None
        name = entry.name + ".DESC"
        found = False
        try:
            (desc,) = await self.context.get_pvs(name, timeout=DESC_TIMEOUT_S)
            await desc.wait_for_search(timeout=DESC_TIMEOUT_S)
            found = True
            await desc.wait_for_connection(timeout=DESC_TIMEOUT_S)
            reading = await desc.read(timeout=DESC_TIMEOUT_S)
        except Exception:
            return
        finally:
            if not found and name not in self.entries:
                self._forget(name)  # a server without record fields: nothing to keep
        raw = reading.data[0] if len(reading.data) else b""
        text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
        if text:
            entry.meta["description"] = text
            if entry.fields:  # the first update has gone out: send it as a change
                self._emit(entry, {"description": text})

    def _value(self, entry: PvEntry, response: Any) -> None:
        entry.last_response = response
        if entry.shape is None:
            return
        first = not entry.fields
        md = response.metadata
        value = entry.shape.python_value(response.data)
        new = entry.shape.value_fields(value)
        new["severity"] = severity_name(int(md.severity))
        new.update(stamp_fields(md.stamp))
        if first:
            delta = {**entry.meta, **new}
        else:
            delta = {k: v for k, v in new.items() if entry.fields.get(k) != v or k in _ALWAYS}
        entry.fields = new
        entry.value = value
        entry.timestamp = md.stamp.timestamp
        entry.updated.set()
        entry.updated = asyncio.Event()
        self._emit(entry, delta)

    def _emit(self, entry: PvEntry, fields: dict[str, Any]) -> None:
        delta = Delta(entry.name, fields)
        for listener in list(entry.listeners):
            try:
                listener.pv_update(entry, delta)
            except Exception:
                log.exception("listener of %s failed", entry.name)

    # -- one-off access --

    async def entry(self, name: str, listener: Listener, timeout: float | None = None) -> PvEntry:
        """Subscribe `listener` to `name` and wait until a first value is there."""
        entry = self.subscribe(name, listener)
        if entry.fields and entry.connected:
            return entry
        wait = self.search_timeout_s if timeout is None else timeout
        try:
            await asyncio.wait_for(entry.updated.wait(), wait)
        except TimeoutError:
            raise WriteRefused(f"PV {name} is not connected") from None
        return entry

    async def write(self, name: str, value: Any, timeout: float | None = None) -> None:
        """Write through CA, converting value to the PV's type; WriteRefused says why not."""
        entry = self.entries.get(name)
        if entry is None or entry.pv is None or not entry.connected or entry.shape is None:
            raise WriteRefused(f"PV {name} is not connected")
        if not entry.writable:
            raise WriteRefused(f"PV {name} is read-only")
        data = convert_for_write(entry.shape, value, name)
        if entry.limits is not None and not entry.shape.is_array:
            lo, hi = entry.limits
            if not lo <= float(data[0]) <= hi:
                raise WriteRefused(f"write to {name} refused: {data[0]} outside {lo:g}..{hi:g}")
        wait = timeout or self.io_timeout_s
        try:
            response = await entry.pv.write(data, wait=True, timeout=wait)
        except TimeoutError:
            raise WriteRefused(
                f"write to {name} not confirmed within {wait:g} s (the IOC refused it or is busy)"
            ) from None
        except Exception as exc:
            raise WriteRefused(f"write to {name} failed: {exc}") from None
        status = getattr(response, "status", None)
        if status is not None and getattr(status, "success", 1) != 1:
            raise WriteRefused(f"write to {name} refused by the IOC ({status.name})")


_ALWAYS = ("seconds", "nanos")


def convert_for_write(shape: Shape, value: Any, name: str) -> Any:
    """A JSON value as CA data for this PV; WriteRefused names what does not fit."""
    if isinstance(value, bool):
        value = int(value)
    if shape.native == ChannelType.STRING:
        if not isinstance(value, str | int | float):
            raise WriteRefused(f"{name} takes a string, not {type(value).__name__}")
        text = str(value)
        if len(text.encode(TEXT_ENCODING, errors="replace")) > 39:
            raise WriteRefused(f"{name} takes at most 39 bytes of text")
        return [text]
    if shape.text:
        if not isinstance(value, str):
            raise WriteRefused(f"{name} takes a string, not {type(value).__name__}")
        try:
            raw = value.encode(TEXT_ENCODING)
        except UnicodeEncodeError:
            raise WriteRefused(f"{name} takes {TEXT_ENCODING} text only") from None
        if len(raw) >= shape.count:
            raise WriteRefused(f"{name} takes at most {shape.count - 1} bytes of text")
        return np.frombuffer(raw + b"\0", dtype=np.uint8)
    if shape.native == ChannelType.ENUM:
        if isinstance(value, str):
            if value in shape.labels:
                return [shape.labels.index(value)]
            raise WriteRefused(f"{name}: {value!r} is not one of {list(shape.labels)}")
        if isinstance(value, int) and 0 <= value < max(len(shape.labels), 1):
            return [value]
        raise WriteRefused(f"{name}: enum index {value!r} out of range")
    if isinstance(value, list):
        if not shape.is_array:
            raise WriteRefused(f"{name} is a scalar; an array was given")
        if len(value) > shape.count or not all(_is_number(v) for v in value):
            raise WriteRefused(f"{name} takes at most {shape.count} numbers")
        return np.asarray(value, dtype=shape.dtype)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise WriteRefused(f"{name} takes a number, not {value!r}") from None
    if not _is_number(value):
        raise WriteRefused(f"{name} takes a number, not {type(value).__name__}")
    if shape.native in (ChannelType.INT, ChannelType.LONG, ChannelType.CHAR):
        if not math.isfinite(value) or value != int(value):
            raise WriteRefused(f"{name} takes an integer, not {value!r}")
        return [int(value)]
    return [float(value)]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
