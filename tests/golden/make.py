"""Writes tests/golden/: a small version-1 repository and what restoring it must give.

Run once per format version (`python -m tests.golden.make`); the committed result must
restore forever (tests/test_golden.py).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.clubstate import club_state
from engine import Repository, create_snapshot, open_backend
from engine.snapshot import SnapshotOptions

HERE = Path(__file__).resolve().parent


def _data_dir(root: Path) -> None:
    (root / "db").mkdir(parents=True)
    conn = sqlite3.connect(root / "db" / "club.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE packages(name TEXT PRIMARY KEY, latest_version TEXT)")
    conn.executemany("INSERT INTO packages VALUES (?, ?)", [(f"pkg_{i}", f"1.{i}.0") for i in range(300)])
    conn.execute("PRAGMA user_version=3")
    conn.commit()
    conn.close()
    for i in range(3):
        artifacts = root / "blobs" / f"pkg_{i}" / f"1.{i}.0" / "artifacts"
        artifacts.mkdir(parents=True)
        (artifacts / "package.tar.gz").write_bytes(bytes(range(256)) * (40 + i))
    doc = root / "blobs" / "pkg_0" / "dartdoc" / "latest"
    doc.mkdir(parents=True)
    (doc / "blob").write_bytes(b"".join(f"<p>member {n}</p>\n".encode() for n in range(60_000)))
    (doc / "index.json").write_text('{"version":1}')


def main() -> None:
    shutil.rmtree(HERE / "repo", ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _data_dir(data)
        when = datetime(2026, 4, 9, 12, 0, tzinfo=timezone.utc)
        repo = Repository.init(open_backend(str(HERE / "repo")), Path(tmp) / "cache", lambda: when)
        info = create_snapshot(repo, SnapshotOptions(source=data, host="golden", now=lambda: when)).info
        repo.close()
        expected = {"snapshot": info.id.hex(), "time": info.time.isoformat(), "state": club_state(data, live=True)}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
