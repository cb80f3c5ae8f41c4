"""`.dig` run files, byte-compatible with the old nEDM system.

Layout: uint32 little-endian N, then N bytes of JSON header padded with spaces
to a multiple of 4, then samples in sample-major order over the header's
`channel_list`: raw int16/int32 words as the card sent them (readers apply
`bit_shift`), or float64 when `is_float` (downsampled data). A run writes
`<date>-0.dig`, `<date>-1.dig`, ... with date UTC `YYYY-MM-DD_HH-MM-SS.ffffff`: the old
names had a space there, but the experiment's file server and pynedm put names into
URLs unencoded, so a name must need no percent-encoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from dtacq_ioc.archive.records import RunFile
from dtacq_ioc.framing import LENGTH, pack_header, unpack_header

# The header fields the old system wrote (and its readers and database documents use).
LEGACY_FIELDS = (
    "channels",
    "channel_list",
    "byte_depth",
    "bit_shift",
    "is_float",
    "ip",
    "downsample",
    "freq_hz",
    "date",
    "measurement_name",
    "log",
    "current_gains",
    "gain_conversion",
    "filename",
)

log = logging.getLogger(__name__)

DATE_FORMAT = "%Y-%m-%d_%H-%M-%S.%f"  # only characters a URL carries as they are
SUFFIX = ".dig"
_NAME_RE = re.compile(r"^(?P<date>.+)-(?P<index>\d+)\.dig$")

Opener = Callable[[Path], IO[bytes]]


class Digest(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


class DigError(ValueError):
    """A file is not a readable .dig file; the message names it and what was wrong."""


def file_date(when: float | datetime) -> str:
    """The UTC date string used in file names (and nowhere needing colons)."""
    dt = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
    return dt.astimezone(UTC).strftime(DATE_FORMAT)


def header_date(when: float) -> str:
    """The header's and document's ``date``: what the old server's
    ``str(datetime.utcnow())`` gave (``2026-12-01 19:17:25.517860``)."""
    return str(datetime.fromtimestamp(when, UTC).replace(tzinfo=None))


def dig_name(date: str, index: int) -> str:
    return f"{date}-{index}{SUFFIX}"


def safe_path(base: Path, *parts: str) -> Path:
    """base/parts..., refusing any part that could leave base (separators, '..', empty)."""
    for part in parts:
        if (
            not part
            or part in (".", "..")
            or "/" in part
            or "\\" in part
            or "\0" in part
            or part != part.strip()
        ):
            raise ValueError(f"unsafe path component {part!r}")
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{path} is outside {root}")
    return path


encode_header = pack_header  # the length word and the space-padded JSON header


def sample_dtype(header: dict[str, Any]) -> np.dtype:
    depth = int(header["byte_depth"])
    if header.get("is_float"):
        if depth != 8:
            raise ValueError(f"float data needs byte_depth 8, not {depth}")
        return np.dtype("<f8")
    if depth not in (2, 4):
        raise ValueError(f"byte_depth {depth} must be 2, 4 or 8")
    return np.dtype("<i2" if depth == 2 else "<i4")


class DigWriter:
    """Writes one .dig file; size and sha256 are computed as bytes go out (no re-read)."""

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        opener: Opener | None = None,
        digest: Digest | None = None,
    ):
        self.path = Path(path)
        self.header = header
        self.channels = len(header["channel_list"])
        self.dtype = sample_dtype(header)
        self.sample_bytes = self.channels * self.dtype.itemsize
        self.size = 0
        self.samples = 0
        # Any sha256 object; the run writer passes one that hashes on a thread of its own.
        self._hash = digest or hashlib.sha256()
        self._file: IO[bytes] | None = (opener or _open_unbuffered)(self.path)
        self._fd = self._file.fileno() if hasattr(self._file, "fileno") else None
        self._advised = 0
        self._write(encode_header(header))

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None, f"{self.path} is closed"
        view = memoryview(data).cast("B")
        # Unbuffered files may write less than asked: loop until all is out.
        done = 0
        while done < len(view):
            n = self._file.write(view[done:])
            done += len(view) - done if n is None else n
        self._hash.update(view)
        self.size += len(view)
        if self._fd is not None and self.size - self._advised >= WRITEBACK_BYTES:
            self._write_back(self._fd)

    def _write_back(self, fd: int) -> None:
        """Start writing the last stretch to disk now and drop what is already there.

        Without it gigabytes of a run sit dirty in the page cache, and the fsync at
        close (or the kernel's own flush) stalls the writer for seconds at a time.
        """
        start = max(0, self._advised - WRITEBACK_BYTES)
        try:
            os.posix_fadvise(fd, start, self.size - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            self._fd = None  # not a regular file (a pipe, a test double): nothing to advise
        self._advised = self.size

    def write(self, data: np.ndarray | bytes | bytearray | memoryview) -> int:
        """Append whole samples (contiguous bytes in file order); returns bytes written."""
        if isinstance(data, np.ndarray):
            if data.dtype != self.dtype and data.size:
                raise ValueError(f"{self.path.name}: data is {data.dtype}, file is {self.dtype}")
            view = np.ascontiguousarray(data).data
        else:
            view = memoryview(data)
        n = view.nbytes
        if n % self.sample_bytes:
            raise ValueError(f"{self.path.name}: {n} bytes is not whole samples")
        self._write(view)
        self.samples += n // self.sample_bytes
        return n

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def closed(self) -> bool:
        return self._file is None

    def close(self) -> RunFile:
        """Close after fsync: a file the catalog lists as closed is on the disk."""
        if self._file is not None:
            f, self._file = self._file, None
            try:
                if hasattr(f, "fileno"):
                    os.fsync(f.fileno())
            finally:
                f.close()
        return RunFile(name=self.path.name, path=str(self.path), size=self.size, sha256=self.sha256)

    def __enter__(self) -> DigWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WRITEBACK_BYTES = 64 << 20


def _open_unbuffered(path: Path) -> IO[bytes]:
    # Our writes are already large; Python's buffer would only add a copy.
    return open(path, "xb", buffering=0)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a .dig file and the offset of its first sample."""
    with open(path, "rb") as f:
        raw = f.read(LENGTH.size)
        if len(raw) == LENGTH.size:
            raw += f.read(LENGTH.unpack(raw)[0])
    try:
        header, offset = unpack_header(raw)
    except ValueError as exc:
        raise DigError(f"{path}: {exc}") from None
    if "channel_list" not in header:
        raise DigError(f"{path}: header has no channel_list")
    return header, offset


def map_dig(path: str | os.PathLike[str]) -> tuple[dict[str, Any], np.ndarray, int]:
    """Header, samples as a read-only (rows, channels) memory map, and their file offset.

    A file cut short (a crash while writing) reads up to its last whole sample.
    """
    p = Path(path)
    header, offset = read_header(p)
    try:
        dtype = sample_dtype(header)
    except (KeyError, ValueError) as exc:
        raise DigError(f"{p}: {exc}") from None
    nchan = len(header["channel_list"])
    row = dtype.itemsize * nchan
    rows = (p.stat().st_size - offset) // row if row else 0
    data: np.ndarray
    if rows > 0:
        data = np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=(rows, nchan))
    else:
        data = np.empty((0, nchan), dtype=dtype)
    return header, data, offset


