"""Channel Access readings -> PVWS update fields (the JSON shape browsers expect)."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
from caproto import ChannelType

TEXT_ENCODING = "latin-1"  # caproto's default for strings; CA itself carries bytes
SEVERITIES = ("NONE", "MINOR", "MAJOR", "INVALID")
UNDEFINED = "UNDEFINED"

# Native CA type -> (PVWS vtype stem, little-endian dtype, base64 key for arrays).
_TYPES: dict[ChannelType, tuple[str, str, str]] = {
    ChannelType.DOUBLE: ("VDouble", "<f8", "b64dbl"),
    ChannelType.FLOAT: ("VFloat", "<f4", "b64flt"),
    ChannelType.LONG: ("VInt", "<i4", "b64int"),
    ChannelType.INT: ("VShort", "<i2", "b64srt"),
    ChannelType.CHAR: ("VByte", "u1", "b64byt"),
    ChannelType.ENUM: ("VEnum", "<u2", ""),
    ChannelType.STRING: ("VString", "", ""),
}


def json_number(x: float | int) -> float | int | str:
    """JSON has no NaN or infinity; PVWS sends every non-finite float as "NaN"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN"
    return x


def _num(x: Any) -> float | int | str:
    """A limit as a JSON number; CHAR records report limits as single bytes."""
    if isinstance(x, bytes):
        return int.from_bytes(x[:1] or b"\0", "little")
    return json_number(float(x))


def severity_name(code: int) -> str:
    return SEVERITIES[code] if 0 <= code < len(SEVERITIES) else UNDEFINED


def looks_like_text(raw: bytes) -> bool:
    """A CHAR array holding a long string: printable apart from newlines and tabs."""
    text = raw.split(b"\0", 1)[0].decode(TEXT_ENCODING)
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def decode_text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(TEXT_ENCODING)


class Shape:
    """How one PV's values translate, fixed at connect (native type, count, text or not)."""

    def __init__(self, native: ChannelType, count: int, text: bool, labels: tuple[str, ...]):
        self.native = native
        self.count = count
        self.text = text  # a CHAR array shown as a string
        self.labels = labels
        stem, self.dtype, self.b64key = _TYPES.get(native, ("VDouble", "<f8", "b64dbl"))
        self.is_array = count > 1 and not text and native not in (ChannelType.STRING,)
        if text:
            self.vtype = "VString"
        elif self.is_array:
            self.vtype = stem + "Array"
        else:
            self.vtype = stem

    def python_value(self, data: Any) -> Any:
        """The value as plain Python/numpy: str for text, ndarray for arrays, else a scalar."""
        if self.native == ChannelType.STRING:
            item = data[0] if len(data) else b""
            return item.decode(TEXT_ENCODING) if isinstance(item, bytes) else str(item)
        arr = np.asarray(data)
        if self.text:
            return decode_text(arr.astype("u1", copy=False).tobytes())
        if self.is_array:
            return arr.astype(self.dtype, copy=False)
        if arr.size == 0:
            return None
        item = arr.reshape(-1)[0].item()
        return item

    def value_fields(self, value: Any) -> dict[str, Any]:
        """The fields carrying a value in a PVWS update."""
        if isinstance(value, str):
            return {"text": value}
        if value is None:
            return {"value": "NaN"}
        if isinstance(value, np.ndarray):
            return {self.b64key: base64.b64encode(value.tobytes()).decode("ascii")}
        if self.native == ChannelType.ENUM:
            label = self.labels[value] if 0 <= value < len(self.labels) else str(value)
            return {"value": value, "text": label}
        return {"value": json_number(value)}


def metadata_fields(ctrl: Any, shape: Shape) -> dict[str, Any]:
    """The metadata of a first update, from a DBR_CTRL (or DBR_STS) reading."""
    meta: dict[str, Any] = {"vtype": shape.vtype}
    md = ctrl.metadata
    units = getattr(md, "units", None)
    if units is not None:
        meta["units"] = units.decode("latin-1") if isinstance(units, bytes) else str(units)
    precision = getattr(md, "precision", None)
    if precision is not None:
        meta["precision"] = int(precision)
    lo_disp = getattr(md, "lower_disp_limit", None)
    if lo_disp is not None and not shape.text:
        hi_disp = md.upper_disp_limit
        if lo_disp == hi_disp == 0:  # no display range: fall back to the control range
            lo_disp = getattr(md, "lower_ctrl_limit", 0)
            hi_disp = getattr(md, "upper_ctrl_limit", 0)
        meta["min"] = _num(lo_disp)
        meta["max"] = _num(hi_disp)
        meta["warn_low"] = _num(md.lower_warning_limit)
        meta["warn_high"] = _num(md.upper_warning_limit)
        meta["alarm_low"] = _num(md.lower_alarm_limit)
        meta["alarm_high"] = _num(md.upper_alarm_limit)
    if shape.native == ChannelType.ENUM:
        meta["labels"] = list(shape.labels)
    return meta


def enum_labels(ctrl: Any) -> tuple[str, ...]:
    strings = getattr(ctrl.metadata, "enum_strings", None) or []
    return tuple(s.decode("latin-1") if isinstance(s, bytes) else str(s) for s in strings)


def stamp_fields(timestamp_epics: Any) -> dict[str, int]:
    """seconds/nanos (POSIX epoch) from a DBR_TIME stamp."""
    secs = timestamp_epics.timestamp
    return {"seconds": int(secs), "nanos": int(timestamp_epics.nanoSeconds)}
