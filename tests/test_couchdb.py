"""Our CouchDB client against pouchdb-server (a real process): the measurement document as
the old system wrote it, the update handler, the views, attachments, the file server, auth."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import COUCH_DB, COUCH_WRITER

from dtacq_ioc.archive.couchdb import (
    EXTRAS_KEY,
    CouchClient,
    CouchError,
    CouchRefused,
    CouchSettings,
    CouchUnreachable,
    measurement_document,
)
from dtacq_ioc.archive.records import RunFile, RunRecord

RFC1123 = re.compile(r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")

HEADER = {
    "channels": 16,
    "channel_list": [0, 1, 5],
    "byte_depth": 2,
    "bit_shift": 0,
    "is_float": False,
    "ip": "127.0.0.2",
    "downsample": 1,
    "freq_hz": 50000.0,
    "date": "2026-11-25 16:27:39.123456",
    "measurement_name": "ramp",
    "log": "first light",
    "current_gains": {"1": {"1": 0, "2": 3}},
    "gain_conversion": {"0": "x1", "1": "x2", "2": "x4", "3": "x8"},
    "filename": "2026-11-25_16-27-39.123456-0.dig",
    "logitems": {"operator": "kim", "field_uT": 1.5},
    "file_index": 0,
}


def record_with_files(tmp_path: Path, sizes: tuple[int, ...] = (3_000_000,)) -> RunRecord:
    files = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"2026-11-25_16-27-39.123456-{i}.dig"
        path.write_bytes(os.urandom(size))
        files.append(RunFile.from_path(path))
    return RunRecord(
        run_id="20261125T162739-abcd1234",
        card="DIG1",
        host="127.0.0.2",
        measurement_name="ramp",
        log="first light",
        header=dict(HEADER),
        files=files,
        started=1_795_000_000.0,
        stopped=1_795_000_010.0,
        samples=123456,
        bytes_written=sum(sizes),
        state="complete",
        counter_errors=0,
        overruns=1,
        upload=True,
    )


def test_measurement_document_fields(pouchdb, tmp_path):
    record = record_with_files(tmp_path, sizes=(10,))
    before = datetime.now(UTC).replace(microsecond=0)
    with CouchClient(pouchdb.settings()) as client:
        doc_id = client.insert_with_timestamp(measurement_document(record))
        doc = client.get_document(doc_id)
    # Every old field at the top level, as the old server wrote it; logitems flattened.
    for key in (
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
    ):
        assert doc[key] == HEADER[key], key
    assert doc["type"] == "measurement"
    assert doc["operator"] == "kim" and doc["field_uT"] == 1.5
    assert "logitems" not in doc and "file_index" not in doc
    # Set by the update handler, not by us.
    assert doc["created_by"] == COUCH_WRITER[0]
    assert RFC1123.match(doc["timestamp"]), doc["timestamp"]
    stamped = datetime.strptime(doc["timestamp"], "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=UTC)
    assert before <= stamped <= datetime.now(UTC)
    extras = doc[EXTRAS_KEY]
    assert extras["run_id"] == record.run_id and extras["samples"] == 123456
    assert extras["overruns"] == 1 and extras["state"] == "complete"
    assert extras["files"] == {record.files[0].name: {"size": 10, "sha256": record.files[0].sha256}}
    assert extras["header"] == {"file_index": 0}


def test_document_defaults():
    record = RunRecord(run_id="r", host="10.0.0.7", started=1.0, header={"channel_list": [0]})
    doc = measurement_document(record)
    assert doc["measurement_name"] == "Digitizer 10.0.0.7"
    # str(datetime.utcnow()), as the old server wrote it; no files, no filename
    assert doc["ip"] == "10.0.0.7" and doc["date"] == "1970-01-01 00:00:01"
    assert "filename" not in doc


def test_update_handler_contract(pouchdb):
    with CouchClient(pouchdb.settings()) as client:
        new_id = client.insert_with_timestamp({"type": "note", "a": 1, "b": 2})
        assert re.fullmatch(r"[0-9a-f-]{32,36}", new_id)  # the server's uuid
        assert client.insert_with_timestamp({"c": 3}, doc_id=new_id) == new_id
        merged = client.get_document(new_id)
        assert (merged["a"], merged["b"], merged["c"]) == (1, 2, 3)
        client.insert_with_timestamp({"a": 9}, doc_id=new_id, overwrite=True)
        over = client.get_document(new_id)
        assert over["a"] == 9 and "b" not in over and "c" not in over
        # created_by and timestamp are the handler's own, set again after an overwrite.
        assert over["created_by"] == COUCH_WRITER[0] and RFC1123.match(over["timestamp"])
        chosen = client.insert_with_timestamp({"created_by": "someone"}, doc_id="chosen-id")
        assert chosen == "chosen-id"
        assert client.get_document("chosen-id")["created_by"] == "someone"


def test_views_return_the_run(pouchdb, tmp_path):
    record = record_with_files(tmp_path, sizes=(10,))
    with CouchClient(pouchdb.settings()) as client:
        doc_id = client.insert_with_timestamp(measurement_document(record))
        unnamed = {"type": "measurement", "channel_list": [0]}
        client.insert_with_timestamp(unnamed, doc_id="unnamed")
        client.insert_with_timestamp({"type": "other", "measurement_name": "x"})
        stamp = datetime.strptime(
            client.get_document(doc_id)["timestamp"], "%a, %d %b %Y %H:%M:%S GMT"
        )
        date = [stamp.year, stamp.month - 1, stamp.day, stamp.hour, stamp.minute, stamp.second]
        rows = client.view("measurements", "measurements", reduce=False)["rows"]
        by_id = {r["id"]: r for r in rows}
        assert set(by_id) == {doc_id, "unnamed"}
        assert by_id[doc_id]["key"] == ["ramp", *date]
        assert by_id[doc_id]["value"] == "first light"
        assert by_id["unnamed"]["key"][0] == "Unknown"
        assert by_id["unnamed"]["value"] == "No log"
        count = client.view("measurements", "measurements", startkey=["ramp"], endkey=["ramp", {}])
        assert count["rows"][0]["value"] == 1
        label = client.view("measurements", "measurements_label", reduce=False, key=[*date, "ramp"])
        assert [r["id"] for r in label["rows"]] == [doc_id]


@pytest.mark.parametrize("auth", ["cookie", "basic"])
def test_native_attachments_byte_identical(pouchdb, tmp_path, auth):
    record = record_with_files(tmp_path, sizes=(3_000_000, 5))
    seen: list[tuple[int, int]] = []
    with CouchClient(pouchdb.settings(auth=auth)) as client:
        doc_id = client.insert_with_timestamp(measurement_document(record))
        digests = [
            client.upload_file(doc_id, f, lambda s, t: seen.append((s, t))) for f in record.files
        ]
        doc = client.get_document(doc_id)
        for f, digest in zip(record.files, digests, strict=True):
            assert client.file_confirmed(doc, f, digest)
            got = client.request("GET", client.db_path(doc_id, f.name)).content
            assert got == Path(f.path).read_bytes()
        assert not client.file_confirmed(doc, replace(record.files[1], size=6))
        assert not client.file_confirmed(doc, record.files[1], "AAAAAAAAAAAAAAAAAAAAAA==")
    first = [s for s, t in seen if t == 3_000_000]
    assert first == sorted(first) and first[-1] == 3_000_000 and len(first) > 1
    assert seen[-1] == (5, 5)


def test_file_server_mode(pouchdb, file_server, tmp_path):
    record = record_with_files(tmp_path, sizes=(1_500_000,))
    f = record.files[0]
    settings = pouchdb.settings(file_server=file_server.url)
    with CouchClient(settings) as client:
        doc_id = client.insert_with_timestamp(measurement_document(record))
        client.upload_file(doc_id, f)
        doc = client.get_document(doc_id)
        # The name on the document, its key, the name on disk and the link agree.
        entry = doc["external_docs"][f.name]
        assert entry["size"] == f.size and entry["ondiskname"] == f.name
        assert client.file_confirmed(doc, f) and "_attachments" not in doc
        link = client.attachment_link(doc_id, f.name)
        assert link == f"/_attachments/{COUCH_DB}/{doc_id}/{f.name}"
        url = file_server.url + link
        assert client.request("GET", url).content == Path(f.path).read_bytes()
        client.request("DELETE", url)
        assert f.name not in client.get_document(doc_id)["external_docs"]
    # The file server, like the database, wants credentials.
    assert httpx.put(url, content=b"x").status_code == 403


def test_a_name_the_file_server_would_change_is_refused(pouchdb, file_server, tmp_path):
    path = tmp_path / "2026-11-25 16-27-39.123456-0.dig"  # the old naming, with a space
    path.write_bytes(b"data")
    with CouchClient(pouchdb.settings(file_server=file_server.url)) as client:
        doc_id = client.insert_with_timestamp({"type": "measurement"})
        with pytest.raises(CouchError, match="must need no URL encoding"):
            client.upload_file(doc_id, RunFile.from_path(path))
    assert file_server.puts == []


def test_a_file_server_on_another_host_gets_its_own_session(pouchdb, tmp_path, loopback):
    """Cookies belong to a host: the client logs in through the file server's host too."""
    from conftest import COUCH_ADMIN
    from file_server_standin import FileServerStandIn

    other = FileServerStandIn(pouchdb.url, COUCH_ADMIN, tmp_path / "fs", host=loopback).start()
    try:
        record = record_with_files(tmp_path, sizes=(5000,))
        f = record.files[0]
        with CouchClient(pouchdb.settings(file_server=other.url)) as client:
            doc_id = client.insert_with_timestamp(measurement_document(record))
            client.upload_file(doc_id, f)
            assert client.file_confirmed(client.get_document(doc_id), f)
            link = other.url + client.attachment_link(doc_id, f.name)
        assert httpx.get(link, auth=COUCH_WRITER).content == Path(f.path).read_bytes()
    finally:
        other.stop()


