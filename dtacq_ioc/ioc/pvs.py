"""Building blocks for the IOC's PVs: one factory for every kind of PV we serve.

Every PV has a record type (`.RTYP`, and the fields clients read from it: see
`fields.py`), a description, units and precision where they mean something, and an
alarm of its own, unless it joins the card's "link" alarm group: the PVs whose value
comes from the card, so one write marks them all INVALID/COMM when it drops.

A writable PV is bound to a handler, an async callable that gets the value put and
returns the value to hold; it raises `PutRefused` with a line of words to refuse.
Values are checked before the handler sees them: enum states, limits, NaN and
infinities, text that is not a number.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from caproto import AccessRights, AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty
from caproto.server.server import pvspec_type_map, pvspec_type_map_read_only

from dtacq_ioc.caproto_adapter import WriteTracker
from dtacq_ioc.contract import ACTION
from dtacq_ioc.ioc.events import PostedEvents
from dtacq_ioc.ioc.fanout import Fanout, FanoutArray
from dtacq_ioc.ioc.fields import RecordFields

LINK = "link"  # alarm group of PVs whose value comes from the card
BIG_ARRAY = 1000  # elements: longer arrays keep a short backlog and go through the Fanout
WAVEFORM_BACKLOG = 3  # past updates kept per client for big arrays (caproto default: 1000)
LONG_STRING = 4096  # bytes of a CHAR-array "long string" PV
STRING_MAX = 39  # characters of a DBR_STRING value (40 bytes with the terminating NUL)

Handler = Callable[[Any], Awaitable[Any]]
Refresher = Callable[[], Awaitable[None]]
RefusalSink = Callable[[str], Awaitable[None]]  # shows the refusal (LAST_ERROR)
AutosaveSink = Callable[[Any, Any], None]  # (PV, value applied)

log = logging.getLogger(__name__)


class PutRefused(Exception):
    """A put the IOC will not carry out; the message says why in one line of words."""


@dataclass(frozen=True)
class AccessRules:
    """Channel Access write rules from the config; empty lists allow everyone."""

    write_hosts: tuple[str, ...] = ()
    write_users: tuple[str, ...] = ()

    def allows_write(self, hostname: str, username: str) -> bool:
        host_ok = not self.write_hosts or _host_matches(hostname, self.write_hosts)
        user_ok = not self.write_users or username in self.write_users
        return host_ok and user_ok


def _host_matches(hostname: str, allowed: tuple[str, ...]) -> bool:
    # CA clients report their own host name, sometimes fully qualified.
    short = hostname.split(".")[0]
    return any(hostname == a or short == a.split(".")[0] for a in allowed)


class _Checked(WriteTracker):
    """Mixed into every writable PV: access rules, values checked in words, own alarm cleared
    by a good put, and every refusal reported to the group's `refusal_sink`."""

    group: Any
    name: str
    pvname: str
    data_type: ChannelType

    def check_access(self, hostname: str, username: str) -> AccessRights:
        rights = super().check_access(hostname, username)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO
        rules: AccessRules | None = getattr(self.group, "access_rules", None)
        if rules is not None and not rules.allows_write(hostname, username):
            return rights & ~AccessRights.WRITE
        return rights

    async def write_from_dbr(
        self, data: Any, data_type: Any, metadata: Any, *args: Any, **kwargs: Any
    ) -> Any:
        try:
            if data_type == ChannelType.STRING and self.data_type not in _TEXT_TYPES:
                # Text put to a number or enum: read it as EPICS base does ("12.7" -> 12).
                return await self.write(  # type: ignore[attr-defined]  # caproto's ChannelData
                    _parse_text(self, data), flags=kwargs.get("flags", 0)
                )
            if self.data_type == ChannelType.ENUM and len(data):
                # caproto fails converting an index past the states: say so in words first.
                first = data[0]
                whole = isinstance(first, int | np.integer) or float(first).is_integer()
                _check_value(self, int(first) if whole else float(first))
            if data_type == ChannelType.CHAR and not bytes(data).strip(b"\x00"):
                # caproto 1.3 cannot put empty text to a CHAR array; clearing a text is fine.
                return await self.write("", flags=kwargs.get("flags", 0))  # type: ignore[attr-defined]  # mixin: caproto's class is later in the MRO
            result = await super().write_from_dbr(  # type: ignore[misc]  # caproto's ChannelData
                data, data_type, metadata, *args, **kwargs
            )
        except PutRefused as exc:
            await self._refused(str(exc))
            raise
        except Exception as exc:  # caproto's own conversions: refuse in words, not a class name
            message = f"{self.pvname}: the value cannot be taken ({_first_line(exc)})"
            await self._refused(message)
            raise PutRefused(message) from None
        return result

    async def verify_value(self, value: Any) -> Any:
        _check_value(self, value)
        # caproto's verify_value runs the putter: past it, the put is carried out.
        applied = await super().verify_value(value)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO
        await self._clear_write_alarm()
        return applied

    async def _refused(self, message: str) -> None:
        """The written PV alone goes WRITE/MAJOR (as caproto marks a refusal it makes)."""
        alarm = self.alarm  # type: ignore[attr-defined]  # caproto's ChannelAlarm
        await alarm.write(status=AlarmStatus.WRITE, severity=AlarmSeverity.MAJOR_ALARM)
        sink: RefusalSink | None = getattr(self.group, "refusal_sink", None)
        if sink is not None:
            await sink(message)

    async def _clear_write_alarm(self) -> None:
        """A put was taken: an earlier refusal's alarm clears with the new value's update
        (caproto publishes it next), as a record posts value and alarm together."""
        alarm = self.alarm  # type: ignore[attr-defined]  # caproto's ChannelAlarm
        if alarm.status == AlarmStatus.WRITE:
            await alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM,
                              publish=False)  # fmt: skip


