"""Everything that reaches into caproto's private state, in one place: the IOC's server
and the bridge's client both use it.

caproto 1.3's server gets a few things wrong for EPICS base's own clients, the
fan-out of big arrays needs its subscription queues and message parts, and the bridge
must forget the name searches nobody answers. Each use of a private name is here,
listed in `PRIVATE_NAMES` and the lists beside it, so a caproto upgrade is checked by
one test (`tests/test_caproto_adapter.py`) and fixed in one file.

What the server here does differently from caproto's own:

- A read that cannot be converted to the type asked for (`caget -d DBR_CTRL_DOUBLE`
  of a string PV) is answered with a failed-read status, as EPICS base's server does;
  caproto answers "Internal Failure", which makes libca abort the client.
- A read waits for a put in progress on the same PV, so `caput` (which reads back
  right after its put) prints the applied value on its "New :" line.
- A channel with an array filter (`PV.[0:4]`) reports the filtered element count at
  connect, so a `caget` gets exactly those elements.
- A refused put is answered with the refusal's words and logged in one line, at most
  once per client, PV and reason every `REFUSAL_LOG_INTERVAL_S`; caproto logs a
  traceback and sends the exception's class name.
- A subscription gets only the events its mask asks for (`wanted`), and its first
  update; caproto sends every update to every subscription.
- Beacons go where EPICS base's server sends them (`beacon_environment`), so a
  caRepeater on `EPICS_CA_REPEATER_PORT` hears a restarted IOC and its clients
  reconnect at once; caproto sends them to port 5065 whatever that says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import caproto
import caproto as ca
import caproto._backend as _ca_backend
import caproto._commands as _ca_commands
import caproto._headers as _ca_headers
import numpy as np
from caproto.asyncio.server import Context as _AsyncioContext
from caproto.asyncio.server import VirtualCircuit as _AsyncioCircuit

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("1.3.",)  # caproto releases this module was written and tested for
REFUSAL_LOG_INTERVAL_S = 60.0
WRITE_WAIT_S = 30.0  # a read waits at most this long for a put on the same PV

# Private names used below: class attributes, checked at start (`check_caproto`) ...
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "caproto.server.common.VirtualCircuit": ("_process_command", "_get_db_entry_from_command"),
    "caproto.asyncio.server.VirtualCircuit": ("_start_write_task",),
    "caproto.server.common.Context": ("_subscription_queue_send",),
    "caproto._data.ChannelData": ("_read",),
}
# ... and the client's (the bridge's PV source), checked on a live client by the same test.
PRIVATE_CLIENT_NAMES = ("_lock", "_searches", "_searches_by_name", "_unanswered_searches")
# ... and instance attributes, checked on a live server by tests/test_caproto_adapter.py.
PRIVATE_INSTANCE_NAMES: dict[str, tuple[str, ...]] = {
    "circuit": ("write_event", "client"),
    "pv": ("_queues", "_content"),
}

# ... and names in caproto's private modules (the fan-out builds its messages with them).
PRIVATE_MODULE_NAMES: dict[str, tuple[str, ...]] = {
    "caproto._backend": ("backend",),
    "caproto._commands": ("pad_buffers", "parse_metadata"),
    "caproto._headers": ("EventAddResponseHeader",),
}
ReadConversionErrors = (ca.CaprotoConversionError, ValueError, TypeError, OverflowError)
STRING = ca.ChannelType.STRING
# EPICS base: a text that is no number reads as enum index 0 for these (not DBR_CTRL_ENUM).
_PLAIN_ENUMS = (
    ca.ChannelType.ENUM,
    ca.ChannelType.STS_ENUM,
    ca.ChannelType.TIME_ENUM,
    ca.ChannelType.GR_ENUM,
)
_LEADING_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def leading_number(value: Any) -> float | None:
    """The number a text starts with, as C's strtod reads it (EPICS base's conversion)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    if not text.strip():
        return 0.0  # EPICS base converts an empty text to 0
    match = _LEADING_NUMBER.match(text)
    return float(match.group(0)) if match else None


class UnsupportedCaproto(RuntimeError):
    """The installed caproto is not a version this adapter was written for."""


def check_caproto() -> None:
    """Refuse a caproto this module was not written for, naming what to check."""
    version = getattr(caproto, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VERSIONS):
        raise UnsupportedCaproto(
            f"caproto {version} is installed, but dtacq_ioc/ioc/caproto_adapter.py was written "
            f"for {', '.join(v + 'x' for v in SUPPORTED_VERSIONS)}: check the private names it "
            "uses (PRIVATE_NAMES) against the new caproto, then add the version"
        )
    missing = list(missing_private_names())
    if missing:
        raise UnsupportedCaproto(
            f"caproto {version} lacks {', '.join(missing)}, used by caproto_adapter.py"
        )