def test_db_name_given_url_encoded_works_as_plain(pouchdb):
    """The old environment had DB_NAME=nedm%2Fmeasurements: decoded once, encoded on use."""
    from dtacq_ioc.config import CouchConfig, Secret

    encoded = "%6D" + COUCH_DB[1:]  # "measurements" with its first letter encoded
    couch = CouchConfig(
        url=Secret(literal=pouchdb.url), db=Secret(literal=encoded),
        user=Secret(literal=COUCH_WRITER[0]), password=Secret(literal=COUCH_WRITER[1]),
    )  # fmt: skip
    settings = CouchSettings.from_config(couch)
    assert settings.db == COUCH_DB
    with CouchClient(settings) as client:
        doc_id = client.insert_with_timestamp({"type": "measurement"})
        assert client.get_document(doc_id)["type"] == "measurement"


def test_bad_credentials_are_refused_in_one_line(pouchdb):
    for auth in ("cookie", "basic"):
        bad = pouchdb.settings(auth=auth, user=(COUCH_WRITER[0], "wrong"))
        with CouchClient(bad) as client, pytest.raises(CouchRefused) as info:
            client.insert_with_timestamp({"type": "x"})
        message = str(info.value)
        assert "\n" not in message and "401" in message, message
        assert "incorrect" in message.lower()
    anonymous = pouchdb.settings(user=None)
    with CouchClient(anonymous) as client, pytest.raises(CouchRefused, match="401"):
        client.get_document("anything")