_TEXT_TYPES = (ChannelType.STRING, ChannelType.CHAR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "not of the PV's type"


def _parse_text(pv: Any, data: Any) -> Any:
    text = data if isinstance(data, str | bytes) else data[0]  # one string of a DBR_STRING
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    text = str(text).strip().rstrip("\x00")
    if pv.data_type == ChannelType.ENUM:
        if text in pv.enum_strings:
            return text
        if text.isdigit():
            return int(text)
        raise PutRefused(f"{pv.pvname}: {text!r} is not one of {', '.join(pv.enum_strings)}")
    try:
        number = float(text)
    except ValueError:
        raise PutRefused(f"{pv.pvname}: {text[:40]!r} is not a number") from None
    if pv.data_type in (ChannelType.LONG, ChannelType.INT, ChannelType.CHAR):
        if not math.isfinite(number):
            raise PutRefused(f"{pv.pvname}: {text[:40]!r} is not a whole number")
        return int(number)  # truncated, as EPICS base converts "12.7" for a long
    return number


def _check_value(pv: Any, value: Any) -> None:
    """Refuse what would poison the PV or break its limits, naming PV, value and reason."""
    name = pv.pvname
    if pv.data_type == ChannelType.ENUM:
        states = tuple(pv.enum_strings)
        if isinstance(value, str):
            if value not in states:
                raise PutRefused(f"{name}: {value[:40]!r} is not one of {', '.join(states)}")
        elif not (isinstance(value, int | np.integer) and 0 <= int(value) < len(states)):
            shown = int(value) if isinstance(value, int | np.integer) else repr(value)
            raise PutRefused(
                f"{name}: {shown} is not a state index 0..{len(states) - 1} ({', '.join(states)})"
            )
        return
    if pv.data_type not in (ChannelType.DOUBLE, ChannelType.FLOAT, ChannelType.LONG):
        return
    number = float(value)
    if not math.isfinite(number):
        raise PutRefused(f"{name}: {number} is not a finite number")
    lo, hi = pv.lower_ctrl_limit, pv.upper_ctrl_limit
    if lo < hi and not lo <= number <= hi:
        raise PutRefused(f"{name}: {_number(number)} is outside {_number(lo)}..{_number(hi)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class _Watched:
    """Knows whether any client subscribes, so costly values are made only when watched.

    caproto subscribes a PV once per distinct subscription and unsubscribes it when
    the last client of that subscription goes, so a set of them is exact.
    """

    async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
        self.__dict__.setdefault("_watchers", set()).add(sub_spec)
        await super().subscribe(queue, sub_spec, sub)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO

    async def unsubscribe(self, queue: Any, sub_spec: Any) -> None:
        self.__dict__.setdefault("_watchers", set()).discard(sub_spec)
        await super().unsubscribe(queue, sub_spec)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO

    @property
    def watched(self) -> bool:
        return bool(self.__dict__.get("_watchers"))


class _Derived:
    """Mixed into waveforms computed from the latest frame only when wanted (volts, spectra).

    Their owner keeps them current only while watched; `refresher` (set by the owner on
    the instance) brings the value up to date and is awaited before every read and
    before the first update of a new subscription, so a client never sees a stale value.
    """

    refresher: Refresher | None = None
    pvname: str

    async def read(self, data_type: Any) -> Any:
        await self._refresh()
        return await super().read(data_type)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO

    async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
        await self._refresh()
        await super().subscribe(queue, sub_spec, sub)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO

    async def _refresh(self) -> None:
        if self.refresher is None:
            return
        try:
            await self.refresher()
        except Exception:  # the client still gets an answer: the value as it was
            log.exception("%s: refreshing before a read failed", self.pvname)


@cache
def _array_class(dtype: ChannelType, derived: bool, big: bool) -> type:
    """The read-only class of a waveform PV: watched, derived when asked, and sent to
    its monitors by the group's Fanout when big."""
    base = pvspec_type_map_read_only[dtype]
    mixins = ((PostedEvents, RecordFields) + (_Derived,) * derived + (_Watched,)
              + (FanoutArray,) * big)  # fmt: skip
    name = f"Array{'Derived' * derived}{'Big' * big}{base.__name__}"
    return type(name, (*mixins, base), {})


@cache
def _derived_number_class() -> type:
    """The read-only class of a number computed from the latest frame when wanted."""
    base = pvspec_type_map_read_only[ChannelType.DOUBLE]
    return type(f"Derived{base.__name__}",
                (PostedEvents, RecordFields, _Derived, _Watched, base), {})  # fmt: skip


def _writable(cls: type) -> type:
    return type(f"Checked{cls.__name__}", (PostedEvents, RecordFields, _Checked, _Watched, cls), {})


class CheckedGroup(PVGroup):  # type: ignore[misc]  # caproto is untyped
    """A PVGroup whose PVs carry record fields, and whose writable PVs obey `access_rules`
    and report refusals to `refusal_sink` (both set on the instance)."""

    access_rules: AccessRules | None = None
    refusal_sink: RefusalSink | None = None
    autosave_sink: AutosaveSink | None = None
    fanout: Fanout | None = None  # sends big arrays to plain monitors (set by the IOC)
    type_map = {dtype: _writable(cls) for dtype, cls in pvspec_type_map.items()}
    type_map_read_only = {
        dtype: type(f"Watched{cls.__name__}", (PostedEvents, RecordFields, _Watched, cls), {})
        for dtype, cls in pvspec_type_map_read_only.items()
    }


def _putter(handler: Handler, saved: bool) -> Callable[[Any, Any, Any], Awaitable[Any]]:
    """caproto's putter: the handler's applied value is held, and saved when `saved`."""

    async def putter(group: Any, instance: Any, value: Any) -> Any:
        applied = await handler(value)
        applied = value if applied is None else applied
        sink: AutosaveSink | None = getattr(group, "autosave_sink", None)
        if saved and sink is not None:
            sink(instance, applied)
        return applied

    putter.__name__ = getattr(handler, "__name__", "putter")
    return putter


def check_restored(pv: Any, value: Any) -> Any:
    """A saved value as the PV would take it now; PutRefused when it no longer fits."""
    if pv.data_type in _TEXT_TYPES:
        if not isinstance(value, str):
            raise PutRefused(f"{pv.pvname}: saved value {value!r} is not text")
        limit = STRING_MAX if pv.data_type == ChannelType.STRING else pv.max_length - 1
        if len(value.encode("latin-1", errors="replace")) > limit:
            raise PutRefused(f"{pv.pvname}: saved text is longer than {limit} characters")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PutRefused(f"{pv.pvname}: saved value {value!r} is not of the PV's type")
    if isinstance(value, str) and pv.data_type != ChannelType.ENUM:
        value = _parse_text(pv, value)
    if pv.data_type == ChannelType.LONG and isinstance(value, float):
        if not value.is_integer():
            raise PutRefused(f"{pv.pvname}: saved value {value!r} is not a whole number")
        value = int(value)
    _check_value(pv, value)
    return value


def make_pv(
    name: str,
    value: Any,
    doc: str,
    *,
    rtyp: str,
    dtype: Any = None,
    units: str = "",
    precision: int = 0,
    limits: tuple[float, float] | None = None,
    put: Handler | None = None,
    alarm_group: str | None = None,
    max_length: int | None = None,
    enum_strings: tuple[str, ...] | None = None,
    saved: bool = False,
) -> pvproperty:
    """One PV, writable exactly when `put` is given; its own alarm unless `alarm_group`.

    `saved`: autosave keeps the value and the IOC puts it back at start.
    """
    kwargs: dict[str, Any] = {"rtyp": rtyp, "saved": saved}
    if units:
        kwargs["units"] = units
    if precision:
        kwargs["precision"] = precision
    if limits is not None:
        kwargs["lower_ctrl_limit"], kwargs["upper_ctrl_limit"] = limits
        kwargs["lower_disp_limit"], kwargs["upper_disp_limit"] = limits
    if enum_strings is not None:
        kwargs["enum_strings"] = list(enum_strings)
    if max_length is not None and max_length > BIG_ARRAY:
        kwargs["max_subscription_backlog"] = WAVEFORM_BACKLOG
    prop = pvproperty(
        name=name,
        value=value,
        dtype=dtype,
        doc=doc[:40],
        read_only=put is None,
        alarm_group=alarm_group or name,  # a group of one: an alarm of its own
        max_length=max_length,
        **kwargs,
    )
    if put is not None:
        prop.putter(_putter(put, saved))
    return prop


def number(
    name: str,
    doc: str,
    *,
    value: float = 0.0,
    units: str = "",
    precision: int = 3,
    limits: tuple[float, float] | None = None,
    put: Handler | None = None,
    alarm_group: str | None = None,
    saved: bool = False,
    derived: bool = False,
) -> pvproperty:
    """A double; `derived` (read-only only): computed from the latest frame only while
    watched or when read, as `waveform`'s."""
    dtype = _derived_number_class() if derived and put is None else ChannelType.DOUBLE
    return make_pv(
        name, float(value), doc, rtyp="ao" if put else "ai", dtype=dtype,
        units=units, precision=precision, limits=limits, put=put, alarm_group=alarm_group,
        saved=saved,
    )  # fmt: skip


def integer(
    name: str,
    doc: str,
    *,
    value: int = 0,
    units: str = "",
    limits: tuple[int, int] | None = None,
    put: Handler | None = None,
    alarm_group: str | None = None,
    saved: bool = False,
) -> pvproperty:
    return make_pv(
        name, int(value), doc, rtyp="longout" if put else "longin", dtype=ChannelType.LONG,
        units=units, limits=limits, put=put, alarm_group=alarm_group, saved=saved,
    )  # fmt: skip


def enum(
    name: str,
    doc: str,
    labels: tuple[str, ...],
    *,
    value: str | None = None,
    put: Handler | None = None,
    alarm_group: str | None = None,
    saved: bool = False,
) -> pvproperty:
    two = len(labels) == 2
    rtyp = ("bo" if put else "bi") if two else ("mbbo" if put else "mbbi")
    return make_pv(
        name, value or labels[0], doc, rtyp=rtyp, dtype=ChannelType.ENUM,
        enum_strings=labels, put=put, alarm_group=alarm_group, saved=saved,
    )  # fmt: skip


def string(
    name: str,
    doc: str,
    *,
    value: str = "",
    put: Handler | None = None,
    alarm_group: str | None = None,
    saved: bool = False,
) -> pvproperty:
    """A DBR_STRING PV (at most 40 characters) that caget prints as text."""
    return make_pv(
        name, value[:STRING_MAX], doc, rtyp="stringout" if put else "stringin",
        dtype=ChannelType.STRING, put=put, alarm_group=alarm_group, saved=saved,
    )  # fmt: skip


def long_string(
    name: str,
    doc: str,
    *,
    value: str = "",
    put: Handler | None = None,
    alarm_group: str | None = None,
    max_length: int = LONG_STRING,
    saved: bool = False,
) -> pvproperty:
    """Text longer than 40 characters: a CHAR array read with `caget -S`.

    Reported as CHAR, not STRING: clients asking for the native type of a
    STRING-reported PV get only its first 40 characters.
    """
    return make_pv(
        name, value, doc, rtyp="waveform", dtype=ChannelType.CHAR, put=put,
        alarm_group=alarm_group, max_length=max_length, saved=saved,
    )  # fmt: skip


def waveform(
    name: str,
    doc: str,
    dtype: ChannelType,
    length: int,
    *,
    units: str = "",
    precision: int = 0,
    alarm_group: str | None = None,
    derived: bool = False,
) -> pvproperty:
    """A read-only array PV whose maximum length is fixed from the config.

    `derived`: computed from the latest frame only while watched or when read.
    """
    np_type = {
        ChannelType.INT: np.int16,
        ChannelType.LONG: np.int32,
        ChannelType.FLOAT: np.float32,
        ChannelType.DOUBLE: np.float64,
    }[dtype]
    return make_pv(
        name, np.zeros(length, dtype=np_type), doc, rtyp="waveform",
        dtype=_array_class(dtype, derived, length > BIG_ARRAY), units=units,
        precision=precision, max_length=length, alarm_group=alarm_group,
    )  # fmt: skip


def action(name: str, doc: str, put: Handler) -> pvproperty:
    """A bo PV that does something when 1 ("Go") is written, and reads back 0 after."""
    return enum(name, doc, ACTION, put=put)


def text_value(value: Any) -> str:
    """CHAR-array puts arrive as str or bytes depending on the client."""
    if isinstance(value, bytes | bytearray):
        value = value.decode("latin-1")
    return str(value).rstrip("\x00")
