"""A thin CouchDB client over httpx, speaking what the nEDM database expects.

Documents go through the experiment's update handler
``_design/nedm_default/_update/insert_with_timestamp`` (which sets ``timestamp`` and
``created_by``); run files go either to native attachments or, when a file server is
configured, to ``PUT <file_server>/_attachments/<db>/<docid>/<file>``, which records
``external_docs[<file>]`` on the document. The file server takes the name from the raw
request path, so file names must need no percent-encoding (ours never do). Uploads
stream from disk with a progress callback and are verified against what the server
then reports. Only ``external_docs`` is seen by the experiment's page and pynedm.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from dtacq_ioc.archive.dig import LEGACY_FIELDS, header_date
from dtacq_ioc.archive.records import RunFile, RunRecord
from dtacq_ioc.config import CouchConfig

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes sent so far, total bytes)

UPDATE_HANDLER = ("_design", "nedm_default", "_update", "insert_with_timestamp")
DESIGN_DIR = "couchdb_design"  # beside this module

EXTRAS_KEY = "dtacq_run"  # where our own fields live, clear of the old names
_CHUNK = 256 * 1024


class CouchError(Exception):
    """A request failed; the message is one line naming what and why."""


class CouchUnreachable(CouchError):
    """No answer: the server is down or the network is."""


class CouchRefused(CouchError):
    """The server said no (401/403): credentials, roles or a validate function."""


@dataclass(frozen=True)
class CouchSettings:
    url: str
    db: str
    user: str = ""
    password: str = ""
    auth: str = "cookie"
    file_server: str = ""
    timeout_s: float = 30.0

    @classmethod
    def from_config(cls, couch: CouchConfig) -> CouchSettings:
        """Resolve the secrets now; a missing URL or database is a one-line error."""
        values = {}
        for key in ("url", "db", "user", "password"):
            secret = getattr(couch, key)
            value = secret.get() or ""
            if not value and key in ("url", "db"):
                where = f" (environment variable {secret.env})" if secret.env else ""
                raise CouchError(f"archive.couchdb.{key} is not set{where}")
            values[key] = value
        # The old environment gave DB_NAME URL-encoded (nedm%2Fmeasurements).
        values["db"] = unquote(values["db"])
        return cls(
            **values, auth=couch.auth, file_server=couch.file_server, timeout_s=couch.timeout_s
        )


class CouchClient:
    """Blocking, thread-confined client of one database (use one per thread)."""

    def __init__(self, settings: CouchSettings):
        self.settings = settings
        self.db = settings.db
        self._logged_in = False
        auth = None
        if settings.user and settings.auth == "basic":
            auth = httpx.BasicAuth(settings.user, settings.password)
        # identity: pouchdb-server stalls continuous feeds otherwise, and gzip buys
        # nothing for JSON this small.
        self._http = httpx.Client(
            base_url=settings.url.rstrip("/"),
            auth=auth,
            timeout=settings.timeout_s,
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        )
        # A file server on another host needs a session (cookie) of its own: it checks
        # the caller's CouchDB session through its own proxy.
        self._files = self._http
        self._files_logged_in = True
        if settings.file_server and _origin(settings.file_server) != _origin(settings.url):
            self._files = httpx.Client(
                base_url=settings.file_server.rstrip("/"),
                auth=auth,
                timeout=settings.timeout_s,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            )
            self._files_logged_in = False

    def close(self) -> None:
        self._http.close()
        if self._files is not self._http:
            self._files.close()

    def __enter__(self) -> CouchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- session -----------------------------------------------------------------

    def login(self, http: httpx.Client | None = None) -> None:
        """Start a cookie session (POST /_session); basic auth and admin party need none."""
        if not self._cookies:
            return
        http = http or self._http
        r = self._send(
            "POST",
            "/_session",
            http=http,
            json={"name": self.settings.user, "password": self.settings.password},
        )
        if r.status_code >= 400:
            raise _error(r, f"login as {self.settings.user}")
        if http is self._http:
            self._logged_in = True
        else:
            self._files_logged_in = True

    @property
    def _cookies(self) -> bool:
        return bool(self.settings.user) and self.settings.auth == "cookie"

    # -- documents ---------------------------------------------------------------

    def db_path(self, *parts: str) -> str:
        """``/<db>/<part>/...`` with every segment URL-encoded (``a/b`` -> ``a%2Fb``)."""
        return "/" + "/".join(quote(p, safe="") for p in (self.db, *parts))

    def insert_with_timestamp(
        self, doc: dict[str, Any], doc_id: str | None = None, overwrite: bool = False
    ) -> str:
        """Create or merge a document through the update handler; return its id."""
        parts = (*UPDATE_HANDLER, doc_id) if doc_id else UPDATE_HANDLER
        params = {"overwrite": "true"} if overwrite else None
        r = self.request("PUT" if doc_id else "POST", self.db_path(*parts), json=doc, params=params)
        try:
            answer = r.json()
        except ValueError:
            answer = {}
        if not answer.get("ok") or "id" not in answer:
            raise CouchError(f"update handler answered {r.status_code} {r.text[:200]!r}")
        return str(answer["id"])

    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        r = self.request("GET", self.db_path(doc_id), allow=(404,))
        return None if r.status_code == 404 else r.json()

    def view(self, ddoc: str, name: str, **params: Any) -> dict[str, Any]:
        """Query a view; keys are JSON-encoded and booleans spelled as CouchDB wants."""
        query = {k: _view_param(k, v) for k, v in params.items()}
        path = self.db_path("_design", ddoc, "_view", name)
        answer: dict[str, Any] = self.request("GET", path, params=query).json()
        return answer

    # -- files -------------------------------------------------------------------

    def attachment_link(self, doc_id: str, name: str) -> str:
        """The file server's path of a file, as the experiment's page links it."""
        return f"/_attachments/{quote(self.db, safe='')}/{quote(doc_id, safe='')}/{name}"

    def file_link(self, doc_id: str, name: str) -> str:
        """Where a delivered file is read: the file server's link, else the attachment."""
        if self.settings.file_server:
            return self.attachment_link(doc_id, name)
        return self.db_path(doc_id, name)

    def upload_file(self, doc_id: str, f: RunFile, progress: Progress | None = None) -> str:
        """Stream one file to the document; return its md5 (base64), as CouchDB digests."""
        if self.settings.file_server:
            if quote(f.name, safe="") != f.name or ":" in f.name:
                # The file server stores the raw path segment: it would record another name.
                raise CouchError(f"{f.name}: a file-server name must need no URL encoding")
            url = self.settings.file_server.rstrip("/") + self.attachment_link(doc_id, f.name)
            return self._put_file("PUT", url, f, progress)
        doc = self.get_document(doc_id)
        if doc is None:
            raise CouchError(f"document {doc_id} vanished before its file {f.name} was sent")
        return self._put_file(
            "PUT", self.db_path(doc_id, f.name), f, progress, params={"rev": doc["_rev"]}
        )

    def file_confirmed(self, doc: dict[str, Any], f: RunFile, md5_b64: str = "") -> bool:
        """Whether the document shows ``f`` complete (size, and md5 where the server has one)."""
        if self.settings.file_server:
            entry = (doc.get("external_docs") or {}).get(f.name)
            return isinstance(entry, dict) and entry.get("size") == f.size
        entry = (doc.get("_attachments") or {}).get(f.name)
        if not isinstance(entry, dict) or entry.get("length") != f.size:
            return False
        digest = entry.get("digest", "")
        return not (md5_b64 and digest.startswith("md5-")) or digest == f"md5-{md5_b64}"

    def _put_file(
        self,
        method: str,
        url: str,
        f: RunFile,
        progress: Progress | None,
        params: dict[str, str] | None = None,
    ) -> str:
        md5 = hashlib.md5(usedforsecurity=False)
        size = Path(f.path).stat().st_size
        if size != f.size:
            raise CouchError(f"{f.path}: size on disk {size} differs from the record's {f.size}")

        def chunks() -> Iterator[bytes]:
            sent = 0
            with open(f.path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    md5.update(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, size)
                    yield chunk

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        http = self._files if self.settings.file_server else self._http
        self.request(method, url, content=chunks(), headers=headers, params=params, http=http)
        return base64.b64encode(md5.digest()).decode()

    def update_document(self, doc_id: str, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into a document with a plain PUT (not the update handler, which
        would move ``timestamp`` and so the run in the calendar views); retried on conflict
        with the file server's own writes."""
        for _ in range(5):
            doc = self.get_document(doc_id)
            if doc is None:
                raise CouchError(f"document {doc_id} vanished before its final update")
            if all(doc.get(k) == v for k, v in changes.items()):
                return
            r = self.request("PUT", self.db_path(doc_id), json={**doc, **changes}, allow=(409,))
            if r.status_code != 409:
                return
        raise CouchError(f"document {doc_id}: update kept conflicting with other writers")

    # -- setup (tests and new databases) ---------------------------------------------

    def ensure_database(self) -> None:
        self.request("PUT", self.db_path(), allow=(412,))

    def install_design_documents(self) -> None:
        """Install or replace our ``_design/nedm_default`` and ``_design/measurements``."""
        for ddoc_id, body in design_documents().items():
            path = self.db_path(*ddoc_id.split("/", 1))
            r = self.request("GET", path, allow=(404,))
            if r.status_code == 200:
                body = {**body, "_rev": r.json()["_rev"]}
            self.request("PUT", path, json=body)

    # -- transport ---------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        allow: tuple[int, ...] = (),
        http: httpx.Client | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send, logging in first or again when a cookie session is due; raise on errors."""
        http = http or self._http
        if self._cookies and not self._has_session(http):
            self.login(http)
        r = self._send(method, url, http=http, **kwargs)
        if r.status_code == 401 and self._cookies and not _is_stream(kwargs):
            self.login(http)  # the session expired: log in once more
            r = self._send(method, url, http=http, **kwargs)
        if r.status_code >= 400 and r.status_code not in allow:
            raise _error(r, f"{method} {_path_of(r)}")
        return r

    def _has_session(self, http: httpx.Client) -> bool:
        return self._logged_in if http is self._http else self._files_logged_in

    def _send(
        self, method: str, url: str, http: httpx.Client | None = None, **kwargs: Any
    ) -> httpx.Response:
        http = http or self._http
        try:
            return http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            where = url if url.startswith("http") else f"{str(http.base_url).rstrip('/')}{url}"
            # A URL may carry credentials (user:password@host): never put them in a message.
            where = str(httpx.URL(where).copy_with(userinfo=b""))
            raise CouchUnreachable(f"{where}: {type(exc).__name__}: {exc}") from None


def _origin(url: str) -> str:
    """The host a cookie belongs to (cookies ignore the port)."""
    return (urlsplit(url).hostname or "").lower()


def _view_param(key: str, value: Any) -> str:
    if key in ("key", "keys", "startkey", "endkey", "start_key", "end_key"):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _is_stream(kwargs: dict[str, Any]) -> bool:
    return isinstance(kwargs.get("content"), Iterator)


def _path_of(r: httpx.Response) -> str:
    return r.request.url.raw_path.decode("ascii", "replace").split("?", 1)[0]


def _error(r: httpx.Response, what: str) -> CouchError:
    try:
        body = r.json()
        reason = f"{body.get('error', '')}: {body.get('reason', '')}".strip(": ")
    except (ValueError, AttributeError):
        reason = r.text[:200].replace("\n", " ")
    kind = CouchRefused if r.status_code in (401, 403) else CouchError
    return kind(f"{what}: {r.status_code} {reason}")


def design_documents() -> dict[str, dict[str, Any]]:
    """Our design documents, assembled from ``couchdb_design/<ddoc>.<section>.<name>...js``."""
    docs: dict[str, dict[str, Any]] = {}
    folder = resources.files("dtacq_ioc.archive") / DESIGN_DIR
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".js"):
            continue
        ddoc, section, *rest = entry.name[: -len(".js")].split(".")
        # Leading comments are for readers; some engines evaluate ``return <source>``.
        lines = entry.read_text(encoding="utf-8").splitlines()
        while lines and lines[0].lstrip().startswith("//"):
            lines.pop(0)
        source = "\n".join(lines).strip()
        ddoc_id = f"_design/{ddoc}"
        doc = docs.setdefault(ddoc_id, {"_id": ddoc_id, "language": "javascript"})
        target = doc.setdefault(section, {})
        if len(rest) == 2:  # views: <name>.map / <name>.reduce
            target.setdefault(rest[0], {})[rest[1]] = source
        else:
            target[rest[0]] = source
    return docs


def run_doc_id(run_id: str) -> str:
    """A run's document id, chosen before the first attempt and derived from the run id,
    so any reader of the run (the bridge, a script) finds its document."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"dtacq-ioc:run:{run_id}").hex


def measurement_document(record: RunRecord) -> dict[str, Any]:
    """The document the old server posted at a run's start (its fields, logitems at top
    level), plus our extras under ``dtacq_run``; with the run's files once they exist."""
    header = record.header
    doc: dict[str, Any] = {"type": "measurement"}
    for key in LEGACY_FIELDS:
        if key in header:
            doc[key] = header[key]
    doc["measurement_name"] = (
        record.measurement_name or header.get("measurement_name") or f"Digitizer {record.host}"
    )
    doc["log"] = record.log or header.get("log", "")
    doc.setdefault("ip", record.host)
    doc.setdefault("date", header_date(record.started or time.time()))
    if record.files:
        doc["filename"] = record.files[0].name
    else:
        doc.pop("filename", None)
    for key, value in _logitems(header.get("logitems")).items():
        if key in doc or key.startswith("_") or key in ("type", EXTRAS_KEY):
            log.warning("run %s: logitem %r would replace a field; skipped", record.run_id, key)
            continue
        doc[key] = value
    doc[EXTRAS_KEY] = run_extras(record)
    return doc


def run_extras(record: RunRecord) -> dict[str, Any]:
    """Our fields of a run, kept under ``dtacq_run`` clear of the old names."""
    header = record.header
    skip = (*LEGACY_FIELDS, "logitems", "type")
    return {
        "run_id": record.run_id,
        "card": record.card,
        "state": record.state,
        "samples": record.samples,
        "bytes_written": record.bytes_written,
        "counter_errors": record.counter_errors,
        "overruns": record.overruns,
        "fault": record.fault,
        "started": record.started,
        "stopped": record.stopped,
        "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in record.files},
        "header": {k: v for k, v in header.items() if k not in skip},
    }


def _logitems(items: Any) -> dict[str, Any]:
    """``logitems`` as a mapping: the old page sent an object, accept pairs too."""
    if isinstance(items, dict):
        return items
    if isinstance(items, list):
        return {str(p[0]): p[1] for p in items if isinstance(p, list | tuple) and len(p) == 2}
    return {}
