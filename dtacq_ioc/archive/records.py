"""What the archive knows about a run: its files and its record, with JSON round trips.

Times are UTC seconds since the epoch (``time.time()``); ``stopped`` is None while a
run is running.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RUN_STATES = ("running", "complete", "fault", "interrupted")

_HASH_CHUNK = 1 << 20


@dataclass
class RunFile:
    """One data file of a run: its name (as uploaded), where it is, its size and digest."""

    name: str
    path: str
    size: int = 0
    sha256: str = ""

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], name: str | None = None) -> RunFile:
        """Describe a file on disk, reading it once for its digest."""
        p = Path(path)
        return cls(name=name or p.name, path=str(p), size=p.stat().st_size, sha256=sha256_of(p))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunFile:
        return cls(
            name=str(data["name"]),
            path=str(data["path"]),
            size=int(data.get("size", 0)),
            sha256=str(data.get("sha256", "")),
        )


@dataclass
class RunRecord:
    """One acquisition run as the catalog stores it (see docs/contracts.md)."""

    run_id: str
    card: str = ""
    host: str = ""
    measurement_name: str = ""
    log: str = ""
    header: dict[str, Any] = field(default_factory=dict)  # the .dig JSON header
    files: list[RunFile] = field(default_factory=list)
    started: float = 0.0
    stopped: float | None = None
    samples: int = 0
    bytes_written: int = 0
    state: str = "running"
    counter_errors: int = 0
    overruns: int = 0
    fault: str = ""
    upload: bool = False  # deliver to CouchDB (the old `should_upload`)
    doc_id: str = ""  # the CouchDB document, once chosen

    def __post_init__(self) -> None:
        if self.state not in RUN_STATES:
            raise ValueError(f"run {self.run_id}: state {self.state!r} not one of {RUN_STATES}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [f.to_dict() for f in self.files]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["files"] = [RunFile.from_dict(f) for f in data.get("files", [])]
        values["header"] = dict(data.get("header") or {})
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        return cls.from_dict(json.loads(text))


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