def read_dig(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Header and {channel: samples} (memory-mapped, read-only) of one file."""
    header, data, _ = map_dig(path)
    return header, {int(ch): data[:, i] for i, ch in enumerate(header["channel_list"])}


def file_index(path: str | os.PathLike[str]) -> int:
    m = _NAME_RE.match(Path(path).name)
    if not m:
        raise DigError(f"{path}: not named <date>-<n>.dig")
    return int(m.group("index"))


def run_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The .dig files of a run directory, in order."""
    return sorted(Path(directory).glob(f"*{SUFFIX}"), key=file_index)


def read_run(
    paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """A run across its files (or its directory): first header, channels concatenated."""
    if isinstance(paths, str | os.PathLike) and Path(paths).is_dir():
        files = run_files(paths)
    elif isinstance(paths, str | os.PathLike):
        files = [Path(paths)]
    else:
        files = sorted((Path(p) for p in paths), key=file_index)
    if not files:
        raise DigError(f"{paths}: no .dig files")
    first: dict[str, Any] | None = None
    parts: dict[int, list[np.ndarray]] = {}
    for f in files:
        header, data = read_dig(f)
        if first is None:
            first = header
            parts = {ch: [] for ch in data}
        elif (header["channel_list"], header["byte_depth"], header.get("is_float")) != (
            first["channel_list"],
            first["byte_depth"],
            first.get("is_float"),
        ):
            raise DigError(f"{f}: channels or data type differ from {files[0].name}")
        for ch, arr in data.items():
            parts[ch].append(arr)
    assert first is not None
    return first, {ch: np.concatenate(arrs) for ch, arrs in parts.items()}
