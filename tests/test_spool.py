"""The spool against a real pouchdb-server that goes away, comes back and says no."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from conftest import COUCH_WRITER, PouchServer

from dtacq_ioc.archive.catalog import CouchCatalog, open_catalog
from dtacq_ioc.archive.couchdb import EXTRAS_KEY, CouchClient, CouchSettings
from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.archive.spool import Spool, SpoolEntry
from dtacq_ioc.config import ArchiveConfig, CouchConfig, Secret


def run_record(directory: Path, run_id: str = "run-a", sizes=(700_000, 300)) -> RunRecord:
    files = []
    for i, size in enumerate(sizes):
        path = directory / f"{run_id}-{i}.dig"
        path.write_bytes(os.urandom(size))
        files.append(RunFile.from_path(path))
    return RunRecord(
        run_id=run_id,
        card="DIG1",
        host="127.0.0.2",
        measurement_name="spooled",
        log="waiting for the database",
        header={"channel_list": [0, 1], "byte_depth": 2, "bit_shift": 0, "freq_hz": 1e4},
        files=files,
        started=1_795_000_000.0,
        stopped=1_795_000_001.0,
        samples=1000,
        bytes_written=sum(sizes),
        state="complete",
        upload=True,
    )


class Outcomes:
    """Collects the spool's reports; tests wait on them rather than sleep."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.delivered: list[SpoolEntry] = []
        self.errors: list[str] = []

    def __call__(self, entry: SpoolEntry, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.delivered.append(entry)
            else:
                self.errors.append(error)
            self.lock.notify_all()

    def wait(self, what, timeout: float = 30.0) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: what(self), timeout), (self.errors, self.delivered)


def assert_delivered(settings: CouchSettings, record: RunRecord, doc_id: str) -> dict:
    with CouchClient(settings) as client:
        doc = client.get_document(doc_id)
        assert doc is not None and doc["type"] == "measurement"
        assert doc[EXTRAS_KEY]["run_id"] == record.run_id
        for f in record.files:
            assert client.file_confirmed(doc, f)
            data = client.request("GET", client.db_path(doc_id, f.name)).content
            assert data == Path(f.path).read_bytes()
        rows = client.view("measurements", "measurements", reduce=False)["rows"]
        assert [r["id"] for r in rows] == [doc_id]  # exactly one document for the run
        return doc


def test_down_then_up_is_delivered_complete(tmp_path):
    server = PouchServer(tmp_path)  # not started: the database is down
    outcomes = Outcomes()
    spool = Spool(
        tmp_path / "spool",
        server.settings(),
        on_result=outcomes,
        initial_backoff_s=0.1,
        max_backoff_s=0.5,
    )
    record = run_record(tmp_path)
    try:
        spool.start()
        entry = spool.add(record)
        outcomes.wait(lambda o: len(o.errors) >= 2)  # retried, still down
        assert "ConnectError" in outcomes.errors[0] and "\n" not in outcomes.errors[0]
        kept = spool.get(record.run_id)
        assert kept.attempts >= 2 and kept.last_error and kept.doc_id == entry.doc_id
        server.start()
        outcomes.wait(lambda o: o.delivered)
        assert spool.wait_idle(10) and spool.pending() == []
        assert_delivered(server.settings(), record, entry.doc_id)
        assert all(Path(f.path).is_file() for f in record.files)  # local files stay
        assert not list((tmp_path / "spool").glob("*.json"))
    finally:
        spool.stop()
        server.stop()


def test_a_new_spool_resumes_after_a_restart(tmp_path):
    server = PouchServer(tmp_path)
    record = run_record(tmp_path)
    first = Spool(tmp_path / "spool", server.settings())
    entry = first.add(record)
    [result] = first.deliver_all()  # the database is down
    assert not result.ok and "ConnectError" in result.error
    del first
    on_disk = json.loads((tmp_path / "spool" / "run-a.json").read_text())
    assert on_disk["doc_id"] == entry.doc_id and on_disk["attempts"] == 1

    try:
        server.start()
        outcomes = Outcomes()
        second = Spool(tmp_path / "spool", server.settings(), on_result=outcomes)
        second.start()
        try:
            outcomes.wait(lambda o: o.delivered)
            assert second.wait_idle(10)
        finally:
            second.stop()
        assert_delivered(server.settings(), record, entry.doc_id)
    finally:
        server.stop()


