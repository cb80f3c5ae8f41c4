"""A stand-in for the experiment's file server (nEDM-TUM/FileServer-Docker), keeping the
parts of its contract a client can get wrong:

- the file name is the *raw* last segment of the request path (not URL-decoded; ``:``
  becomes ``-``), and that is the name it stores and records;
- a PUT records ``external_docs[<name>] = {ondiskname, size, time}`` on the document;
- every request must carry a CouchDB session (cookie) or basic credentials that
  CouchDB accepts: writing needs the database's writer role, reading needs read access;
- ``/_session`` is passed through to CouchDB, as the real server's nginx does, so a
  client on another host can log in there;
- GET serves the stored file (with a ``Range`` header, that part).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import httpx

ADMIN_HEADERS = ("Cookie", "Authorization")


class FileServerStandIn:
    def __init__(self, couch_url: str, admin: tuple[str, str], root: Path, host="127.0.0.1"):
        self.couch_url = couch_url
        self.admin = admin
        self.root = root
        self.puts: list[str] = []  # raw paths of every PUT, to count uploads
        self.refuse: dict[str, int] = {}  # file name -> status to answer its PUTs with
        self.httpd = ThreadingHTTPServer((host, 0), self._handler())
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FileServerStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _couch(self, method: str, path: str, headers: dict[str, str], **kw) -> httpx.Response:
        return httpx.request(method, self.couch_url + path, headers=headers, timeout=10.0, **kw)

    def record(self, db: str, doc_id: str, name: str, entry: dict | None) -> None:
        """Keep ``external_docs`` on the document, as the server does through CouchDB."""
        path = f"/{db}/{doc_id}"
        auth = httpx.BasicAuth(*self.admin)
        for _ in range(10):
            doc = httpx.get(self.couch_url + path, auth=auth, timeout=10.0).json()
            external = doc.setdefault("external_docs", {})
            if entry is None:
                external.pop(name, None)
            else:
                external[name] = entry
            r = httpx.put(self.couch_url + path, json=doc, auth=auth, timeout=10.0)
            if r.status_code != 409:
                r.raise_for_status()
                return
        raise RuntimeError(f"{path}: kept conflicting")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _auth_headers(self) -> dict[str, str]:
                return {k: v for k, v in self.headers.items() if k in ADMIN_HEADERS}

            def _target(self) -> tuple[str, str, str, Path] | None:
                raw = self.path.split("?")[0]
                parts = [p for p in raw.split("/") if p]
                if len(parts) != 4 or parts[0] != "_attachments":
                    self._answer(404, {"error": "not_found", "reason": "malformed request"})
                    return None
                db, doc_id = parts[1], parts[2]
                name = parts[3].replace(":", "-")  # the raw segment: no decoding
                return db, doc_id, name, server.root / unquote(db) / doc_id / name

            def _allowed(self, db: str, doc_id: str, write: bool) -> bool:
                headers = self._auth_headers()
                if not write:
                    r = server._couch("GET", f"/{db}/{doc_id}", headers)
                    return r.status_code == 200
                ctx = server._couch("GET", "/_session", headers).json().get("userCtx", {})
                roles = ctx.get("roles", [])
                return bool(ctx.get("name")) and (
                    "_admin" in roles or f"{unquote(db)}_writer" in roles
                )

            def _session(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {**self._auth_headers(), "Content-Type": "application/json"}
                r = server._couch(self.command, "/_session", headers, content=body)
                self.send_response(r.status_code)
                for key in ("Set-Cookie", "Content-Type"):
                    for value in r.headers.get_list(key):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_POST(self) -> None:
                if self.path.split("?")[0] == "/_session":
                    self._session()
                else:
                    self._answer(405, {"error": "method_not_allowed"})

            def do_PUT(self) -> None:
                target = self._permitted(write=True)
                if target is None:
                    return
                db, doc_id, name, path = target
                server.puts.append(self.path)
                if name in server.refuse:
                    self.rfile.read(int(self.headers["Content-Length"]))
                    reason = "attachment too large for the disk"
                    self._answer(server.refuse[name], {"error": "internal", "reason": reason})
                    return
                path.parent.mkdir(parents=True, exist_ok=True)
                remaining = int(self.headers["Content-Length"])
                with open(path, "wb") as f:
                    while remaining:
                        chunk = self.rfile.read(min(remaining, 1 << 16))
                        if not chunk:
                            break
                        f.write(chunk)
                        remaining -= len(chunk)
                st = path.stat()
                entry = {"ondiskname": name, "size": st.st_size,
                         "time": {"mtime": st.st_mtime, "ctime": st.st_ctime,
                                  "atime": st.st_atime, "crtime": st.st_ctime}}  # fmt: skip
                server.record(db, doc_id, name, entry)
                self._answer(201, {"ok": True, "id": doc_id, "msg": "updated"})

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/_session":
                    self._session()
                    return
                target = self._permitted(write=False)
                if target is None:
                    return
                path = target[3]
                if not path.is_file():
                    self._answer(404, {"error": "not_found", "reason": "no such file"})
                    return
                data = path.read_bytes()
                status, rng = 200, self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    first, _, last = rng[6:].partition("-")
                    end = int(last) + 1 if last else len(data)
                    data, status = data[int(first) : end], 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_DELETE(self) -> None:
                target = self._permitted(write=True)
                if target is None:
                    return
                db, doc_id, name, path = target
                path.unlink(missing_ok=True)
                server.record(db, doc_id, name, None)
                self._answer(200, {"ok": True})

            def _permitted(self, write: bool) -> tuple[str, str, str, Path] | None:
                """The request's (db, doc, attachment, path) when its session may; else
                answered (404 or 403) and None."""
                target = self._target()
                if target is not None and not self._allowed(target[0], target[1], write=write):
                    self._answer(403, {"error": True, "reason": "forbidden"})
                    return None
                return target

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
