"""The catalog's interface: what the readout and the IOC call, whichever backend is behind.

Its own module, so that a readout process (which forwards these calls to the IOC)
imports neither SQLite nor the CouchDB client.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dtacq_ioc.archive.records import RunRecord


@runtime_checkable
class Catalog(Protocol):
    """Methods may be called from any thread (the run writer calls from its own)."""

    def run_started(self, record: RunRecord) -> None: ...

    def run_updated(self, record: RunRecord) -> None: ...

    def run_finished(self, record: RunRecord) -> None: ...

    def list_runs(self, limit: int = 50, card: str | None = None) -> list[RunRecord]: ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def recover_interrupted(
        self, run_id: str | None = None, why: str = "process ended during the run"
    ) -> list[RunRecord]: ...

    def close(self) -> None: ...
