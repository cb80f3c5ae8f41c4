"""The run catalog: what the run writer reports to, whatever the backend.

Both backends keep the local SQLite catalog (so ``dtacq-ioc runs`` and recovery work
without a network); the ``couchdb`` backend also spools each run marked for upload and
delivers it to the experiment's database in the background, as the old server did: the
document when the run starts, each file as it closes, our final fields at the end.
"""

from __future__ import annotations

import logging

from dtacq_ioc.archive.couchdb import run_doc_id
from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.archive.spool import Spool, SpoolEntry
from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog
from dtacq_ioc.config import ArchiveConfig

log = logging.getLogger(__name__)


class CouchCatalog(SqliteCatalog):
    """SQLite locally, plus a spool and its delivery worker towards CouchDB."""

    def __init__(self, archive: ArchiveConfig, start_delivery: bool = True):
        super().__init__(archive.data_dir / CATALOG_FILE)
        self.spool = Spool(
            archive.spool,
            archive.couchdb,
            on_result=self._delivery_result,
            max_backoff_s=archive.retry_max_s,
        )
        if start_delivery:
            self.spool.start()

    @property
    def delivery_alarm(self) -> str:
        """One line while the database keeps refusing a file (run, file, its answer)."""
        return self.spool.alarm

    def run_started(self, record: RunRecord) -> None:
        if record.upload:
            record.doc_id = record.doc_id or run_doc_id(record.run_id)
        super().run_started(record)
        if record.upload:
            self.set_upload_state(record.run_id, "spooled", record.doc_id)
            self.spool.begin(record)

    def run_updated(self, record: RunRecord) -> None:
        if record.upload:
            record.doc_id = record.doc_id or run_doc_id(record.run_id)
        super().run_updated(record)
        if record.upload:
            self._prepare_upload(record)
            self.spool.add_files(record)

    def run_finished(self, record: RunRecord) -> None:
        wanted = self._prepare_upload(record)
        super().run_finished(record)
        if wanted:
            self._spool(record)

    def recover_interrupted(
        self, run_id: str | None = None, why: str = "process ended during the run"
    ) -> list[RunRecord]:
        """As SqliteCatalog's, then spool what the interrupted runs had written."""
        recovered = super().recover_interrupted(run_id, why)
        for record in recovered:
            if self._prepare_upload(record):
                super().run_finished(record)
                self._spool(record)
        return recovered

    def close(self) -> None:
        self.spool.stop()
        super().close()

    def _prepare_upload(self, record: RunRecord) -> bool:
        """Whether to upload; if so fix the document id and file digests before saving."""
        if not record.upload:
            return False  # with upload on and save off the document goes alone
        record.doc_id = record.doc_id or run_doc_id(record.run_id)
        record.files = [f if f.sha256 else RunFile.from_path(f.path, f.name) for f in record.files]
        return True

    def _spool(self, record: RunRecord) -> None:
        # Marked before the worker can see the entry, so 'delivered' is never overwritten.
        self.set_upload_state(record.run_id, "spooled", record.doc_id)
        self.spool.add(record)

    def _delivery_result(self, entry: SpoolEntry, error: str | None) -> None:
        if error is None:
            self.set_upload_state(entry.run_id, "delivered", entry.doc_id)
        else:
            self.set_upload_state(entry.run_id, "spooled", entry.doc_id, error)


def open_catalog(archive: ArchiveConfig, start_delivery: bool = True) -> SqliteCatalog:
    """The configured catalog; ``start_delivery=False`` spools without sending (CLI)."""
    if archive.backend == "couchdb":
        return CouchCatalog(archive, start_delivery=start_delivery)
    return SqliteCatalog(archive.data_dir / CATALOG_FILE)