def missing_private_names() -> Iterator[str]:
    import importlib

    for owner, names in PRIVATE_NAMES.items():
        module_name, _, class_name = owner.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        for name in names:
            if not hasattr(cls, name):
                yield f"{owner}.{name}"
    for module_name, names in PRIVATE_MODULE_NAMES.items():
        module = importlib.import_module(module_name)
        yield from (f"{module_name}.{name}" for name in names if not hasattr(module, name))


# -- what the fan-out of big arrays needs --------------------------------------------------


def subscription_queues(pv: Any) -> Any:
    """A PV's subscriptions: queue -> sync filter -> data type name -> subscription specs."""
    return pv._queues


def forget_cached_reads(pv: Any) -> None:
    """Drop caproto's converted values kept for new subscriptions (the value changed)."""
    pv._content.clear()


async def read_for_subscription(pv: Any, data_type: Any) -> tuple[Any, Any]:
    """(metadata, values) as caproto sends them to a subscription of `data_type`."""
    reading: tuple[Any, Any] = await pv._read(data_type)
    return reading


def event_add_parts(values: Any, metadata: Any, data_type: Any, count: int) -> tuple[Any, ...]:
    """An EventAddResponse (subscription id 0) as caproto builds it: header, metadata, data
    and padding. Values that are already in the wire's form (what caproto's read makes: a
    contiguous big-endian array of the type's own dtype) are taken as they are; caproto's
    constructor would copy the array once more, 3.2 MB a frame for 16 waveforms."""
    wire = _ca_backend.backend.type_map.get(ca.native_type(data_type))
    if not (
        isinstance(values, np.ndarray)
        and values.dtype.kind in "iuf"
        and values.dtype == wire
        and values.flags.c_contiguous
    ):
        cmd = ca.EventAddResponse(values, data_type, count, 1, 0, metadata=metadata)
        return (cmd.header, *cmd.buffers)
    md = _ca_commands.parse_metadata(metadata, data_type)
    size, pad = _ca_commands.pad_buffers(md, values)
    header = _ca_headers.EventAddResponseHeader(size, data_type, count, 1, 0)
    return (header, md, values, *((pad,) if pad else ()))


async def send_by_caproto(context: Any, spec: Any, sub: Any, **kwargs: Any) -> None:
    """Hand one subscription's update to caproto's own queue (filters, partial counts)."""
    await context._subscription_queue_send(spec, sub, **kwargs)


def circuit_transport(circuit: Any) -> asyncio.Transport:
    """The asyncio transport of a server circuit's client socket."""
    transport: asyncio.Transport = circuit.client.writer.transport
    return transport


def circuit_writer(circuit: Any) -> asyncio.StreamWriter:
    writer: asyncio.StreamWriter = circuit.client.writer
    return writer


# -- puts in progress --------------------------------------------------------------------


class WriteTracker:
    """Mixed into writable PVs: reads of the PV wait while a put to it is carried out.

    The server marks the put begun when the request arrives, before caproto's task for
    it runs, so a read that follows the put on the same circuit cannot overtake it.
    """

    def begin_put(self) -> None:
        self.__dict__.setdefault("_idle", _set_event()).clear()

    def end_put(self) -> None:
        self.__dict__.setdefault("_idle", _set_event()).set()

    async def wait_for_put(self) -> None:
        idle: asyncio.Event | None = self.__dict__.get("_idle")
        if idle is not None and not idle.is_set():
            # A put stuck longer than that: the client gets the value as it is.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), WRITE_WAIT_S)


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


# -- the server --------------------------------------------------------------------------


