"""A transient shot as a run of the archive: its .dig file and its catalog record.

A shot arrives whole (the card held it in memory), so it is written here in one go,
not through a stream run's writer thread: the same header as a streamed run (see
`run.run_header`) plus `pre`, `post`, `shot`, `trigger` (the source) and
`trigger_index` (the trigger's sample in the file), and the same RunRecord. A shot
that failed (abort, card lost, short read) is recorded as a fault with its reason
and whatever samples came.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtacq_ioc.archive.dig import DigWriter, Opener, dig_name, file_date, safe_path
from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.card.transient import ShotData
from dtacq_ioc.readout.report import tell_catalog
from dtacq_ioc.readout.run import (
    RunSettings,
    SettingsError,
    StreamInfo,
    file_header,
    new_run_id,
    run_header,
)

log = logging.getLogger(__name__)

BLOCK_SAMPLES = 1 << 16  # rows interleaved per write: bounds the copy a big shot needs


@dataclass(frozen=True)
class ShotInfo:
    """What the shot was: its number, PRE/POST asked and given, the trigger source."""

    shot: int
    pre: int  # samples before the trigger (the card's actual count)
    post: int
    trigger: str  # e.g. "soft", "d0 rising"
    first_counter: int | None = None  # spad counter of the first sample, when known
    counter_errors: int = 0
    started: float = 0.0  # time.time() of the arm (0: now)

    @classmethod
    def from_shot(cls, data: ShotData, trigger: str, started: float = 0.0) -> ShotInfo:
        """From what the driver read (card.transient.ShotData)."""
        return cls(
            shot=data.shot,
            pre=data.pre,
            post=data.post,
            trigger=trigger,
            first_counter=data.first_counter,
            counter_errors=data.counter_errors,
            started=started,
        )


def archive_shot(
    channels: np.ndarray | None,
    received: Sequence[int] | np.ndarray | None,
    info: ShotInfo,
    settings: RunSettings,
    stream: StreamInfo,
    data_dir: Path,
    catalog: Catalog,
    fault: str = "",
    opener: Opener | None = None,
) -> RunRecord:
    """Write a shot's .dig file (the settings' channel_list, sample-major, up to the fewest
    samples any channel got) and record it. `channels`: (AI channels, samples) of raw
    words; `received`: samples per channel (None: all); no data and a `fault`: a failed
    shot without files. Returns the final RunRecord."""
    settings.check()
    if settings.downsample != 1:  # a shot is kept whole, at the card's rate
        raise SettingsError("shots are archived at the card's rate (downsample must be 1)")
    chosen = settings.channels(stream.channel_map.nchan)
    run_id = new_run_id()
    started = info.started or time.time()
    date = file_date(started)
    byte_depth = stream.word_size
    header = _shot_header(settings, stream, chosen, info, started, run_id)
    rows = _rows(channels, received, chosen, info)
    if rows < info.pre + info.post and not fault:
        fault = f"shot {info.shot}: {rows} of {info.pre + info.post} samples came"
    record = RunRecord(
        run_id=run_id,
        card=stream.card,
        host=stream.host,
        measurement_name=header["measurement_name"],
        log=settings.log,
        header={**header, "logitems": dict(settings.logitems)},
        started=started,
        state="running",
        upload=settings.upload,
    )
    tell_catalog(catalog.run_started, record)
    files: list[RunFile] = []
    if settings.save_files and channels is not None and rows > 0:
        try:
            files.append(
                _write(channels, chosen, rows, data_dir, header, date, info.first_counter, opener)
            )
        except OSError as exc:
            fault = fault or f"writing shot {info.shot}: {exc.strerror or exc}"
            log.error("run %s: %s", run_id, fault)
    record.files = files
    record.samples = rows
    record.bytes_written = rows * len(chosen) * byte_depth if files else 0
    record.counter_errors = info.counter_errors
    record.stopped = time.time()
    record.state = "fault" if fault else "complete"
    record.fault = fault
    tell_catalog(catalog.run_finished, record)
    why = f" ({fault})" if fault else ""
    log.info("run %s: shot %d %s, %d samples%s", run_id, info.shot, record.state, rows, why)
    return record


def _shot_header(
    settings: RunSettings,
    stream: StreamInfo,
    chosen: tuple[int, ...],
    info: ShotInfo,
    started: float,
    run_id: str,
) -> dict[str, Any]:
    """A streamed run's header, plus what the shot was and where its trigger is."""
    header = run_header(settings, stream, chosen, stream.word_size, started, run_id)
    header.update(
        pre=info.pre, post=info.post, shot=info.shot, trigger=info.trigger, trigger_index=info.pre
    )
    return header


def _rows(
    channels: np.ndarray | None,
    received: Sequence[int] | np.ndarray | None,
    chosen: tuple[int, ...],
    info: ShotInfo,
) -> int:
    if channels is None or channels.size == 0:
        return 0
    if received is None:
        return int(channels.shape[1])
    got = np.asarray(received, dtype=np.int64)
    return int(min(got[list(chosen)].min(), channels.shape[1]))


def _write(
    channels: np.ndarray,
    chosen: tuple[int, ...],
    rows: int,
    data_dir: Path,
    header: dict[str, Any],
    date: str,
    first_counter: int | None,
    opener: Opener | None,
) -> RunFile:
    directory = safe_path(data_dir, header["card"], header["run_id"])
    directory.mkdir(parents=True, exist_ok=False)
    everything = chosen == tuple(range(channels.shape[0]))
    with DigWriter(
        directory / dig_name(date, 0), file_header(header, date, 0, first_counter), opener
    ) as dig:
        for start in range(0, rows, BLOCK_SAMPLES):
            stop = min(rows, start + BLOCK_SAMPLES)
            block = channels[:, start:stop] if everything else channels[list(chosen), start:stop]
            dig.write(np.ascontiguousarray(block.T))  # sample-major, as the card streams
        return dig.close()