def test_partial_delivery_is_finished_without_duplicates(pouchdb, tmp_path):
    record = run_record(tmp_path, sizes=(400_000, 200_000))
    spool = Spool(tmp_path / "spool", pouchdb.settings())
    entry = spool.add(record)
    second = Path(record.files[1].path)
    second.rename(tmp_path / "elsewhere")  # the second file is away during the first try
    [result] = spool.deliver_all()
    assert not result.ok and f"file {second} is missing" in result.error
    with CouchClient(pouchdb.settings()) as client:
        doc = client.get_document(entry.doc_id)
        assert client.file_confirmed(doc, record.files[0])
        first_stamp = doc["timestamp"]

    (tmp_path / "elsewhere").rename(second)
    sent: list[str] = []
    [result] = spool.deliver_all(progress=lambda e, f, s, t: sent.append(f.name))
    assert result.ok, result.error
    assert set(sent) == {record.files[1].name}  # the first file was not sent again
    doc = assert_delivered(pouchdb.settings(), record, entry.doc_id)
    assert doc["timestamp"] == first_stamp  # the document was not written twice


def test_refused_by_a_validate_function(pouchdb, tmp_path):
    with pouchdb.admin() as admin:
        closed = (
            "function (newDoc) { if (newDoc.type === 'measurement') {"
            " throw({forbidden: 'measurements are closed for maintenance'}); } }"
        )
        admin.request(
            "PUT", admin.db_path("_design", "closed"), json={"validate_doc_update": closed}
        )
    outcomes = Outcomes()
    spool = Spool(tmp_path / "spool", pouchdb.settings(), on_result=outcomes)
    record = run_record(tmp_path)
    spool.add(record)
    [result] = spool.deliver_all()
    assert not result.ok
    assert "403" in result.error and "closed for maintenance" in result.error
    assert "\n" not in result.error
    kept = spool.get(record.run_id)
    assert kept is not None and kept.last_error == result.error
    assert outcomes.errors == [result.error] and spool.last_error == result.error


def test_refused_for_bad_credentials(pouchdb, tmp_path):
    settings = pouchdb.settings(user=(COUCH_WRITER[0], "not-the-password"))
    spool = Spool(tmp_path / "spool", settings)
    record = run_record(tmp_path)
    spool.add(record)
    [result] = spool.deliver_all()
    assert result.error.startswith(f"login as {COUCH_WRITER[0]}: 401")
    assert spool.get(record.run_id).attempts == 1
    # Fixed credentials deliver the same entry.
    [result] = Spool(tmp_path / "spool", pouchdb.settings()).deliver_all()
    assert result.ok
    assert_delivered(pouchdb.settings(), record, result.doc_id)


@pytest.mark.parametrize("mode", ["native", "file_server"])
def test_couch_catalog_end_to_end(pouchdb, file_server, tmp_path, mode):
    archive = pouchdb.archive(
        tmp_path / "data", file_server=file_server.url if mode == "file_server" else ""
    )
    catalog = open_catalog(archive)
    assert isinstance(catalog, CouchCatalog)
    try:
        record = run_record(tmp_path)
        catalog.run_started(RunRecord(run_id=record.run_id, card="DIG1", upload=True))
        catalog.run_finished(record)
        assert catalog.spool.wait_idle(30)
        stored = catalog.get_run(record.run_id)
        assert stored.doc_id and catalog.upload_state(record.run_id).state == "delivered"
        settings = pouchdb.settings(file_server=archive.couchdb.file_server)
        with CouchClient(settings) as client:
            doc = client.get_document(stored.doc_id)
            assert all(client.file_confirmed(doc, f) for f in record.files)
            assert ("external_docs" in doc) == (mode == "file_server")
    finally:
        catalog.close()


def test_interrupted_run_is_spooled_at_recovery(tmp_path):
    archive = ArchiveConfig(
        backend="couchdb",
        data_dir=tmp_path / "data",
        couchdb=CouchConfig(url=Secret(literal="http://127.0.0.1:9"), db=Secret(literal="m")),
    )
    record = run_record(tmp_path, sizes=(1000,))
    record.state, record.stopped = "running", None
    first = open_catalog(archive, start_delivery=False)
    first.run_started(record)
    first.close()  # as if the process had been killed

    catalog = open_catalog(archive, start_delivery=False)
    try:
        [recovered] = catalog.recover_interrupted()
        [entry] = catalog.spool.pending()
        assert entry.run_id == record.run_id and entry.doc_id == recovered.doc_id
        assert entry.document[EXTRAS_KEY]["state"] == "interrupted"
        assert catalog.upload_state(record.run_id).state == "spooled"
        assert catalog.get_run(record.run_id).doc_id == entry.doc_id
    finally:
        catalog.close()