def refusal_text(exc: BaseException) -> str:
    """A refused put in words: our own refusals carry them; anything else is named generally."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ca.CaprotoConversionError | ValueError | TypeError) and not text:
        return "the value cannot be converted to the PV's type"
    return text or "the put was refused"


class _Circuit(_AsyncioCircuit):  # type: ignore[misc]  # caproto is untyped
    """One client's connection, answering as EPICS base's server would where caproto differs."""

    async def _process_command(self, command: Any) -> Any:
        if isinstance(command, ca.ReadNotifyRequest | ca.ReadRequest):
            return await self._read(command)
        if isinstance(command, ca.WriteRequest | ca.WriteNotifyRequest):
            return await self._write(command)
        responses = await super()._process_command(command)
        if isinstance(command, ca.CreateChanRequest):
            return [_filtered_count(command, r, self.context) for r in responses]
        return responses

    async def _read(self, command: Any) -> Any:
        chan, db_entry = self._get_db_entry_from_command(command)
        wait = getattr(db_entry, "wait_for_put", None)
        if wait is not None:
            await wait()
        if chan.channel_filter.arr is not None and command.data_count > 0:
            # caproto cuts the array to the count asked for before it applies the filter
            # (PV.[0:2:8] gave 0, 2, 4 and zeros); ask for all, the filter gives the count.
            command = type(command)(command.data_type, 0, command.sid, command.ioid)
        try:
            return await super()._process_command(command)
        except ReadConversionErrors:
            number = None
            if db_entry.data_type == STRING:
                number = leading_number(db_entry.value)
                if number is None and command.data_type in _PLAIN_ENUMS:
                    number = 0.0  # EPICS base gives index 0 for text that is no number
            if number is not None:  # as EPICS base reads "0.1.0" as a number: 0.1
                return await self._read_as_number(command, chan, db_entry, number)
            # EPICS base answers so when dbGet cannot convert; libca carries on.
            log.debug("%s: cannot be read as %s", chan.name, command.data_type)
            return [
                ca.ErrorResponse(
                    command, chan.cid, status=ca.CAStatus.ECA_GETFAIL, error_message="read failed"
                )
            ]

    async def _read_as_number(self, command: Any, chan: Any, db_entry: Any, number: float) -> Any:
        """A text PV read as a number, with its alarm and timestamp."""
        stand_in = ca.ChannelDouble(
            value=number, timestamp=db_entry.timestamp,
            alarm=ca.ChannelAlarm(status=db_entry.status, severity=db_entry.severity),
        )  # fmt: skip
        metadata, data = await stand_in.read(command.data_type)
        notify = isinstance(command, ca.ReadNotifyRequest)
        return [
            chan.read(data=data, data_type=command.data_type, data_count=len(data), status=1,
                      ioid=command.ioid, metadata=metadata, notify=notify)
        ]  # fmt: skip

    async def _write(self, command: Any) -> list[Any]:
        chan, db_entry = self._get_db_entry_from_command(command)
        notify = isinstance(command, ca.WriteNotifyRequest)
        tracked = isinstance(db_entry, WriteTracker)
        if tracked:
            db_entry.begin_put()

        async def carry_out() -> None:
            try:
                status = await db_entry.auth_write(
                    self.client_hostname, self.client_username, command.data,
                    command.data_type, command.metadata, user_address=self.circuit.address,
                )  # fmt: skip
            except Exception as exc:
                message = refusal_text(exc)
                self._log_refusal(chan.name, message)
                await self.send(
                    ca.ErrorResponse(
                        command, chan.cid, status=ca.CAStatus.ECA_PUTFAIL, error_message=message
                    )
                )
            else:
                if notify:
                    ok = True if status is None else status
                    await self.send(
                        chan.write(ioid=command.ioid, status=ok, data_count=db_entry.length)
                    )
            finally:
                if tracked:
                    db_entry.end_put()
                self.write_event.set()

        self.write_event.clear()
        await self._start_write_task(carry_out)
        return []

    def _log_refusal(self, pvname: str, message: str) -> None:
        host, port = self.circuit.address
        self.context.refusals.log(pvname, message, f"{host}:{port}")


class RefusalLog:
    """One log line per PV and reason a minute, from whichever client: none can flood it."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._quiet: dict[tuple[str, str], int] = {}  # refusals not logged since the last line

    def log(self, pvname: str, message: str, client: str) -> None:
        now = time.monotonic()
        key = (pvname, message)
        if now - self._last.get(key, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        if len(self._last) > 1000:  # clients trying many values: keep the memory bounded
            self._last.clear()
            self._quiet.clear()
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        more = f" (and {quiet} times more since the last report)" if quiet else ""
        log.warning("put to %s from %s refused: %s%s", pvname, client, message, more)


def _filtered_count(command: Any, response: Any, context: Any) -> Any:
    """A CreateChanResponse with the element count an array filter leaves, as EPICS gives."""
    if not isinstance(response, ca.CreateChanResponse):
        return response
    modifiers = ca.parse_record_field(command.name).modifiers
    if modifiers is None or modifiers.filter_ is None:
        return response
    try:
        arr = ca.parse_channel_filter(modifiers.filter_).arr
    except ValueError:
        return response
    if arr is None:
        return response
    count = len(ca.apply_arr_filter(arr, range(response.data_count)))
    return ca.CreateChanResponse(
        data_type=response.data_type,
        data_count=max(count, 1),
        cid=response.cid,
        sid=response.sid,
    )


def wanted(mask: int, flags: int) -> bool:
    """Whether a subscription with `mask` takes an update posted with event bits `flags`.

    No bits: a subscription's first update (always sent), or a PV that does not work
    out its events (a record field's channel), sent to all as caproto does."""
    return not flags or bool(mask & flags)


class _Context(_AsyncioContext):  # type: ignore[misc]  # caproto is untyped
    CircuitClass = _Circuit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals = RefusalLog()

    async def _subscription_queue_send(self, sub_spec: Any, sub: Any, metadata: Any, values: Any,
                                       flags: int) -> None:  # fmt: skip
        if wanted(sub.mask, flags):
            await super()._subscription_queue_send(sub_spec, sub, metadata, values, flags)


def beacon_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The EPICS_CAS_* beacon settings caproto reads, as EPICS base's server derives them.

    EPICS base (rsrv) beacons to EPICS_CAS_BEACON_PORT, else EPICS_CA_REPEATER_PORT; to
    the broadcast addresses unless EPICS_CAS_AUTO_BEACON_ADDR_LIST, else
    EPICS_CA_AUTO_ADDR_LIST, says NO; and to EPICS_CAS_BEACON_ADDR_LIST, or to
    EPICS_CA_ADDR_LIST when neither that nor EPICS_CAS_INTF_ADDR_LIST is set. caproto
    reads only the EPICS_CAS_* names, with fixed defaults. Returns what to add.
    """
    fallbacks = [
        ("EPICS_CAS_BEACON_PORT", "EPICS_CA_REPEATER_PORT"),
        ("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST"),
    ]
    if "EPICS_CAS_INTF_ADDR_LIST" not in environ:
        fallbacks.append(("EPICS_CAS_BEACON_ADDR_LIST", "EPICS_CA_ADDR_LIST"))
    return {
        server: environ[client]
        for server, client in fallbacks
        if server not in environ and client in environ
    }


def make_server(pvdb: dict[str, Any], interfaces: list[str]) -> Any:
    """caproto's asyncio server context with this module's circuit; `.run()` serves."""
    check_caproto()
    # caproto reads its beacon settings from the process's environment, at start.
    os.environ.update(beacon_environment(os.environ))
    return _Context(pvdb, interfaces)


async def serve(
    pvdb: dict[str, Any],
    interfaces: list[str],
    startup_hook: Callable[[Any], Awaitable[None]] | None = None,
) -> None:
    """Serve `pvdb` until cancelled; `startup_hook` is awaited once the sockets are bound."""
    await make_server(pvdb, interfaces).run(startup_hook=startup_hook)


# -- the client: forgetting name searches nobody answered --------------------------------
# Forgetting a Channel Access name search nobody answered (caproto 1.3 client internals).
#
# caproto's asyncio client keeps every name it was asked for: the PV object
# (`Context.pvs`, ~7 KB with its events, locks and callback tables), its search
# item (`SearchResults._searches`, kept even after an answer), an empty address
# map (`name_to_addrs` is a defaultdict, filled by each cache lookup) and the
# unanswered search itself, re-sent for 8 minutes and then every minute forever.
# Each new search re-sends *all* unanswered ones at once, so a few thousand
# unknown names overflow the server's UDP receive buffer (about 200 KB here) and
# the newest names, at the end of every burst, are never heard: nothing new
# resolves for minutes. `SearchResults.cancel()` does not help: it looks the
# search id up under the search item, so it removes nothing.
#
# `forget_search` removes all of that for one name whose search is unanswered,
# so a name nobody serves costs nothing once its caller has given up.


def forget_search(context: Any, name: str, priority: int = 0) -> bool:
    """Drop `name`'s PV and unanswered search from caproto's client; False if it was found.

    A PV whose search was answered is left alone (it has a circuit, and may be shared).
    """
    with context.pv_cache_lock:
        pv = context.pvs.get((name, priority))
        if pv is not None and pv.circuit_ready.is_set():
            return False
        context.pvs.pop((name, priority), None)
        context.pvs_needing_circuits.pop(name, None)
    results = context.broadcaster.results
    with results._lock:
        item = results._searches_by_name.pop(name, None)
        if item is not None:
            # Only the unanswered ones are scanned: they are few once callers give up.
            cids = [cid for cid, it in results._unanswered_searches.items() if it is item]
            for cid in cids:
                del results._unanswered_searches[cid]
                results._searches.pop(cid, None)
        if not results.name_to_addrs.get(name):
            results.name_to_addrs.pop(name, None)
    return True
