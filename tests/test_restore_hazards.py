"""Restore edge cases that silently lose data in naive tools: stale SQLite sidecars,
leftovers of a killed restore, files that became directories, earlier safety copies."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine import Repository, apply_restore, check, create_snapshot, plan_restore
from engine.backends.fs import FsBackend
from engine.errors import BackendError, UsageError
from engine.snapshot import SnapshotOptions

from .conftest import Clock, reopen


def _data(root: Path, rows: int = 200) -> Path:
    (root / "db").mkdir(parents=True)
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts").mkdir(parents=True)
    conn = sqlite3.connect(root / "db" / "club.db")
    conn.execute("CREATE TABLE t(x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(f"snap{i}",) for i in range(rows)])
    conn.commit()
    conn.close()
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts" / "package.tar.gz").write_bytes(b"t" * 5000)
    return root


def _snap(repo: Repository, data: Path, clock: Clock, tmp_path: Path):  # type: ignore[no-untyped-def]
    clock.advance(minutes=1)
    return create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock)).info


def _rows(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY rowid")]
    finally:
        conn.close()


def _hot_journal(db: Path) -> None:
    """Leave a hot rollback journal, as a writer killed mid-transaction does."""
    code = (f"import sqlite3, os; c = sqlite3.connect({str(db)!r}); c.execute('PRAGMA cache_size=2');"
            "c.execute('BEGIN'); c.execute(\"UPDATE t SET x = 'newer' || x\"); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (db.parent / (db.name + "-journal")).stat().st_size > 0


def test_hot_journal_beside_target_cannot_undo_the_restore(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    snap = _snap(repo, _data(tmp_path / "data"), clock, tmp_path)
    target = _data(tmp_path / "target", rows=300)
    _hot_journal(target / "db" / "club.db")
    result = apply_restore(repo, plan_restore(repo, snap, target))
    assert not (target / "db" / "club.db-journal").exists()
    assert _rows(target / "db" / "club.db") == [f"snap{i}" for i in range(200)]
    assert any(p.endswith("-journal") for p in result.moved_aside)
    kept = Path(next(p for p in result.moved_aside if not p.endswith("-journal")))
    assert len(_rows(kept)) == 300  # the old database with its journal is still a usable pair


def test_delete_never_removes_earlier_safety_copies(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    snap = _snap(repo, _data(tmp_path / "data"), clock, tmp_path)
    target = _data(tmp_path / "target", rows=300)
    _hot_journal(target / "db" / "club.db")
    first = apply_restore(repo, plan_restore(repo, snap, target, delete=True))
    plan = plan_restore(repo, snap, target, delete=True)
    assert not [p for p in plan.deletions if b"pre-restore" in p]
    apply_restore(repo, plan)
    assert all(Path(p).exists() for p in first.moved_aside)


def test_stale_temporaries_of_a_killed_restore_are_removed_and_never_snapshotted(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    stale = data / "blobs" / "pkg" / "1.0.0" / "artifacts" / ".package.tar.gz.clubsnap-restore-0a1b2c3d"
    stale.write_bytes(b"half written")
    snap = _snap(repo, data, clock, tmp_path)
    names = [p for p in plan_restore(repo, snap, tmp_path / "fresh").files]
    assert not any(b"clubsnap-restore" in f.rel for f in names)
    apply_restore(repo, plan_restore(repo, snap, data))
    assert not stale.exists()


def test_file_and_directory_swaps_need_delete(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    snap = _snap(repo, _data(tmp_path / "data"), clock, tmp_path)
    target = _data(tmp_path / "target")
    artifacts = target / "blobs" / "pkg" / "1.0.0" / "artifacts"
    (artifacts / "package.tar.gz").unlink()
    (artifacts / "package.tar.gz").mkdir()
    (target / "blobs" / "pkg" / "1.0.0" / "artifacts").rename(target / "blobs" / "pkg" / "moved")
    (target / "blobs" / "pkg" / "1.0.0").rmdir()
    (target / "blobs" / "pkg" / "1.0.0").write_bytes(b"a file where a directory belongs")
    with pytest.raises(UsageError, match="--delete"):
        plan_restore(repo, snap, target)
    apply_restore(repo, plan_restore(repo, snap, target, delete=True))
    assert (artifacts / "package.tar.gz").read_bytes() == b"t" * 5000


def test_reused_bytes_match_between_plan_and_result(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data", rows=5000)
    snap = _snap(repo, data, clock, tmp_path)
    assert plan_restore(repo, snap, data).to_write == []  # the capture is byte-identical
    conn = sqlite3.connect(data / "db" / "club.db")
    conn.execute("UPDATE t SET x = 'changed' WHERE rowid = 2500")
    conn.commit()
    conn.close()
    plan = plan_restore(repo, snap, data)
    # One page changed (plus the header page): only those are fetched, the rest is reused.
    assert [f.rel for f in plan.to_write] == [b"db/club.db"]
    assert 1 <= sum(len(blobs) for blobs in plan.fetch.values()) <= 3
    assert plan.bytes_reused > 5000 + (data / "db" / "club.db").stat().st_size - 3 * 4096
    assert apply_restore(repo, plan).bytes_reused == plan.bytes_reused
    assert _rows(data / "db" / "club.db")[2499] == "snap2499"


def test_retry_after_a_failed_upload_with_the_same_repository(tmp_path: Path, clock: Clock, cache_dir: Path) -> None:
    class FailingOnce(FsBackend):
        failures = 1

        def put(self, key: str, data: bytes | bytearray, *, exclusive: bool = False) -> None:
            if key.startswith("data/") and self.failures:
                self.failures -= 1
                raise BackendError("injected outage")
            super().put(key, data, exclusive=exclusive)

    Repository.init(FsBackend(tmp_path / "repo"), cache_dir, clock).close()
    repo = Repository.open(FailingOnce(tmp_path / "repo"), cache_dir)
    data = _data(tmp_path / "data")
    with pytest.raises(BackendError):
        _snap(repo, data, clock, tmp_path)
    _snap(repo, data, clock, tmp_path)
    fresh = reopen(repo, tmp_path / "other-cache")
    report = check(fresh, read_data=True)
    assert report.ok, report.errors


def test_symlinked_tier_is_followed(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    (data / "blobs").rename(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", data / "blobs")
    snap = _snap(repo, data, clock, tmp_path)
    assert snap.record["tiers"]["blobs"]["files"] == 1
    apply_restore(repo, plan_restore(repo, snap, tmp_path / "t"))
    restored = tmp_path / "t" / "blobs"
    assert restored.is_dir() and not restored.is_symlink()  # a real directory, not the link
    source = tmp_path / "elsewhere"
    assert {str(p.relative_to(restored)): p.read_bytes() for p in restored.rglob("*") if p.is_file()} == {
        str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert (restored / "pkg" / "1.0.0" / "artifacts" / "package.tar.gz").stat().st_size > 0


def test_check_rereads_records_even_with_a_warm_catalog(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    _snap(repo, _data(tmp_path / "data"), clock, tmp_path)
    assert check(repo).ok
    store = Path(repo.backend.location)
    for folder in ("index", "snapshots"):
        victim = next((store / folder).iterdir())
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 1
        victim.write_bytes(bytes(raw))
    errors = check(repo).errors
    assert any("index/" in e for e in errors) and any("snapshots/" in e for e in errors)
