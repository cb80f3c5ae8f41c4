"""Static files: the page, and run files read-only from the archive's data directory."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.web.pages import errorPage, notFound
from twisted.web.resource import Resource
from twisted.web.static import File


class Files(File):
    """Files whose URL segments must be file names: a segment that cannot be one (not
    UTF-8, or holding a NUL) is a clean 400, never an exception and its traceback."""

    def getChild(self, path: bytes, request: Any) -> Any:
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return errorPage(400, "Bad Request", "A path segment is not UTF-8 text.")
        if "\0" in name:
            return errorPage(400, "Bad Request", "A path segment holds a NUL character.")
        return super().getChild(path, request)


class WebFiles(Files):
    """The page; no directory listings."""

    def directoryListing(self) -> Any:
        return self.forbidden


class CardList(Resource):
    """`/cards.json`: the cards the page may pick (name, host, PV prefix)."""

    isLeaf = True

    def __init__(self, cards: list[dict[str, str]]):
        super().__init__()
        self.body = json.dumps(cards).encode()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


class DataFiles(Files):
    """Run files under one directory; nothing resolves (by `..` or symlink) outside it."""

    def __init__(self, path: str, *args: Any, **kwargs: Any):
        super().__init__(path, *args, **kwargs)
        self.root = os.path.realpath(path)

    def getChild(self, path: bytes, request: Any) -> Any:
        child = super().getChild(path, request)
        if isinstance(child, File):
            real = os.path.realpath(child.path)
            if real != self.root and not real.startswith(self.root + os.sep):
                return notFound("No Such Resource", "No such file.")
        return child

    def createSimilarFile(self, path: str) -> DataFiles:
        similar = super().createSimilarFile(path)
        similar.root = self.root
        return similar