def wait_until(predicate, what: str, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_document_at_start_and_files_as_they_close(pouchdb, file_server, tmp_path):
    """As the old server did: the document goes in when the run starts (its timestamp is
    the start), each file when it closes; the end adds our fields and keeps the stamp."""
    catalog = open_catalog(pouchdb.archive(tmp_path / "data", file_server.url, retry_max_s=0.4))
    settings = pouchdb.settings(file_server=file_server.url)
    try:
        record = run_record(tmp_path, run_id="run-live", sizes=(2000, 3000))
        files = list(record.files)
        start = RunRecord(run_id=record.run_id, card="DIG1", host=record.host, upload=True,
                          header=dict(record.header), started=record.started)  # fmt: skip
        catalog.run_started(start)
        doc_id = start.doc_id
        with CouchClient(settings) as client:
            doc = wait_until(lambda: client.get_document(doc_id), "the document at the start")
            stamp = doc["timestamp"]
            assert doc["type"] == "measurement" and "external_docs" not in doc
            update = RunRecord(**{**start.to_dict(), "files": files[:1]})
            catalog.run_updated(update)
            wait_until(
                lambda: files[0].name in (client.get_document(doc_id).get("external_docs") or {}),
                "the first file, while the run goes on",
            )
            catalog.run_finished(record)
            assert catalog.spool.wait_idle(30)
            doc = client.get_document(doc_id)
            assert sorted(doc["external_docs"]) == sorted(f.name for f in files)
            assert doc["timestamp"] == stamp, "the start stays the document's time"
            assert doc[EXTRAS_KEY]["state"] == "complete" and doc["filename"] == files[0].name
        assert len(file_server.puts) == 2, file_server.puts  # each file once
    finally:
        catalog.close()


def test_upload_without_files_posts_the_document_alone(pouchdb, tmp_path):
    catalog = open_catalog(pouchdb.archive(tmp_path / "data", retry_max_s=0.4))
    try:
        record = run_record(tmp_path, run_id="run-nosave", sizes=())
        catalog.run_started(RunRecord(run_id=record.run_id, card="DIG1", upload=True))
        catalog.run_finished(record)
        assert catalog.spool.wait_idle(30)
        assert catalog.upload_state(record.run_id).state == "delivered"
        with CouchClient(pouchdb.settings()) as client:
            doc = client.get_document(catalog.get_run(record.run_id).doc_id)
        assert doc["type"] == "measurement" and "filename" not in doc
    finally:
        catalog.close()


def test_three_runs_through_the_file_server_each_delivered_once(pouchdb, file_server, tmp_path):
    catalog = open_catalog(pouchdb.archive(tmp_path / "data", file_server.url, retry_max_s=0.4))
    try:
        records = [run_record(tmp_path, run_id=f"run-{i}", sizes=(4000, 500)) for i in range(3)]
        for record in records:
            catalog.run_started(RunRecord(run_id=record.run_id, card="DIG1", upload=True))
            catalog.run_finished(record)
        assert catalog.spool.wait_idle(30)
        assert len(file_server.puts) == 6, file_server.puts  # no retry loop
        with CouchClient(pouchdb.settings()) as client:
            for record in records:
                doc_id = catalog.get_run(record.run_id).doc_id
                doc = client.get_document(doc_id)
                for f in record.files:
                    entry = doc["external_docs"][f.name]
                    assert entry["ondiskname"] == f.name and entry["size"] == f.size
                    got = httpx.get(file_server.url + client.attachment_link(doc_id, f.name),
                                    auth=COUCH_WRITER)  # fmt: skip
                    assert got.content == Path(f.path).read_bytes()
    finally:
        catalog.close()


def test_a_refused_file_backs_off_raises_the_alarm_and_is_sent_alone(
    pouchdb, file_server, tmp_path
):
    import time

    delays: list[float] = []

    def record_delay(entry: SpoolEntry, error: str | None) -> None:
        if error is not None:
            delays.append(entry.next_try - time.time())

    spool = Spool(
        tmp_path / "spool", pouchdb.settings(file_server=file_server.url),
        on_result=record_delay, initial_backoff_s=0.05, max_backoff_s=0.4,
    )  # fmt: skip
    record = run_record(tmp_path, run_id="run-refused", sizes=(3000, 7000))
    good, bad = record.files
    file_server.refuse[bad.name] = 500
    spool.add(record)
    spool.start()
    try:
        alarm = wait_until(lambda: spool.alarm, "the alarm")
        assert alarm.startswith(f"run {record.run_id}: {bad.name} refused 3 times")
        assert "500" in alarm and "too large for the disk" in alarm
        wait_until(lambda: len(delays) >= 6, "six attempts")
        expected = [min(0.05 * 2**k, 0.4) for k in range(6)]
        assert all(abs(d - e) < 0.05 for d, e in zip(delays, expected, strict=False)), delays
        del file_server.refuse[bad.name]
        assert spool.wait_idle(30)
        assert spool.alarm == ""
    finally:
        spool.stop()
    names = [p.rsplit("/", 1)[-1] for p in file_server.puts]
    assert names.count(good.name) == 1, "a confirmed file is never sent again"
    assert names.count(bad.name) >= 7
    assert_delivered_file_server(pouchdb, file_server, record)


def assert_delivered_file_server(pouchdb, file_server, record: RunRecord) -> None:
    with CouchClient(pouchdb.settings(file_server=file_server.url)) as client:
        doc = client.get_document(record.doc_id)
        assert all(client.file_confirmed(doc, f) for f in record.files)