def test_unreachable_is_one_line_without_credentials():
    settings = CouchSettings(url="http://bob:hunter2@127.0.0.1:9", db="x", timeout_s=2.0)
    with CouchClient(settings) as client, pytest.raises(CouchUnreachable) as info:
        client.get_document("doc")
    message = str(info.value)
    assert message.startswith("http://127.0.0.1:9/x/doc: ConnectError"), message
    assert "\n" not in message and "hunter2" not in message


def test_settings_name_the_missing_variable(monkeypatch):
    from dtacq_ioc.config import CouchConfig

    monkeypatch.delenv("DB_URL", raising=False)
    with pytest.raises(CouchError, match=r"archive.couchdb.url is not set .*DB_URL"):
        CouchSettings.from_config(CouchConfig())


def test_db_name_is_url_encoded(tmp_path):
    """A db named like the experiment's reaches the server as ``nedm%2Fmeasurements``
    (pouchdb-server would rename it, so a recording HTTP server checks the raw path)."""
    paths: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_PUT(self) -> None:
            paths.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"ok": true, "id": "d/1", "msg": "inserted"}'
            self.send_response(201)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        settings = CouchSettings(url=url, db="nedm/measurements", timeout_s=5.0)
        with CouchClient(settings) as client:
            assert client.insert_with_timestamp({"a": 1}, doc_id="d/1") == "d/1"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert paths == [
        "/nedm%2Fmeasurements/_design/nedm_default/_update/insert_with_timestamp/d%2F1"
    ]
