"""Building blocks for the IOC's PVs: one factory for every kind of PV we serve.

Every PV gets a description (the record's DESC), units and precision where they
mean something, and joins the card's "link" alarm group unless it reports on
the link itself, so one write marks the whole card COMM/INVALID when it drops.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from caproto import AccessRights, ChannelType
from caproto.server import PVGroup, pvproperty
from caproto.server.server import PvpropertyChar, pvspec_type_map, pvspec_type_map_read_only

from dtacq_ioc.ioc.fanout import Fanout, FanoutArray

LINK = "link"  # alarm group shared by PVs whose value depends on the card link
BIG_ARRAY = 1000  # elements: longer arrays keep a short backlog and go through the Fanout
WAVEFORM_BACKLOG = 3  # past updates kept per client for big arrays (caproto default: 1000)
LONG_STRING = 4096  # bytes of a CHAR-array "long string" PV

Putter = Callable[[PVGroup, Any, Any], Awaitable[Any]]
Refresher = Callable[[], Awaitable[None]]

log = logging.getLogger(__name__)


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


class _AccessChecked:
    """Mixed into every writable PV class: the group's rules can take WRITE away."""

    group: Any

    def check_access(self, hostname: str, username: str) -> AccessRights:
        rights = super().check_access(hostname, username)  # type: ignore[misc]
        rules: AccessRules | None = getattr(self.group, "access_rules", None)
        if rules is not None and not rules.allows_write(hostname, username):
            return rights & ~AccessRights.WRITE
        return rights


class _EmptyTextPut:
    """Accept puts of empty text to CHAR-array PVs.

    caproto 1.3 decodes such a put to "" and then fails converting it back to
    bytes, so clients clearing RUN:LOG or RUN:CHANNELS got no answer.
    """

    async def write_from_dbr(self, data, data_type, metadata, *args, **kwargs):
        if data_type == ChannelType.CHAR and not bytes(data).strip(b"\x00"):
            return await self.write("", flags=kwargs.get("flags", 0))  # type: ignore[attr-defined]
        return await super().write_from_dbr(data, data_type, metadata, *args, **kwargs)  # type: ignore[misc]


class _Watched:
    """Knows whether any client subscribes, so costly values are made only when watched.

    caproto subscribes a PV once per distinct subscription and unsubscribes it when
    the last client of that subscription goes, so a set of them is exact.
    """

    async def subscribe(self, queue, sub_spec, sub):
        self.__dict__.setdefault("_watchers", set()).add(sub_spec)
        return await super().subscribe(queue, sub_spec, sub)  # type: ignore[misc]

    async def unsubscribe(self, queue, sub_spec):
        self.__dict__.setdefault("_watchers", set()).discard(sub_spec)
        return await super().unsubscribe(queue, sub_spec)  # type: ignore[misc]

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

    async def read(self, data_type):
        await self._refresh()
        return await super().read(data_type)  # type: ignore[misc]

    async def subscribe(self, queue, sub_spec, sub):
        await self._refresh()
        return await super().subscribe(queue, sub_spec, sub)  # type: ignore[misc]

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
    mixins = (_Derived,) * derived + (_Watched,) + (FanoutArray,) * big
    name = f"Array{'Derived' * derived}{'Big' * big}{base.__name__}"
    return type(name, (*mixins, base), {})


def _checked(cls: type) -> type:
    mixins = (
        (_AccessChecked, _Watched, _EmptyTextPut)
        if issubclass(cls, PvpropertyChar)
        else (_AccessChecked, _Watched)
    )
    return type(f"Checked{cls.__name__}", (*mixins, cls), {})


class CheckedGroup(PVGroup):
    """A PVGroup whose writable PVs obey `access_rules` (set on the instance)."""

    access_rules: AccessRules | None = None
    fanout: Fanout | None = None  # sends big arrays to plain monitors (set by the IOC)
    type_map = {dtype: _checked(cls) for dtype, cls in pvspec_type_map.items()}
    type_map_read_only = {
        dtype: type(f"Watched{cls.__name__}", (_Watched, cls), {})
        for dtype, cls in pvspec_type_map_read_only.items()
    }


