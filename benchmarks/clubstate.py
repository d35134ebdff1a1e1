"""What a club data dir holds, in a form two dirs can be compared by (tests, demo, benchmarks)."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile
from pathlib import Path

CLUB_TEMP = re.compile(r"\.tmp\.\d+$")


def blob_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under blobs/, as club would serve them (temp files excluded)."""
    out = {}
    base = root / "blobs"
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            if CLUB_TEMP.search(name):
                continue
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def db_dump(database: Path, live: bool) -> dict[str, str]:
    """A digest per table of every row, plus integrity_check and user_version.

    A live source is read through a backup (like a reader beside club would); a restored
    file is opened immutable so that checking it creates no sidecar.
    """
    if live:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "copy.db"
            source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
            target = sqlite3.connect(copy)
            source.backup(target)
            source.close()
            target.close()
            return _dump(sqlite3.connect(copy))
    return _dump(sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True))


def _dump(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        out = {"integrity_check": conn.execute("PRAGMA integrity_check").fetchone()[0],
               "user_version": str(conn.execute("PRAGMA user_version").fetchone()[0])}
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'package_fts%'")]
        for table in sorted(tables):
            rows = conn.execute(f'SELECT * FROM "{table}" ORDER BY 1, 2').fetchall()
            out[table] = f"{len(rows)}:" + hashlib.sha256(repr(rows).encode()).hexdigest()
        return out
    finally:
        conn.close()


def club_state(root: Path, live: bool) -> dict[str, object]:
    return {"blobs": blob_digests(root), "db": db_dump(root / "db" / "club.db", live)}
