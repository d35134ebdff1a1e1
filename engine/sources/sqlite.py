"""Consistent images of live SQLite databases.

The image comes from SQLite's online backup API in one step (``pages=-1``): one read
transaction, so it is the database exactly as of one commit, and in WAL mode it never
blocks club's writer. A stepped backup (``pages=N``, and the CLI's ``.backup``) restarts
on every foreign commit and never finishes under a steady writer (SQLITE_NOTES §1.1).
The backup keeps page numbering, so successive images dedupe page by page.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

BUSY_TIMEOUT_S = 30


@dataclass(frozen=True)
class SqliteImage:
    """A captured image in a temporary file, plus what the snapshot records about it."""

    path: Path
    info: dict[str, Any]


class CaptureError(Exception):
    """The database could not be captured; the message names the reason."""


def capture(database: str, temp_dir: Path) -> SqliteImage:
    """Copy a consistent image of ``database`` into a new temporary file in ``temp_dir``."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix="sqlite-image-", dir=temp_dir)
    os.close(fd)
    image = Path(temp_name)
    try:
        source = sqlite3.connect(f"file:{quote(database)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            target = sqlite3.connect(image)
            try:
                source.backup(target, pages=-1)
                info = _describe(target, image)
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        image.unlink(missing_ok=True)
        raise CaptureError(str(exc)) from exc
    return SqliteImage(image, info)


def _describe(conn: sqlite3.Connection, image: Path) -> dict[str, Any]:
    def pragma(name: str) -> int:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])

    with open(image, "rb") as handle:
        header = handle.read(100)
    return {
        "method": "backup-api",
        "page_size": pragma("page_size"),
        "page_count": pragma("page_count"),
        "freelist_count": pragma("freelist_count"),
        "user_version": pragma("user_version"),
        "journal_mode": "wal" if header[18:20] == b"\x02\x02" else "rollback",
        "sqlite_version": sqlite3.sqlite_version,
    }
