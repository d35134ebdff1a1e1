"""Snapshot -> one day of activity -> snapshot -> restore each "as of" its time, on a
generated club data dir with a real club.db (WAL left behind by a writer)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest

from benchmarks.clubgen import generate, one_day
from engine import Repository, apply_restore, create_snapshot, plan_restore
from engine.chunker import chunk_stream
from engine.pagemap import file_chunks
from engine.format import DATA_PREFIX, PackId
from engine.packs import read_trailer
from engine.snapshot import SnapshotOptions
from engine.tree import walk

from benchmarks.clubstate import blob_digests, club_state
from .conftest import Clock, reopen


def _options(data: Path, clock: Clock, tmp_path: Path, **extra: object) -> SnapshotOptions:
    return SnapshotOptions(source=data, host="test-host", now=clock, **extra)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    generate(root, "tiny", seed=11)
    time.sleep(0.1)  # past the files cache's racy-timestamp window
    return root


def _restore(repo: Repository, snap, target: Path, **kwargs):  # type: ignore[no-untyped-def]
    plan = plan_restore(repo, snap, target, **kwargs)
    return plan, apply_restore(repo, plan)


def test_restore_each_snapshot_as_of_its_time(repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    first_state = club_state(data, live=True)
    first = create_snapshot(repo, _options(data, clock, tmp_path)).info
    clock.advance(days=1)
    one_day(data, seed=11, day=1)
    assert (data / "db" / "club.db-wal").stat().st_size > 0
    second_state = club_state(data, live=True)
    assert second_state != first_state
    second = create_snapshot(repo, _options(data, clock, tmp_path)).info

    assert repo.snapshot_at(first.time + timedelta(hours=3)).id == first.id
    assert repo.snapshot_at(second.time + timedelta(seconds=1)).id == second.id
    for snap, expected in ((first, first_state), (second, second_state)):
        target = tmp_path / f"restore-{snap.id.short()}"
        _restore(repo, repo.snapshot_at(snap.time), target)
        assert club_state(target, live=False) == expected
        assert not (target / "tmp").exists() and not (target / "cache").exists()
        assert not list(target.rglob("*.tmp.*"))


def test_unchanged_second_snapshot_reads_no_files_and_adds_almost_nothing(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    create_snapshot(repo, _options(data, clock, tmp_path))
    size_before = sum(size for _, size in repo.backend.list(""))
    clock.advance(minutes=5)
    result = create_snapshot(repo, _options(data, clock, tmp_path))
    size_after = sum(size for _, size in repo.backend.list(""))
    # Not even the database is read: its file and WAL are as the first snapshot found them.
    assert result.stats["bytes_read"] == 0
    assert [d["bytes_read"] for d in result.info.record["databases"]] == [0]
    assert result.stats["files_unmodified"] == result.stats["files"]
    # At most a new tree for db/, whose mtime moves when SQLite creates and removes a WAL
    # for our reader; no file data.
    assert result.stats["raw_bytes_added"] < 1024
    assert size_after - size_before < 4096


def test_tarball_in_two_snapshots_is_stored_once(repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    create_snapshot(repo, _options(data, clock, tmp_path))
    clock.advance(days=1)
    one_day(data, seed=11, day=1)
    create_snapshot(repo, _options(data, clock, tmp_path))
    tarball = sorted(data.glob("blobs/*/*/artifacts/package.tar.gz"))[0]
    with open(tarball, "rb") as handle:
        wanted = {repo.chunk_id(c) for c in chunk_stream(handle, "cdc", repo.config.chunker)}
    stored = [entry.id for key, size in repo.backend.list(DATA_PREFIX)
              for entry in read_trailer(repo.backend, PackId.from_hex(key.rsplit("/", 1)[-1]), size)]
    assert all(stored.count(c) == 1 for c in wanted)
    snaps = repo.snapshots()
    rel = str(tarball.relative_to(data)).encode()
    in_both = [[e["chunks"] for p, e in walk(repo, s.tree) if p == rel] for s in snaps]
    assert in_both[0] == in_both[1] and in_both[0]


def test_rollback_over_newer_target_fetches_only_differing_chunks(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    first = create_snapshot(repo, _options(data, clock, tmp_path)).info
    clock.advance(days=1)
    one_day(data, seed=11, day=1)
    second = create_snapshot(repo, _options(data, clock, tmp_path)).info

    full_target = tmp_path / "fresh"
    _, fresh = _restore(repo, first, full_target)
    target = tmp_path / "rollback"
    _restore(repo, second, target)
    # What the target holds, by a route other than restore's own chunker: the target is the
    # second snapshot restored, so its chunks are the ones that snapshot recorded.
    assert {str(p.relative_to(target)).encode() for p in target.rglob("*") if p.is_file()} == {
        p for p, e in walk(repo, second.tree) if e["type"] == "file"}
    local = {c for p, e in walk(repo, second.tree) if e["type"] == "file" for c in file_chunks(repo, e)}
    needed = {c for p, e in walk(repo, first.tree) if e["type"] == "file" for c in file_chunks(repo, e)} - local

    plan, result = _restore(repo, first, target, delete=True)
    fetched_ids = {b.id for blobs in plan.fetch.values() for b in blobs}
    assert fetched_ids == needed
    assert result.bytes_fetched == plan.bytes_to_fetch
    assert result.bytes_fetched < fresh.bytes_fetched * 0.75  # tiny db: a day rewrites ~1/3 of it
    assert result.bytes_reused > 0
    assert club_state(target, live=False) == club_state(full_target, live=False)
    assert blob_digests(target) == blob_digests(full_target)  # --delete removed day-2 files


def test_a_target_file_differing_only_in_its_last_chunk_is_rewritten(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    big = data / "blobs" / "bigpkg" / "1.0.0.tar.gz"
    big.parent.mkdir()
    big.write_bytes(os.urandom(6 << 20) + os.urandom(300_000))
    time.sleep(0.1)  # past the files cache's racy-timestamp window (not synchronisation)
    snap = create_snapshot(repo, _options(data, clock, tmp_path)).info
    entry = next(e for p, e in walk(repo, snap.tree) if p == b"blobs/bigpkg/1.0.0.tar.gz")
    assert len(entry["chunks"]) >= 4, "the file must be cut into several chunks"
    target = tmp_path / "target"
    _restore(repo, snap, target)
    restored = target / "blobs" / "bigpkg" / "1.0.0.tar.gz"
    original = big.read_bytes()
    assert restored.read_bytes() == original
    stat = restored.stat()
    with open(restored, "r+b") as handle:  # same size, same first chunks, a different tail
        handle.seek(len(original) - 1000)
        handle.write(os.urandom(1000))
    os.utime(restored, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert restored.read_bytes() != original

    plan, result = _restore(repo, snap, target)
    assert restored.read_bytes() == original
    assert result.bytes_fetched > 0 and result.files_written >= 1
    assert result.bytes_reused > 0  # the unchanged chunks came from the target itself


def test_restore_sets_the_snapshot_mtimes_of_files_and_directories(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    past = 1_500_000_000_123_456_789  # 2017, to the nanosecond; nothing is written then
    for path in sorted(data.rglob("*"), key=lambda p: -len(p.parts)):  # children before parents
        if path.is_file() and "-wal" not in path.name and "-shm" not in path.name:
            os.utime(path, ns=(past, past + len(path.parts)))
    for path in sorted((p for p in data.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        os.utime(path, ns=(past, past + 7 * len(path.parts)))
    snap = create_snapshot(repo, _options(data, clock, tmp_path)).info
    target = tmp_path / "target"
    plan, _ = _restore(repo, snap, target)
    checked = {"file": 0, "dir": 0}
    for rel, entry in walk(repo, snap.tree):
        if entry["type"] not in checked:
            continue
        restored = target / rel.decode()
        assert restored.stat().st_mtime_ns == entry["mtime"], rel
        if rel.startswith(b"blobs"):  # (reading db/ opens the database, which touches db/)
            assert entry["mtime"] == (data / rel.decode()).stat().st_mtime_ns, rel
        checked[entry["type"]] += 1
    assert checked["file"] > 10 and checked["dir"] > 3, checked
    # A second restore finds every file identical and still leaves the snapshot's times.
    for path in target.rglob("*"):
        os.utime(path, ns=(past * 2, past * 2))
    _restore(repo, snap, target)
    for rel, entry in walk(repo, snap.tree):
        if entry["type"] in checked:
            assert (target / rel.decode()).stat().st_mtime_ns == entry["mtime"], rel


def test_partial_restore_of_one_package_and_of_the_database(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    snap = create_snapshot(repo, _options(data, clock, tmp_path)).info
    package = sorted(p.name for p in (data / "blobs").iterdir())[0]
    target = tmp_path / "partial"
    plan, _ = _restore(repo, snap, target, includes=[f"blobs/{package}", "db/club.db"])
    restored = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert "db/club.db" in restored
    assert all(r == "db/club.db" or r.startswith(f"blobs/{package}/") for r in restored)
    source = {k: v for k, v in blob_digests(data).items() if k.startswith(f"blobs/{package}/")}
    assert blob_digests(target) == source


def test_restore_moves_a_stale_wal_aside_instead_of_letting_sqlite_replay_it(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    snap = create_snapshot(repo, _options(data, clock, tmp_path)).info
    expected = club_state(data, live=True)["db"]
    target = tmp_path / "target"
    shutil.copytree(data, target)
    one_day(target, seed=11, day=1)  # leaves a -wal with newer commits beside club.db
    assert (target / "db" / "club.db-wal").exists()
    _, result = _restore(repo, snap, target, includes=["db/club.db"])
    assert not (target / "db" / "club.db-wal").exists() and not (target / "db" / "club.db-shm").exists()
    assert any(p.endswith("-wal") for p in result.moved_aside)
    assert club_state(target, live=False)["db"] == expected


def test_catalog_loss_is_harmless(repo: Repository, data: Path, clock: Clock, tmp_path: Path,
                                  cache_dir: Path) -> None:
    snap = create_snapshot(repo, _options(data, clock, tmp_path)).info
    repo.close()
    shutil.rmtree(cache_dir)
    fresh = reopen(repo, cache_dir)
    assert [s.id for s in fresh.snapshots()] == [snap.id]
    target = tmp_path / "after-cache-loss"
    _restore(fresh, fresh.find_snapshot("latest"), target)
    assert blob_digests(target) == blob_digests(data)
    fresh.close()


def test_snapshot_is_consistent_while_a_writer_process_runs(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    """A real writer process commits and publishes throughout; the restored db is one
    consistent commit, and every version row it holds has its tarball (DB first)."""
    from benchmarks.clubgen import LiveWriter

    with LiveWriter(data, interval=0.002, publish_every=15) as writer:
        time.sleep(0.3)
        snaps = []
        for _ in range(3):
            snaps.append(create_snapshot(repo, _options(data, clock, tmp_path)).info)
            clock.advance(minutes=1)
    assert writer.commits > 0 and writer.publishes > 0
    for snap in snaps:
        target = tmp_path / f"live-{snap.id.short()}"
        _restore(repo, snap, target)
        state = club_state(target, live=False)["db"]
        assert state["integrity_check"] == "ok" and state["user_version"] == "3"
        database = snap.record["databases"][0]
        assert os.path.getsize(target / "db" / "club.db") == database["page_size"] * database["page_count"]
        conn = sqlite3.connect(f"file:{target / 'db' / 'club.db'}?mode=ro&immutable=1", uri=True)
        rows = conn.execute("SELECT package_name, version, archive_sha256 FROM package_versions "
                            "ORDER BY published_at").fetchall()
        conn.close()
        missing = []
        for name, version, sha in rows:
            tarball = target / "blobs" / name / version / "artifacts" / "package.tar.gz"
            if not tarball.exists():
                missing.append((name, version))
                continue
            assert hashlib.sha256(tarball.read_bytes()).hexdigest() == sha, f"{name} {version}"
        # Only a publish caught between its DB commit and its blob write may lack its
        # tarball (club itself is in that state for those milliseconds): the newest row.
        assert missing in ([], [tuple(rows[-1][:2])])
