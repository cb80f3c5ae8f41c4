"""What the catalog is told of one run, in order: started, each file as it closes, finished.

A file-closed report never follows the final record (it would say "running" again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from dtacq_ioc.archive.protocol import Catalog
from dtacq_ioc.archive.records import RunFile, RunRecord

log = logging.getLogger(__name__)


def tell_catalog(report: Callable[[RunRecord], None], record: RunRecord) -> None:
    """report(record), a catalog's method, logging a failure (the catalog spools what it can't
    deliver, so a failure here is a bug to see, not a reason to lose the run)."""
    try:
        report(record)
    except Exception:
        log.exception("run %s: catalog %s failed", record.run_id, report.__name__)


class RunReport:
    """One run's reports to its catalog; `make_record(state)` gives the run as it is now."""

    def __init__(self, catalog: Catalog, make_record: Callable[[str], RunRecord]):
        self.catalog = catalog
        self.make_record = make_record
        self.record: RunRecord | None = None  # the final one, once the run is done
        self._closed: list[RunFile] = []
        self._lock = threading.Lock()

    def started(self) -> None:
        """The run's first record; OSError (in words) when the catalog cannot take it."""
        record = self.make_record("running")
        try:
            self.catalog.run_started(record)
        except Exception as exc:
            log.warning("run %s not started: the catalog failed: %s", record.run_id, exc)
            raise OSError(f"the catalog cannot record a run: {exc}") from None

    def file_closed(self, f: RunFile) -> None:
        """Tell the catalog of each file as it closes (it may deliver it at once)."""
        with self._lock:
            if self.record is not None:
                return  # the final record has all the files
            self._closed.append(f)  # one closing thread: in order
            record = self.make_record("running")
            record.files = list(self._closed)
            tell_catalog(self.catalog.run_updated, record)

    def finished(self, state: str) -> RunRecord:
        with self._lock:
            self.record = self.make_record(state)
            tell_catalog(self.catalog.run_finished, self.record)
            return self.record
