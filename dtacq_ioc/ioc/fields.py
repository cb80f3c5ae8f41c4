"""Record fields (`PV.EGU`, `PV.DRVH`, `PV.RTYP`, ...) that agree with the PV's own metadata.

Each PV names its EPICS record type (ai, ao, longin, bo, mbbi, stringin, waveform,
...), and serves the fields clients read from that type. A field's value is taken
from the PV when it is read, so `caget PV.DRVH` and the DBR_CTRL upper control limit
can never disagree. Fields are read-only: the IOC acts on none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from caproto import (
    AccessRights,
    AlarmStatus,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelShort,
    ChannelString,
    ChannelType,
)

Source = Callable[[Any], Any]

SEVERITIES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")  # menuAlarmSevr
FTVL = ("STRING", "CHAR", "UCHAR", "SHORT", "USHORT", "LONG", "ULONG", "INT64", "UINT64",
        "FLOAT", "DOUBLE", "ENUM")  # fmt: skip  # menuFtype
_FTVL_OF = {
    ChannelType.STRING: "STRING", ChannelType.CHAR: "CHAR", ChannelType.INT: "SHORT",
    ChannelType.LONG: "LONG", ChannelType.FLOAT: "FLOAT", ChannelType.DOUBLE: "DOUBLE",
    ChannelType.ENUM: "ENUM",
}  # fmt: skip
STATE_FIELDS = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV",
                "EI", "NI", "TE", "EL", "TV", "TT", "FT", "FF")  # fmt: skip  # mbbi/mbbo


class _FieldMixin:
    """A field's channel: read-only, its value taken from the PV at every read."""

    def __init__(self, *, source: Source, parent: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._source = source
        self._parent = parent

    def check_access(self, hostname: str, username: str) -> AccessRights:
        return AccessRights.READ

    async def read(self, data_type: Any) -> Any:
        value = self._source(self._parent)
        if value != self.value:  # type: ignore[attr-defined]  # mixin: caproto's class is later in the MRO
            await self.write(value, verify_value=False)  # type: ignore[attr-defined]  # mixin: caproto's class is later in the MRO
        return await super().read(data_type)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO


class _StringField(_FieldMixin, ChannelString):  # type: ignore[misc]  # caproto is untyped
    pass


class _DoubleField(_FieldMixin, ChannelDouble):  # type: ignore[misc]  # caproto is untyped
    pass


class _LongField(_FieldMixin, ChannelInteger):  # type: ignore[misc]  # caproto is untyped
    pass


class _ShortField(_FieldMixin, ChannelShort):  # type: ignore[misc]  # caproto is untyped
    pass


class _MenuField(_FieldMixin, ChannelEnum):  # type: ignore[misc]  # caproto is untyped
    pass


def _text(get: Source) -> tuple[type, Source]:
    return _StringField, lambda pv: str(get(pv) or "")[:39]


def _limit(attr: str, cls: type = _DoubleField) -> tuple[type, Source]:
    return cls, lambda pv: getattr(pv, attr, 0) or 0


def _state_name(i: int) -> tuple[type, Source]:
    return _text(lambda pv: pv.enum_strings[i] if i < len(pv.enum_strings) else "")


_COMMON: dict[str, tuple[type, Source]] = {
    "RTYP": _text(lambda pv: pv.rtyp),
    "DESC": _text(lambda pv: pv.__doc__),
    "NAME": _text(lambda pv: pv.pvname),
    "SEVR": (_MenuField, lambda pv: SEVERITIES[int(pv.alarm.severity)]),
    "STAT": _text(lambda pv: AlarmStatus(pv.alarm.status).name),
    "UDF": (_ShortField, lambda pv: int(pv.alarm.status == AlarmStatus.UDF)),
}


# Text arrays (CHAR waveforms) have no units of their own: EGU reads empty, as in EPICS.
_EGU = _text(lambda pv: getattr(pv, "units", "") or "")


def _analog(kind: type) -> dict[str, tuple[type, Source]]:
    return {
        "EGU": _EGU,
        "HOPR": _limit("upper_disp_limit", kind),
        "LOPR": _limit("lower_disp_limit", kind),
        "HIHI": _limit("upper_alarm_limit", kind),
        "HIGH": _limit("upper_warning_limit", kind),
        "LOW": _limit("lower_warning_limit", kind),
        "LOLO": _limit("lower_alarm_limit", kind),
    }


_PREC = {"PREC": (_ShortField, lambda pv: int(getattr(pv, "precision", 0) or 0))}
_DRIVE_DOUBLE = {"DRVH": _limit("upper_ctrl_limit"), "DRVL": _limit("lower_ctrl_limit")}
_DRIVE_LONG = {
    "DRVH": _limit("upper_ctrl_limit", _LongField),
    "DRVL": _limit("lower_ctrl_limit", _LongField),
}
# The linear conversion fields: served (read-only), so a put to them is refused at once.
_CONVERSION = {"EOFF": (_DoubleField, lambda pv: 0.0), "ESLO": (_DoubleField, lambda pv: 1.0)}
_TWO_STATE = {"ZNAM": _state_name(0), "ONAM": _state_name(1)}
_MULTI_STATE = {f"{p}ST": _state_name(i) for i, p in enumerate(STATE_FIELDS)}
_WAVEFORM = {
    "NELM": (_LongField, lambda pv: int(pv.max_length)),
    "NORD": (_LongField, lambda pv: int(pv.length)),
    "FTVL": (_MenuField, lambda pv: _FTVL_OF[pv.data_type]),
    "EGU": _EGU,
    "PREC": _PREC["PREC"],
    "HOPR": _limit("upper_disp_limit"),
    "LOPR": _limit("lower_disp_limit"),
}

FIELDS: dict[str, dict[str, tuple[type, Source]]] = {
    "ai": {**_analog(_DoubleField), **_PREC, **_CONVERSION},
    "ao": {**_analog(_DoubleField), **_PREC, **_DRIVE_DOUBLE, **_CONVERSION},
    "longin": _analog(_LongField),
    "longout": {**_analog(_LongField), **_DRIVE_LONG},
    "bi": _TWO_STATE,
    "bo": _TWO_STATE,
    "mbbi": _MULTI_STATE,
    "mbbo": _MULTI_STATE,
    "stringin": {},
    "stringout": {},
    "waveform": _WAVEFORM,
}


def field_names(rtyp: str) -> tuple[str, ...]:
    """The fields served for a record type, besides VAL."""
    return (*_COMMON, *FIELDS[rtyp])


def _field_channel(pv: Any, field: str) -> Any:
    spec = _COMMON.get(field) or FIELDS[pv.rtyp].get(field)
    if spec is None:
        raise KeyError(field)
    cls, source = spec
    kwargs: dict[str, Any] = {"value": source(pv), "source": source, "parent": pv}
    if cls is _MenuField:
        kwargs["enum_strings"] = FTVL if field == "FTVL" else SEVERITIES
    return cls(**kwargs)


class RecordFields:
    """Mixed into every PV class of the IOC: its record type, whether autosave keeps it,
    and its fields, made when a client first asks for one."""

    rtyp: str
    saved: bool

    def __init__(self, *args: Any, rtyp: str = "", saved: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rtyp = rtyp
        self.saved = saved
        self._record_fields: dict[str, Any] = {}

    def get_field(self, field: str) -> Any:
        if not field or field == "VAL":
            return self
        channel = self._record_fields.get(field)
        if channel is None:
            channel = self._record_fields[field] = _field_channel(self, field)
        return channel
