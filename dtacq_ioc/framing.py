"""The nEDM framing of a JSON header: uint32 LE length, then the JSON padded with spaces.

The old system used it for both its `.dig` files and its WebSocket replies, so both
faces of this project write it with this one helper.
"""

from __future__ import annotations

import json
import struct
from typing import Any

LENGTH = struct.Struct("<I")


def pack_header(header: dict[str, Any]) -> bytes:
    """The length word and the JSON header padded with spaces to a multiple of 4."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 4)
    return LENGTH.pack(len(text)) + text


def unpack_header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """The header at the start of ``data`` and the offset of what follows it.

    ValueError (one line) when the data is too short or the header is not a JSON object.
    """
    if len(data) < LENGTH.size:
        raise ValueError("too short for a header length")
    (n,) = LENGTH.unpack_from(data)
    end = LENGTH.size + n
    if len(data) < end:
        raise ValueError(f"header cut short ({len(data) - LENGTH.size} of {n} bytes)")
    try:
        header = json.loads(bytes(data[LENGTH.size : end]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, end