def make_pv(
    name: str,
    value: Any,
    doc: str,
    *,
    dtype: Any = None,
    units: str = "",
    precision: int = 0,
    limits: tuple[float, float] | None = None,
    put: Putter | None = None,
    record: str | None = None,
    alarm_group: str | None = LINK,
    max_length: int | None = None,
    enum_strings: tuple[str, ...] | None = None,
) -> pvproperty:
    """One PV. Writable exactly when `put` is given; limits are enforced on puts.

    A setpoint has an alarm of its own: caproto marks a PV WRITE/MAJOR when a put to
    it is refused, and that must not spread to the card's link group.
    """
    if put is not None:
        alarm_group = None
    kwargs: dict[str, Any] = {}
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
        record=record,
        read_only=put is None,
        alarm_group=alarm_group,
        max_length=max_length,
        **kwargs,
    )
    if put is not None:
        prop.putter(put)
    return prop


def number(
    name: str,
    doc: str,
    *,
    value: float = 0.0,
    units: str = "",
    precision: int = 3,
    limits: tuple[float, float] | None = None,
    put: Putter | None = None,
    alarm_group: str | None = LINK,
) -> pvproperty:
    record = "ao" if put else "ai"
    return make_pv(
        name,
        float(value),
        doc,
        dtype=ChannelType.DOUBLE,
        units=units,
        precision=precision,
        limits=limits,
        put=put,
        record=record,
        alarm_group=alarm_group,
    )


def integer(
    name: str,
    doc: str,
    *,
    value: int = 0,
    units: str = "",
    limits: tuple[int, int] | None = None,
    put: Putter | None = None,
    alarm_group: str | None = LINK,
) -> pvproperty:
    record = "longout" if put else "longin"
    return make_pv(
        name,
        int(value),
        doc,
        dtype=ChannelType.LONG,
        units=units,
        limits=limits,
        put=put,
        record=record,
        alarm_group=alarm_group,
    )


def enum(
    name: str,
    doc: str,
    labels: tuple[str, ...],
    *,
    value: str | None = None,
    put: Putter | None = None,
    alarm_group: str | None = LINK,
) -> pvproperty:
    record = ("bo" if put else "bi") if len(labels) == 2 else ("mbbo" if put else "mbbi")
    return make_pv(
        name,
        value or labels[0],
        doc,
        dtype=ChannelType.ENUM,
        enum_strings=labels,
        put=put,
        record=record,
        alarm_group=alarm_group,
    )


def string(
    name: str,
    doc: str,
    *,
    value: str = "",
    put: Putter | None = None,
    alarm_group: str | None = LINK,
) -> pvproperty:
    """A DBR_STRING PV (at most 40 characters) that caget prints as text."""
    record = "stringout" if put else "stringin"
    return make_pv(
        name,
        value[:39],
        doc,
        dtype=ChannelType.STRING,
        put=put,
        record=record,
        alarm_group=alarm_group,
    )


def long_string(
    name: str,
    doc: str,
    *,
    value: str = "",
    put: Putter | None = None,
    alarm_group: str | None = LINK,
    max_length: int = LONG_STRING,
) -> pvproperty:
    """Text longer than 40 characters: a CHAR array read with `caget -S`.

    Reported as CHAR, not STRING: clients asking for the native type of a
    STRING-reported PV get only its first 40 characters.
    """
    prop = pvproperty(
        name=name,
        value=value,
        dtype=ChannelType.CHAR,
        max_length=max_length,
        doc=doc[:40],
        read_only=put is None,
        alarm_group=alarm_group,
        record="waveform",
        max_subscription_backlog=WAVEFORM_BACKLOG,
    )
    if put is not None:
        prop.putter(put)
    return prop


def waveform(
    name: str,
    doc: str,
    dtype: ChannelType,
    length: int,
    *,
    units: str = "",
    precision: int = 0,
    alarm_group: str | None = LINK,
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
        name,
        np.zeros(length, dtype=np_type),
        doc,
        dtype=_array_class(dtype, derived, length > BIG_ARRAY),
        units=units,
        precision=precision,
        record="waveform",
        max_length=length,
        alarm_group=alarm_group,
    )


def action(name: str, doc: str, put: Putter) -> pvproperty:
    """A bo PV that does something when 1 is written (and reads back 0 after)."""
    return enum(name, doc, ("Idle", "Go"), put=put, alarm_group=None)


def text_value(value: Any) -> str:
    """CHAR-array puts arrive as str or bytes depending on the client."""
    if isinstance(value, bytes | bytearray):
        value = value.decode("latin-1")
    return str(value).rstrip("\x00")
