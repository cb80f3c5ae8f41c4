from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from file_server_standin import FileServerStandIn
from support import bindable, free_port, random_loopback, stop_process, wait_for_port

# Channel Access for this pytest process only: its own server port, so IOCs started by
# concurrent test runs never answer each other's searches. Set before any test imports
# a CA library (libca reads these once); child processes inherit them.
os.environ["EPICS_CA_SERVER_PORT"] = str(free_port())
os.environ["EPICS_CA_REPEATER_PORT"] = str(free_port())
os.environ["EPICS_CA_ADDR_LIST"] = "127.0.0.1"
os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
os.environ["EPICS_CAS_INTF_ADDR_LIST"] = "127.0.0.1"
os.environ["EPICS_CAS_BEACON_ADDR_LIST"] = "127.0.0.1"  # to the repeater port, as EPICS base
os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", str(64 * 1024 * 1024))


@pytest.fixture(scope="session", autouse=True)
def ca_repeater() -> Iterator[None]:
    """EPICS base's caRepeater on this session's repeater port, as on any host with CA
    clients: they hear a restarted IOC's beacon and reconnect at once, and caproto's sync
    client finds a repeater running instead of spawning one that outlives the tests."""
    from epics_base import EpicsBase

    port = int(os.environ["EPICS_CA_REPEATER_PORT"])
    proc = subprocess.Popen([str(EpicsBase.locate().tool("caRepeater"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while bindable("0.0.0.0", port, socket.SOCK_DGRAM):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"caRepeater did not bind UDP port {port} (exit {proc.poll()})")
            time.sleep(0.05)
        yield
    finally:
        stop_process(proc)


@pytest.fixture
def loopback() -> str:
    """A loopback address of this test's own, for a simulated card at its real ports."""
    return random_loopback()


# --- CouchDB stand-in: pouchdb-server as a real process, and the experiment's file server ---

POUCHDB_BIN = Path(__file__).resolve().parent / "node" / "node_modules" / ".bin" / "pouchdb-server"
COUCH_ADMIN = ("admin", "admin-pw")
COUCH_WRITER = ("writer", "writer-pw")
COUCH_DB = "measurements"  # pouchdb-server renames dbs holding '/', so tests use a plain name


class PouchServer:
    """pouchdb-server --in-memory on its own port, set up as the experiment's database:

    an admin (no admin party), db ``measurements`` readable and writable only by the role
    ``measurements_writer`` (held by user ``writer``), and our design documents installed.
    ``stop()`` and ``start()`` again keep the port (the data is lost: it is in memory).
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not POUCHDB_BIN.exists():
            pytest.fail(f"{POUCHDB_BIN} missing: run `make test-deps`")
        # It writes config.json and log.txt into its working directory.
        self.proc = subprocess.Popen(
            [str(POUCHDB_BIN), "--in-memory", "-o", "127.0.0.1", "-p", str(self.port)],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port, timeout=30.0, proc=self.proc)
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            http.put(f"/_config/admins/{COUCH_ADMIN[0]}", json=COUCH_ADMIN[1]).raise_for_status()
        with self.admin() as client:
            client.ensure_database()
            client.install_design_documents()
            user, password = COUCH_WRITER
            client.request(
                "PUT",
                f"/_users/org.couchdb.user:{user}",
                json={"name": user, "password": password, "roles": [f"{COUCH_DB}_writer"],
                      "type": "user"},
            )  # fmt: skip
            client.request(
                "PUT",
                client.db_path("_security"),
                json={"admins": {"names": [], "roles": []},
                      "members": {"names": [], "roles": [f"{COUCH_DB}_writer"]}},
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def archive(self, data_dir, file_server: str = "", **extra):
        """An archive config writing to this server as the writer (extra: ArchiveConfig's)."""
        from dtacq_ioc.config import ArchiveConfig, CouchConfig, Secret

        user, password = COUCH_WRITER
        couchdb = CouchConfig(
            url=Secret(literal=self.url), db=Secret(literal=COUCH_DB),
            user=Secret(literal=user), password=Secret(literal=password),
            file_server=file_server,
        )  # fmt: skip
        return ArchiveConfig(backend="couchdb", data_dir=data_dir, couchdb=couchdb, **extra)

    def settings(self, auth: str = "cookie", user=COUCH_WRITER, file_server: str = ""):
        from dtacq_ioc.archive.couchdb import CouchSettings

        name, password = user or ("", "")
        return CouchSettings(
            url=self.url,
            db=COUCH_DB,
            user=name,
            password=password,
            auth=auth,
            file_server=file_server,
            timeout_s=10.0,
        )

    def admin(self, db: str = COUCH_DB):
        from dataclasses import replace

        from dtacq_ioc.archive.couchdb import CouchClient

        return CouchClient(replace(self.settings(auth="basic", user=COUCH_ADMIN), db=db))


@pytest.fixture
def pouchdb(tmp_path_factory) -> Iterator[PouchServer]:
    server = PouchServer(tmp_path_factory.mktemp("pouchdb"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def file_server(pouchdb: PouchServer, tmp_path_factory) -> Iterator[FileServerStandIn]:
    """The experiment's file server beside pouchdb-server (tests/file_server_standin.py)."""
    root = tmp_path_factory.mktemp("file_server")
    server = FileServerStandIn(pouchdb.url, COUCH_ADMIN, root).start()
    try:
        yield server
    finally:
        server.stop()
