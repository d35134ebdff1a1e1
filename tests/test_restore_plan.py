"""What a restore plans and what it then does to the target, file by file: which files are
written, reused, deleted or replaced, with which times, modes and owners, what the plan
reports in bytes, and how it fails. Fast in-process restores over small real repositories
(a small CDC chunker, so a file of a few hundred kB has many chunks)."""

from __future__ import annotations

import errno
import re
import fcntl
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from engine import ChunkerParams, Repository, apply_restore, create_snapshot, open_backend, plan_restore
from engine.backends.fs import FsBackend
from engine.chunker import chunk_stream
from engine.errors import BackendError, IntegrityError, StorageFull, TargetError, TargetInUse, UsageError
from engine.format import DATA_PREFIX
from engine.packs import coalesce
from engine.pagemap import file_chunks
from engine.restore import check_databases, normalise_include, select_files
from engine.snapshot import SnapshotOptions
from engine.tree import walk

from .conftest import Clock

SMALL = ChunkerParams(cdc_min=2048, cdc_avg=8192, cdc_max=32768)
TARBALL = "blobs/pkg/1.0.0/artifacts/package.tar.gz"


@pytest.fixture
def small(tmp_path: Path, cache_dir: Path, clock: Clock) -> Iterator[Repository]:
    repository = Repository.init(open_backend(str(tmp_path / "repo")), cache_dir, clock, chunker=SMALL)
    yield repository
    repository.close()


def _data(root: Path, rows: int = 300) -> Path:
    """A small club data dir: a database, a multi-chunk tarball, two small files."""
    (root / "db").mkdir(parents=True)
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts").mkdir(parents=True)
    (root / "blobs" / "other").mkdir()
    conn = sqlite3.connect(root / "db" / "club.db")
    conn.execute("CREATE TABLE t(x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(f"row{i}",) for i in range(rows)])
    conn.commit()
    conn.close()
    (root / TARBALL).write_bytes(os.urandom(300_000))
    (root / "blobs" / "pkg" / "README").write_bytes(b"readme " * 100)
    (root / "blobs" / "other" / "notes.txt").write_bytes(b"notes " * 50)
    return root


def _snap(repo: Repository, data: Path, clock: Clock):  # type: ignore[no-untyped-def]
    clock.advance(minutes=1)
    return create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock)).info


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def _snapshot_files(repo: Repository, snap) -> dict[bytes, dict]:  # type: ignore[no-untyped-def]
    return {p: e for p, e in walk(repo, snap.tree) if e["type"] == "file"}


def _rows(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY rowid")]
    finally:
        conn.close()


# ---- the plan: what is written, reused and fetched, in files and bytes ----------------------

def test_plan_counts_reuse_of_a_file_whose_later_chunk_differs(small: Repository, clock: Clock, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A target file whose first chunks match and a later one differs is rewritten from
    its own unchanged chunks plus the fetched ones; the plan's byte counts (what --dry-run
    shows) are exact, and the restore does what the plan said."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    tarball = target / TARBALL
    raw = bytearray(tarball.read_bytes())
    raw[200_000:200_010] = os.urandom(10)  # same size, a middle chunk differs
    tarball.write_bytes(bytes(raw))
    (target / "blobs" / "pkg" / "README").unlink()
    (target / "blobs" / "extra.bin").write_bytes(b"not in the snapshot")

    plan = plan_restore(small, snap, target, delete=True)
    files = _snapshot_files(small, snap)
    entry = files[TARBALL.encode()]
    wanted = file_chunks(small, entry)
    with open(tarball, "rb") as handle:
        present = {small.chunk_id(c): len(c)
                   for c in chunk_stream(handle, "cdc", SMALL)}
    assert len(wanted) >= 10 and wanted[0] in present and not set(wanted) <= set(present)
    reused_of_tarball = sum(present[c] for c in wanted if c in present)
    identical = {b"db/club.db", b"blobs/other/notes.txt"}

    assert sorted(f.rel for f in plan.to_write) == [b"blobs/pkg/1.0.0/artifacts/package.tar.gz", b"blobs/pkg/README"]
    assert {f.rel for f in plan.files if f.identical} == identical
    assert plan.deletions == [b"blobs/extra.bin"]
    assert plan.bytes_reused == reused_of_tarball + sum(files[r]["size"] for r in identical)
    needed = [c for c in wanted if c not in present] + file_chunks(small, files[b"blobs/pkg/README"])
    assert {b.id for blobs in plan.fetch.values() for b in blobs} == set(needed)
    assert plan.bytes_to_fetch >= sum(plan.located[c].length for c in set(needed)) > 0
    assert plan.summary() == {
        "snapshot": snap.id.hex(), "time": snap.time.isoformat(), "target": str(target.absolute()),
        "files": len(files), "files_to_write": 2, "files_unchanged": len(files) - 2,
        "bytes_total": sum(e["size"] for e in files.values()),
        "bytes_to_fetch": plan.bytes_to_fetch, "bytes_reused": plan.bytes_reused, "deletions": 1}

    progress: list[tuple[int, int]] = []
    temporaries: list[list[str]] = []
    modes: list[str] = []

    def report(done: int, total: int) -> None:
        progress.append((done, total))
        if not temporaries:  # while writing: hidden temporaries beside the files they replace,
            found = sorted(tmp_path.rglob("*clubsnap-restore*"))  # readable by no one else yet
            temporaries.append([str(p.relative_to(tmp_path)) for p in found])
            modes.extend(oct(p.stat().st_mode & 0o7777) for p in found)

    monkeypatch.chdir(tmp_path)
    result = apply_restore(small, plan, progress=report)
    assert [re.sub(r"[0-9a-f]{8}$", "*", p) for p in temporaries[0]] == [
        "target/blobs/pkg/.README.clubsnap-restore-*", "target/blobs/pkg/1.0.0/artifacts/.package.tar.gz.clubsnap-restore-*"]
    assert modes == ["0o600", "0o600"]
    assert _files(target) == _files(data)
    assert result.files_written == 2 and result.files_unchanged == len(files) - 2
    assert result.bytes_reused == plan.bytes_reused
    assert result.bytes_fetched == plan.bytes_to_fetch
    assert result.deleted == 1
    written = entry["size"] + files[b"blobs/pkg/README"]["size"]
    assert result.bytes_written == written
    assert progress[-1] == (written, written)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress) and {t for _, t in progress} == {written}


def test_a_second_restore_of_the_same_snapshot_writes_and_fetches_nothing(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    apply_restore(small, plan_restore(small, snap, target))
    plan = plan_restore(small, snap, target, delete=True)
    files = _snapshot_files(small, snap)
    assert plan.to_write == [] and plan.fetch == {} and plan.deletions == [] and plan.bytes_to_fetch == 0
    assert plan.bytes_reused == sum(e["size"] for e in files.values())
    result = apply_restore(small, plan)
    assert (result.files_written, result.files_unchanged, result.bytes_fetched) == (0, len(files), 0)
    assert result.bytes_reused == plan.bytes_reused and result.bytes_written == 0
    assert _files(target) == _files(data)


def test_an_unreadable_target_file_is_rewritten_and_the_others_still_compared(
        small: Repository, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target file the restore cannot read (a restore run as club's user, say) is
    simply written anew; the files after it are still found identical."""
    import engine.restore

    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    unreadable = os.fsencode(target / "blobs" / "other" / "notes.txt")
    real_open = open

    def guarded(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(engine.restore, "open", guarded, raising=False)
    plan = plan_restore(small, snap, target)
    monkeypatch.undo()
    assert [f.rel for f in plan.to_write] == [b"blobs/other/notes.txt"]
    apply_restore(small, plan)
    assert _files(target) == _files(data)


def test_content_moved_to_another_name_is_copied_from_the_old_one(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """A tarball whose directory was renamed in the target is rebuilt from the renamed
    copy, not fetched; a chunk used twice (in two files) is written to both."""
    data = _data(tmp_path / "data")
    shutil.copy(data / TARBALL, data / "blobs" / "other" / "copy.tar.gz")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    (target / "blobs" / "other" / "copy.tar.gz").unlink()
    (target / "blobs" / "pkg" / "1.0.0").rename(target / "blobs" / "pkg" / "0.9.0")
    plan = plan_restore(small, snap, target, delete=True)
    assert plan.fetch == {}
    size = (data / TARBALL).stat().st_size
    assert plan.bytes_reused == plan.summary()["bytes_total"]
    result = apply_restore(small, plan)
    assert result.bytes_fetched == 0 and result.bytes_reused == plan.bytes_reused
    assert result.bytes_written == 2 * size
    assert _files(target) == _files(data)
    assert not (target / "blobs" / "pkg" / "0.9.0").exists()


def test_a_target_file_changed_or_removed_after_planning_is_fetched_instead(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """The plan reuses target chunks; a file changed (or gone) between plan and apply
    must not put its new bytes into the restored files."""
    data = _data(tmp_path / "data")
    (data / "blobs" / "other" / "twin.tar.gz").write_bytes((data / TARBALL).read_bytes())
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    (target / TARBALL).unlink()
    (target / "blobs" / "other" / "twin.tar.gz").rename(target / "blobs" / "other" / "old.tar.gz")
    (target / "blobs" / "pkg" / "README").rename(target / "blobs" / "pkg" / "README.old")
    plan = plan_restore(small, snap, target)
    assert plan.fetch == {}
    old = target / "blobs" / "other" / "old.tar.gz"
    old.write_bytes(os.urandom(old.stat().st_size))  # changed under the plan
    (target / "blobs" / "pkg" / "README.old").unlink()  # gone under the plan
    result = apply_restore(small, plan)
    assert {k: v for k, v in _files(target).items() if not k.endswith(".old") and "old.tar" not in k} == _files(data)
    assert result.bytes_fetched > 0
    assert result.bytes_written == 2 * (data / TARBALL).stat().st_size + (data / "blobs" / "pkg" / "README").stat().st_size


@pytest.mark.parametrize("change", ["removed", "now a directory"])
def test_a_source_gone_after_planning_does_not_stop_the_reuse_of_the_others(
        small: Repository, clock: Clock, tmp_path: Path, change: str) -> None:
    """The first target file the plan reuses from is gone by the time of the restore:
    its chunks are fetched, and the chunks of the other files are still copied."""
    data = _data(tmp_path / "data")
    (data / "blobs" / "other" / "b.bin").write_bytes(os.urandom(60_000))
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    (target / "blobs" / "old").mkdir(parents=True)
    shutil.copy(data / "blobs" / "other" / "b.bin", target / "blobs" / "old" / "b")
    shutil.copy(data / TARBALL, target / "blobs" / "old" / "a")
    plan = plan_restore(small, snap, target)
    assert plan.bytes_reused == 60_000 + (data / TARBALL).stat().st_size
    (target / "blobs" / "old" / "b").unlink()
    if change == "now a directory":
        (target / "blobs" / "old" / "b").mkdir()
    result = apply_restore(small, plan)
    assert {k: v for k, v in _files(target).items() if not k.startswith("blobs/old/")} == _files(data)
    assert result.bytes_reused == (data / TARBALL).stat().st_size
    assert result.bytes_fetched > plan.bytes_to_fetch + 50_000


def test_many_files_with_shared_and_repeated_chunks_restore_exactly(
        small: Repository, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More files than the writer keeps open, a file larger than one joined write, and a
    chunk repeated inside a file: every byte lands where it belongs."""
    data = _data(tmp_path / "data")
    many = data / "blobs" / "many"
    many.mkdir()
    block = os.urandom(40_000)
    for i in range(80):
        (many / f"f{i:03}").write_bytes(os.urandom(3000) + block + i.to_bytes(2, "big") * 500)
    (data / "blobs" / "big.bin").write_bytes(os.urandom(1_500_000) + block * 3)
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    plan = plan_restore(small, snap, target)
    open_temps: set[int] = set()
    peak = 0
    real_open, real_close = os.open, os.close

    def counting_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal peak
        fd = real_open(path, flags, *args, **kwargs)
        if b"clubsnap-restore" in os.fsencode(path):
            open_temps.add(fd)
            peak = max(peak, len(open_temps))
        return fd

    def counting_close(fd: int) -> None:
        open_temps.discard(fd)
        real_close(fd)

    descriptors = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "close", counting_close)
    result = apply_restore(small, plan)
    monkeypatch.undo()
    assert _files(target) == _files(data)
    assert result.files_written == len(_files(data))
    assert not list(target.rglob("*clubsnap-restore*"))
    # At most 64 temporary files open at once, and every descriptor closed at the end.
    assert peak == 64 and not open_temps
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_a_local_backend_is_read_on_the_restoring_thread(tmp_path: Path, cache_dir: Path, clock: Clock) -> None:
    """A local disk gains nothing from parallel requests: no fetch threads for it."""
    threads: set[str] = set()

    class Recording(FsBackend):
        def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
            if key.startswith(DATA_PREFIX):
                threads.add(threading.current_thread().name)
            return super().get(key, offset, length)

    Repository.init(FsBackend(tmp_path / "repo"), cache_dir, clock, chunker=SMALL).close()
    repo = Repository.open(Recording(tmp_path / "repo"), cache_dir)
    try:
        data = _data(tmp_path / "data")
        snap = _snap(repo, data, clock)
        threads.clear()
        apply_restore(repo, plan_restore(repo, snap, tmp_path / "target"))
        assert threads == {threading.current_thread().name}
        assert _files(tmp_path / "target") == _files(data)
    finally:
        repo.close()


def test_parallel_fetches_restore_every_range(tmp_path: Path, cache_dir: Path, clock: Clock) -> None:
    """A backend serving requests in parallel (an S3 bucket) gets several ranged reads in
    flight; every range still lands in its file."""

    threads: set[str] | None = None

    class Parallel(FsBackend):
        @property
        def concurrency(self) -> int:
            return 3

        def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
            if key.startswith(DATA_PREFIX) and threads is not None:
                with guard:
                    threads.add(threading.current_thread().name)
                    first = len(started) < 3
                    started.append(key)
                if first:  # the first three requests are all in flight before any completes
                    together.wait()
            return super().get(key, offset, length)

    guard = threading.Lock()
    started: list[str] = []
    together = threading.Barrier(3, timeout=60)
    Repository.init(FsBackend(tmp_path / "repo"), cache_dir, clock, chunker=SMALL).close()
    repo = Repository.open(Parallel(tmp_path / "repo"), cache_dir)
    try:
        data = tmp_path / "data"
        (data / "blobs" / "p").mkdir(parents=True)
        for i in range(30):
            (data / "blobs" / "p" / f"f{i:02}").write_bytes(os.urandom(20_000))
        snap = _snap(repo, data, clock)
        target = tmp_path / "target"
        shutil.copytree(data, target)
        for i in range(0, 30, 2):  # every other file is missing: the needed blobs are scattered
            (target / "blobs" / "p" / f"f{i:02}").unlink()
        plan = plan_restore(repo, snap, target)
        ranges = [r for blobs in plan.fetch.values() for r in coalesce(blobs)]
        assert len(ranges) > 2 * 3  # more ranges than the window holds
        threads = set()
        result = apply_restore(repo, plan)
        assert _files(target) == _files(data)
        assert result.bytes_fetched == plan.bytes_to_fetch
        # The fetch threads are named for what they do (seen in py-spy and thread dumps).
        assert threads and all(name.startswith("fetch_") for name in threads), threads
        assert len(threads) <= 3  # no more requests at once than the backend serves well
    finally:
        repo.close()


# ---- times, modes, owners ---------------------------------------------------------------------

def test_modes_owners_and_times_come_from_the_snapshot(small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    notes = data / "blobs" / "other" / "notes.txt"
    os.chmod(notes, 0o640)
    os.chown(notes, 1234, 5678)
    os.chmod(data / "blobs" / "other", 0o750)
    os.chown(data / "blobs" / "other", 2345, 6789)
    os.utime(notes, ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))
    os.utime(data / "blobs" / "other", ns=(1_600_000_000_000_000_007, 1_600_000_000_000_000_007))
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    apply_restore(small, plan_restore(small, snap, target))
    st = (target / "blobs" / "other" / "notes.txt").stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o640", 1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000_000_000_001
    directory = (target / "blobs" / "other").stat()
    assert (oct(directory.st_mode & 0o7777), directory.st_uid, directory.st_gid) == ("0o750", 2345, 6789)
    assert directory.st_mtime_ns == 1_600_000_000_000_000_007

    # An identical file with the wrong mode, owner and time is only given its metadata.
    restored = target / "blobs" / "other" / "notes.txt"
    os.chmod(restored, 0o666)
    os.chown(restored, 0, 0)
    os.utime(restored, ns=(5, 5))
    inode = restored.stat().st_ino
    plan = plan_restore(small, snap, target)
    assert plan.to_write == []
    apply_restore(small, plan)
    st = restored.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino) == (
        "0o640", 1234, 5678, 1_600_000_000_000_000_001, inode)

    # Without set_owner, files belong to whoever restores (a restore for inspection).
    other = tmp_path / "inspect"
    apply_restore(small, plan_restore(small, snap, other), set_owner=False)
    st = (other / "blobs" / "other" / "notes.txt").stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (os.geteuid(), os.getegid(), "0o640")


def test_a_replaced_database_keeps_the_owner_and_mode_of_the_one_it_replaces(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """club runs as its own user: a database it cannot write turns club read-only. Other
    files get the snapshot's owner and mode."""
    data = _data(tmp_path / "data")
    os.chmod(data / "db" / "club.db", 0o644)
    snap = _snap(small, data, clock)
    target = _data(tmp_path / "target", rows=10)
    db = target / "db" / "club.db"
    os.chown(db, 4321, 8765)
    os.chmod(db, 0o600)
    os.chown(target / TARBALL, 4321, 8765)
    apply_restore(small, plan_restore(small, snap, target))
    st = db.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (4321, 8765, "0o600")
    assert _rows(db) == [f"row{i}" for i in range(300)]
    tar = (target / TARBALL).stat()
    source = (data / TARBALL).stat()
    assert (tar.st_uid, tar.st_gid, tar.st_mode) == (source.st_uid, source.st_gid, source.st_mode)
    # A database restored where none was takes the snapshot's.
    fresh = tmp_path / "fresh"
    apply_restore(small, plan_restore(small, snap, fresh))
    assert oct((fresh / "db" / "club.db").stat().st_mode & 0o7777) == "0o644"


# ---- --delete, includes and scopes ------------------------------------------------------------

def test_delete_removes_extras_deepest_first_and_only_within_the_restored_tiers(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    (target / "blobs" / "gone" / "2.0" ).mkdir(parents=True)
    (target / "blobs" / "gone" / "2.0" / "x.tar.gz").write_bytes(b"x")
    (target / "blobs" / "pkg" / "extra").write_bytes(b"e")
    (target / "logs").mkdir()
    (target / "logs" / "club.log").write_bytes(b"a log the snapshot did not take")
    (target / "notes-of-the-admin").write_bytes(b"outside every tier")

    kept_plan = plan_restore(small, snap, target)
    assert kept_plan.deletions == []
    apply_restore(small, kept_plan)
    assert (target / "blobs" / "pkg" / "extra").exists()

    plan = plan_restore(small, snap, target, delete=True)
    assert plan.deletions == [b"blobs/gone/2.0/x.tar.gz", b"blobs/gone/2.0", b"blobs/pkg/extra", b"blobs/gone"]
    assert plan.summary()["deletions"] == 4
    result = apply_restore(small, plan)
    assert result.deleted == 4
    assert not (target / "blobs" / "gone").exists() and not (target / "blobs" / "pkg" / "extra").exists()
    assert (target / "logs" / "club.log").exists() and (target / "notes-of-the-admin").exists()
    assert _files(target / "blobs") == _files(data / "blobs")


def test_includes_restore_and_delete_only_within_themselves(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    (target / "blobs" / "other").mkdir(parents=True)
    (target / "blobs" / "other" / "mine").write_bytes(b"outside the include")
    (target / "blobs" / "pkg" / "1.0.0").mkdir(parents=True)
    (target / "blobs" / "pkg" / "1.0.0" / "stray").write_bytes(b"inside the include")

    plan = plan_restore(small, snap, target, includes=["./blobs/pkg/1.0.0/"], delete=True)
    assert [f.rel for f in plan.files] == [TARBALL.encode()]
    assert [rel for rel, _ in plan.dirs] == [b"blobs", b"blobs/pkg", b"blobs/pkg/1.0.0",
                                              b"blobs/pkg/1.0.0/artifacts"]
    assert plan.deletions == [b"blobs/pkg/1.0.0/stray"]
    apply_restore(small, plan)
    assert _files(target) == {TARBALL: (data / TARBALL).read_bytes(), "blobs/other/mine": b"outside the include"}

    one = tmp_path / "one"
    plan = plan_restore(small, snap, one, includes=["blobs/other/notes.txt", "db"])
    assert [f.rel for f in plan.files] == [b"blobs/other/notes.txt", b"db/club.db"]
    apply_restore(small, plan)
    assert sorted(_files(one)) == ["blobs/other/notes.txt", "db/club.db"]

    with pytest.raises(UsageError) as raised:
        plan_restore(small, snap, target, includes=["blobs/pkg", "blobs/nope"])
    assert str(raised.value) == f"--include blobs/nope matches nothing in snapshot {snap.id.short()}"
    with pytest.raises(UsageError, match="matches nothing"):
        plan_restore(small, snap, target, includes=["blobs/pkg/README/inner"])
    with pytest.raises(UsageError, match="matches nothing"):
        plan_restore(small, snap, target, includes=["blob"])  # a prefix of a name is not a path


def test_includes_compare_only_within_themselves(small: Repository, clock: Clock, tmp_path: Path) -> None:
    """An include of a file and of a directory finds both identical in a target that
    holds them; leftovers of a killed restore are removed within the includes only."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    inside = target / "db" / ".club.db.clubsnap-restore-0a1b2c3d"
    outside = target / "blobs" / "pkg" / ".README.clubsnap-restore-0a1b2c3d"
    inside.write_bytes(b"half written")
    outside.write_bytes(b"half written")
    plan = plan_restore(small, snap, target, includes=["blobs/other/notes.txt", "db"], delete=True)
    assert plan.to_write == [] and plan.deletions == []
    assert plan.stale_temps == [b"db/.club.db.clubsnap-restore-0a1b2c3d"]
    apply_restore(small, plan)
    assert not inside.exists() and outside.exists()
    assert plan_restore(small, snap, target, includes=["db"]).stale_temps == []


def test_a_symlink_where_a_file_goes_is_replaced_by_the_file(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """A link to identical content is not the file: the restore puts a real file there
    and leaves what the link pointed at alone."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    elsewhere = tmp_path / "elsewhere.txt"
    shutil.copy(data / "blobs" / "other" / "notes.txt", elsewhere)
    os.chmod(elsewhere, 0o604)
    (target / "blobs" / "other" / "notes.txt").unlink()
    os.symlink(elsewhere, target / "blobs" / "other" / "notes.txt")
    plan = plan_restore(small, snap, target)
    assert [f.rel for f in plan.to_write] == [b"blobs/other/notes.txt"]
    apply_restore(small, plan)
    restored = target / "blobs" / "other" / "notes.txt"
    assert not restored.is_symlink() and restored.read_bytes() == (data / "blobs" / "other" / "notes.txt").read_bytes()
    assert oct(elsewhere.stat().st_mode & 0o777) == "0o604"


def test_select_files_picks_the_files_of_the_includes(small: Repository, clock: Clock, tmp_path: Path) -> None:
    """What a restore into a bucket takes: the snapshot's files within the includes."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    everything = select_files(small, snap)
    assert [f.rel for f in everything] == sorted(_snapshot_files(small, snap), key=lambda r: r)
    assert [f.chunks for f in everything] == [file_chunks(small, e) for e in _snapshot_files(small, snap).values()]
    picked = select_files(small, snap, ["/blobs/pkg"])
    assert [f.rel for f in picked] == [TARBALL.encode(), b"blobs/pkg/README"]
    with pytest.raises(UsageError) as raised:
        select_files(small, snap, ["blobs", "logs"])
    assert str(raised.value) == f"--include logs matches nothing in snapshot {snap.id.short()}"


@pytest.mark.parametrize(("given", "expected"), [
    (" /blobs/pkg/ ", b"blobs/pkg"), ("./././db", b"db"), ("blobs/X/", b"blobs/X"), ("a..b/c", b"a..b/c"),
    (".hidden/x", b".hidden/x"),
])
def test_normalise_include(given: str, expected: bytes) -> None:
    assert normalise_include(given) == expected


@pytest.mark.parametrize("given", ["", "/", "..", "blobs/../db", "./..", "blobs/.."])
def test_normalise_include_refuses_paths_leaving_the_snapshot(given: str) -> None:
    with pytest.raises(UsageError) as raised:
        normalise_include(given)
    assert str(raised.value) == f"invalid --include path {given!r}"


# ---- files where directories go, and symlinks -------------------------------------------------

def test_kind_conflicts_are_refused_without_delete_and_replaced_with_it(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    (target / "blobs" / "other" / "notes.txt").unlink()
    (target / "blobs" / "other" / "notes.txt").mkdir()  # a directory where a file goes
    (target / "blobs" / "other" / "notes.txt" / "inner").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    (target / "blobs" / "pkg" / "1.0.0").rename(elsewhere)
    os.symlink(elsewhere, target / "blobs" / "pkg" / "1.0.0")  # a link to a directory where a directory goes

    with pytest.raises(UsageError) as raised:
        plan_restore(small, snap, target)
    assert str(raised.value) == ("blobs/pkg/1.0.0 is a different kind of file in the target than in the "
                                 "snapshot; use --delete to replace it")
    (target / "blobs" / "extra").write_bytes(b"an extra, listed after the conflict's contents")
    plan = plan_restore(small, snap, target, delete=True)
    assert sorted(plan.conflicts) == [b"blobs/other/notes.txt", b"blobs/pkg/1.0.0"]
    assert plan.deletions[0] == b"blobs/other/notes.txt/inner"  # gone with the conflict by then
    result = apply_restore(small, plan)
    assert _files(target) == _files(data)
    assert not (target / "blobs" / "extra").exists() and result.deleted == len(plan.deletions) - 1
    assert not (target / "blobs" / "pkg" / "1.0.0").is_symlink()
    assert (elsewhere / "artifacts" / "package.tar.gz").exists()  # what the link pointed at is left alone


def test_a_file_where_a_directory_goes_is_replaced_with_delete(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    (target / "blobs").mkdir(parents=True)
    (target / "blobs" / "other").write_bytes(b"a file")
    with pytest.raises(UsageError, match="^blobs/other is a different kind"):
        plan_restore(small, snap, target)
    apply_restore(small, plan_restore(small, snap, target, delete=True))
    assert _files(target) == _files(data)


def test_symlinks_are_restored_over_whatever_is_there(small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    os.symlink("1.0.0", data / "blobs" / "pkg" / "latest")
    os.symlink("../pkg/README", data / "blobs" / "other" / "readme-link")
    snap = _snap(small, data, clock)
    assert [rel for rel, _ in plan_restore(small, snap, tmp_path / "x").symlinks] == [
        b"blobs/other/readme-link", b"blobs/pkg/latest"]
    target = tmp_path / "target"
    (target / "blobs" / "pkg").mkdir(parents=True)
    (target / "blobs" / "pkg" / "latest").write_bytes(b"a file where the link goes")
    (target / "blobs" / "other").mkdir(parents=True)
    os.symlink("somewhere-else", target / "blobs" / "other" / "readme-link")
    apply_restore(small, plan_restore(small, snap, target))
    assert os.readlink(target / "blobs" / "pkg" / "latest") == "1.0.0"
    assert os.readlink(target / "blobs" / "other" / "readme-link") == "../pkg/README"
    assert (target / "blobs" / "other" / "readme-link").read_bytes() == (data / "blobs" / "pkg" / "README").read_bytes()
    assert not [p for p in os.listdir(target / "blobs" / "pkg") if "clubsnap-restore" in p]
    # An include beside a link does not take the link; an include of just the link takes just it.
    assert plan_restore(small, snap, tmp_path / "y", includes=["blobs/pkg/README"]).symlinks == []
    only = tmp_path / "only"
    plan = plan_restore(small, snap, only, includes=["blobs/pkg/latest"])
    assert plan.files == [] and [rel for rel, _ in plan.symlinks] == [b"blobs/pkg/latest"]


# ---- SQLite: sidecars -------------------------------------------------------------------------

def test_an_identical_database_with_a_wal_beside_it_is_rewritten_and_the_wal_moved_aside(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """SQLite would replay the WAL over the restored image: the database is not
    identical while a WAL sits beside it, and --delete never lists the sidecars."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    db = target / "db" / "club.db"
    (target / "db" / "club.db-wal").write_bytes(b"stale wal")
    (target / "db" / "club.db-shm").write_bytes(b"stale shm")
    plan = plan_restore(small, snap, target, delete=True)
    assert [f.rel for f in plan.to_write] == [b"db/club.db"]
    assert plan.deletions == []
    result = apply_restore(small, plan)
    assert not (target / "db" / "club.db-wal").exists() and not (target / "db" / "club.db-shm").exists()
    aside = sorted(p for p in os.listdir(target / "db") if ".pre-restore-" in p)
    assert len(aside) == 2 and aside[1] == aside[0] + "-wal"
    assert sorted(os.path.basename(p) for p in result.moved_aside) == aside
    assert (target / "db" / aside[1]).read_bytes() == b"stale wal"
    assert (target / "db" / aside[0]).read_bytes() == (data / "db" / "club.db").read_bytes()
    assert result.deleted == 0
    assert _rows(db) == [f"row{i}" for i in range(300)]
    # The safety copies survive the next --delete restore too.
    again = plan_restore(small, snap, target, delete=True)
    assert again.deletions == [] and again.to_write == []


def test_a_database_page_fetched_after_its_neighbours_lands_in_its_place(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """Only the next-to-last page of the target database differs: the pages around it
    are copied first and it is fetched last, behind the page that follows it."""
    data = _data(tmp_path / "data", rows=2000)
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    db = target / "db" / "club.db"
    page = snap.record["databases"][0]["page_size"]
    raw = bytearray(db.read_bytes())
    assert len(raw) >= 5 * page
    at = len(raw) - 2 * page
    raw[at + 100:at + 200] = os.urandom(100)
    db.write_bytes(bytes(raw))
    plan = plan_restore(small, snap, target)
    assert [f.rel for f in plan.to_write] == [b"db/club.db"]
    assert sum(len(b) for b in plan.fetch.values()) == 1
    apply_restore(small, plan)
    assert db.read_bytes() == (data / "db" / "club.db").read_bytes()


def test_pending_writes_stay_bounded_over_many_files(small: Repository, clock: Clock, tmp_path: Path) -> None:
    """Joined writes wait in memory only for a few files at a time: a restore of many
    files copied from the target never holds them all."""
    import tracemalloc

    data = tmp_path / "data"
    (data / "blobs" / "p").mkdir(parents=True)
    for i in range(40):
        (data / "blobs" / "p" / f"f{i:02}").write_bytes(os.urandom(200_000))
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    (target / "blobs").mkdir(parents=True)
    shutil.copytree(data / "blobs" / "p", target / "blobs" / "old")
    plan = plan_restore(small, snap, target)
    assert plan.fetch == {}
    tracemalloc.start()
    try:
        apply_restore(small, plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _files(target / "blobs" / "p") == _files(data / "blobs" / "p")
    assert peak < 4_000_000, peak  # 8 MB restored; at most 9 files' runs (1.8 MB) pending


def test_a_replaced_database_is_kept_aside_under_a_utc_stamp(
        small: Repository, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore over the wrong database must not be the end of it: the old one stays
    beside it (no sidecars needed), named by the UTC time, whatever the host's zone."""
    import time
    from datetime import datetime, timezone

    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = _data(tmp_path / "target", rows=10)
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        result = apply_restore(small, plan_restore(small, snap, target))
        after = datetime.now(timezone.utc)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert len(result.moved_aside) == 1
    aside = Path(result.moved_aside[0])
    assert aside.parent == target / "db"
    match = re.fullmatch(r"club\.db\.pre-restore-(\d{8}T\d{6})\.\d{6}Z", aside.name)
    assert match, aside.name
    stamp = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    assert before <= stamp <= after
    assert _rows(aside) == [f"row{i}" for i in range(10)]
    assert _rows(target / "db" / "club.db") == [f"row{i}" for i in range(300)]


def test_a_wal_without_its_database_is_moved_aside_before_the_database_goes_in(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    """SQLite would replay a WAL left without its database over the restored one."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    (target / "db").mkdir(parents=True)
    (target / "db" / "club.db-wal").write_bytes(b"w" * 100)
    (target / "db" / "club.db-shm").write_bytes(b"s" * 100)
    result = apply_restore(small, plan_restore(small, snap, target))
    assert not (target / "db" / "club.db-wal").exists() and not (target / "db" / "club.db-shm").exists()
    assert len(result.moved_aside) == 1 and result.moved_aside[0].endswith("-wal")
    assert Path(result.moved_aside[0]).read_bytes() == b"w" * 100
    assert Path(result.moved_aside[0]).parent == target / "db"
    assert _rows(target / "db" / "club.db") == [f"row{i}" for i in range(300)]


# ---- check_databases ---------------------------------------------------------------------------

def _index_mismatch(db: Path) -> list[str]:
    """Make an index disagree with its table (quick_check cannot see it); returns what
    integrity_check says."""
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE u(a, b)")
    conn.executemany("INSERT INTO u VALUES (?, ?)", [(i, i + 1000) for i in range(20)])
    conn.execute("CREATE INDEX ua ON u(a)")
    conn.commit()
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX ua ON u(b)' WHERE name = 'ua'")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(db)
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    assert [r[0] for r in conn.execute("PRAGMA quick_check")] == ["ok"]
    conn.close()
    return rows


def test_check_databases_reports_ok_or_sqlites_first_complaints(
        small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target dir #1?"
    plan = plan_restore(small, snap, target)
    apply_restore(small, plan)
    assert check_databases(plan) == {"db/club.db": "ok"}
    assert check_databases(plan, thorough=False) == {"db/club.db": "ok"}
    assert not (target / "db" / "club.db-wal").exists() and not (target / "db" / "club.db-shm").exists()

    complaints = _index_mismatch(target / "db" / "club.db")
    assert len(complaints) > 5
    assert check_databases(plan) == {"db/club.db": "; ".join(complaints[:5])}
    assert check_databases(plan, thorough=True) == {"db/club.db": "; ".join(complaints[:5])}
    assert check_databases(plan, thorough=False) == {"db/club.db": "ok"}

    (target / "db" / "club.db").write_bytes(b"this is not a database at all, not even close" * 100)
    assert check_databases(plan) == {"db/club.db": "file is not a database"}


# ---- failures -----------------------------------------------------------------------------------

def _data_pack_of(repo: Repository, chunk: bytes) -> Path:
    from engine.format import ChunkId, pack_key

    entry = repo.locate_many([ChunkId(chunk)])[ChunkId(chunk)]
    return Path(repo.backend.location, pack_key(entry.pack))


@pytest.mark.parametrize(("count", "named"), [
    (3, "blobs/new/f0, blobs/new/f1, blobs/new/f2"),
    (4, "blobs/new/f0, blobs/new/f1, blobs/new/f2 and 1 more"),
    (6, "blobs/new/f0, blobs/new/f1, blobs/new/f2 and 3 more"),
])
def test_a_missing_pack_names_the_files_that_need_it(small: Repository, clock: Clock, tmp_path: Path,
                                                     count: int, named: str) -> None:
    data = _data(tmp_path / "data")
    _snap(small, data, clock)
    (data / "blobs" / "new").mkdir()
    for i in range(count):
        (data / "blobs" / "new" / f"f{i}").write_bytes(os.urandom(1000))
    snap = _snap(small, data, clock)
    files = _snapshot_files(small, snap)
    pack = _data_pack_of(small, files[b"blobs/new/f0"]["chunks"][0])
    assert pack != _data_pack_of(small, files[TARBALL.encode()]["chunks"][0])
    pack.unlink()
    target = tmp_path / "target"
    with pytest.raises(IntegrityError) as raised:
        apply_restore(small, plan_restore(small, snap, target))
    key = str(pack.relative_to(small.backend.location))
    assert str(raised.value) == f"{key}: pack missing, needed by {named}"
    assert not list(target.rglob("*clubsnap-restore*"))  # no temporary file is left behind


def test_a_truncated_pack_and_a_failing_read_are_told_apart(small: Repository, clock: Clock,
                                                            tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    pack = _data_pack_of(small, _snapshot_files(small, snap)[TARBALL.encode()]["chunks"][0])
    key = str(pack.relative_to(small.backend.location))
    original = pack.read_bytes()

    class Failing(FsBackend):
        armed = False

        def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
            if self.armed and key.startswith("data/"):
                raise BackendError("injected: connection reset")
            return super().get(key, offset, length)

    failing = Repository.open(Failing(Path(small.backend.location)), tmp_path / "cache2")
    try:
        plan = plan_restore(failing, snap, tmp_path / "t1")
        Failing.armed = True
        with pytest.raises(BackendError) as raised:
            apply_restore(failing, plan)
        assert not isinstance(raised.value, IntegrityError) and "injected" in str(raised.value)
    finally:
        failing.close()

    plan = plan_restore(small, snap, tmp_path / "t2")
    pack.write_bytes(original[:len(original) // 3])
    with pytest.raises(IntegrityError) as raised:
        apply_restore(small, plan)
    assert str(raised.value).startswith(f"{key}: pack truncated, needed by ")
    assert TARBALL in str(raised.value)


def test_a_damaged_blob_names_the_file_that_needs_it(small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    entry = _snapshot_files(small, snap)[b"blobs/pkg/README"]
    pack = _data_pack_of(small, entry["chunks"][0])
    from engine.format import ChunkId

    located = small.locate_many([ChunkId(entry["chunks"][0])])[ChunkId(entry["chunks"][0])]
    raw = bytearray(pack.read_bytes())
    raw[located.offset + located.length // 2] ^= 0xFF
    pack.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as raised:
        apply_restore(small, plan_restore(small, snap, tmp_path / "target"))
    key = str(pack.relative_to(small.backend.location))
    message = str(raised.value)
    assert message.startswith(f"{key}: blob {located.id.short()} fails its hash check (recorded as damaged")
    assert message.endswith("; needed by blobs/pkg/README")


def test_target_errors_name_the_target(small: Repository, clock: Clock, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    plan = plan_restore(small, snap, blocker / "target")
    with pytest.raises(TargetError) as raised:
        apply_restore(small, plan)
    assert str(raised.value) == f"restoring into {blocker / 'target'}: Not a directory: {blocker / 'target'}"

    target = tmp_path / "full"
    real_pwrite = os.pwrite
    for code in (errno.ENOSPC, errno.EDQUOT):
        calls = []

        def full(fd: int, data: bytes, offset: int) -> int:
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(code, os.strerror(code))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(StorageFull) as full_raised:
            apply_restore(small, plan_restore(small, snap, target))
        assert str(full_raised.value) == f"restoring into {target}: no space left on device"
        assert not list(target.rglob("*clubsnap-restore*"))  # every temporary is removed again
        assert not [p for p in target.rglob("*") if p.is_file()]  # and nothing was installed
    monkeypatch.setattr(os, "pwrite", real_pwrite)

    def denied(fd: int, length: int) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "ftruncate", denied)
    with pytest.raises(TargetError) as raised:
        apply_restore(small, plan_restore(small, snap, target))
    assert str(raised.value) == f"restoring into {target}: Permission denied"

    # A disk that fills while the temporaries are being sized: the one being sized goes too.
    monkeypatch.undo()
    real_ftruncate = os.ftruncate
    sized: list[int] = []

    def fills(fd: int, length: int) -> None:
        sized.append(fd)
        if len(sized) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", fills)
    with pytest.raises(StorageFull):
        apply_restore(small, plan_restore(small, snap, target))
    assert len(sized) == 2 and not list(target.rglob("*clubsnap-restore*"))


# ---- a database in use --------------------------------------------------------------------------

FLOCK = struct.Struct("hhqqi4x")


def _ofd_lock(path: Path, start: int, length: int) -> int:
    """Hold a read lock as SQLite would; an open-file-description lock conflicts with
    this process's own probe, and F_GETLK reports its holder as pid -1."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, start, length, 0))
    return fd


@pytest.mark.parametrize("mode", ["wal", "rollback"])
def test_a_locked_database_is_refused_unless_forced(small: Repository, clock: Clock, tmp_path: Path,
                                                    mode: str) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = _data(tmp_path / "target", rows=10)
    db = target / "db" / "club.db"
    if mode == "wal":
        (target / "db" / "club.db-shm").write_bytes(b"\0" * 32768)
        fd = _ofd_lock(target / "db" / "club.db-shm", 128, 1)  # the WAL dead-man-switch byte
    else:
        fd = _ofd_lock(db, 0x40000002, 510)  # SHARED, in a read transaction
    try:
        plan = plan_restore(small, snap, target)
        with pytest.raises(TargetInUse) as raised:
            apply_restore(small, plan)
        assert str(raised.value) == (f"{db} is in use: process -1 (unknown command) holds a SQLite lock on it "
                                     f"(found with fcntl F_GETLK): stop club first, or pass --force")
        assert _rows(db) == [f"row{i}" for i in range(10)]
        apply_restore(small, plan, allow_in_use=True)
        assert _rows(db) == [f"row{i}" for i in range(300)]
    finally:
        os.close(fd)


def test_a_running_wal_reader_is_named_in_the_refusal(small: Repository, clock: Clock, tmp_path: Path) -> None:
    """A club process with its WAL database open holds the -shm DMS lock: the refusal
    names its pid and command, so the operator knows what to stop."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = _data(tmp_path / "target", rows=10)
    db = target / "db" / "club.db"
    code = (f"import sqlite3; c = sqlite3.connect({str(db)!r}); c.execute('PRAGMA journal_mode=WAL');"
            "c.execute('SELECT count(*) FROM t').fetchall(); print('ready', flush=True); input()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
        plan = plan_restore(small, snap, target)
        with pytest.raises(TargetInUse) as raised:
            apply_restore(small, plan)
        assert str(raised.value) == (f"{db} is in use: process {holder.pid} ({comm}) holds a SQLite lock on it "
                                     f"(found with fcntl F_GETLK): stop club first, or pass --force")
    finally:
        holder.communicate("\n", timeout=30)
    assert _rows(db) == [f"row{i}" for i in range(10)]


def test_a_lock_probe_failing_on_the_shm_still_probes_the_database(
        small: Repository, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem without lock support for the -shm (ENOLCK), the database's own
    SHARED range is still probed: a reader in a transaction is found."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = _data(tmp_path / "target", rows=10)
    db = target / "db" / "club.db"
    (target / "db" / "club.db-shm").write_bytes(b"\0" * 32768)
    real_fcntl = fcntl.fcntl

    def no_locks_on_shm(fd: int, command: int, arg: bytes) -> bytes:
        if command == fcntl.F_GETLK and os.readlink(f"/proc/self/fd/{fd}").endswith("-shm"):
            raise OSError(errno.ENOLCK, "No locks available")
        return real_fcntl(fd, command, arg)

    fd = _ofd_lock(db, 0x40000002, 510)
    try:
        plan = plan_restore(small, snap, target)
        monkeypatch.setattr(fcntl, "fcntl", no_locks_on_shm)
        with pytest.raises(TargetInUse, match="holds a SQLite lock on it"):
            apply_restore(small, plan)
    finally:
        monkeypatch.setattr(fcntl, "fcntl", real_fcntl)
        os.close(fd)
    assert _rows(db) == [f"row{i}" for i in range(10)]


def test_a_database_open_in_another_process_is_refused(small: Repository, clock: Clock, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback-journal connection between transactions holds no lock: /proc shows it,
    even past the processes whose descriptors cannot be listed (other users', seen by a
    restore that is not root)."""
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = _data(tmp_path / "target", rows=10)
    db = target / "db" / "club.db"
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(db)!r}, 'rb'); print('ready', flush=True); input()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
        plan = plan_restore(small, snap, target)
        real_listdir = os.listdir

        def others_hidden(path):  # type: ignore[no-untyped-def]
            if isinstance(path, str) and path.startswith("/proc/") and path.endswith("/fd") \
                    and path != f"/proc/{holder.pid}/fd":
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_listdir(path)

        real_readlink = os.readlink

        def closed_meanwhile(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if path == f"/proc/{holder.pid}/fd/0":  # a descriptor closed since the listing
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            return real_readlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "listdir", others_hidden)
        monkeypatch.setattr(os, "readlink", closed_meanwhile)
        with pytest.raises(TargetInUse) as raised:
            apply_restore(small, plan)
        monkeypatch.undo()
        assert str(raised.value) == (f"{db} is open by process {holder.pid} ({comm}; found in "
                                     f"/proc/{holder.pid}/fd): stop club first, or pass --force")
        # Only databases to be written count: the tarball open elsewhere is no reason to stop.
        assert _rows(db) == [f"row{i}" for i in range(10)]
    finally:
        holder.communicate("\n", timeout=30)
    apply_restore(small, plan)
    assert _rows(db) == [f"row{i}" for i in range(300)]


def test_a_database_not_to_be_written_may_be_in_use(small: Repository, clock: Clock, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    snap = _snap(small, data, clock)
    target = tmp_path / "target"
    shutil.copytree(data, target)
    (target / TARBALL).write_bytes(b"changed")
    holder = subprocess.Popen([sys.executable, "-c",
                               f"f = open({str(target / TARBALL)!r}, 'rb'); g = open({str(target / 'db' / 'club.db')!r}, 'rb');"
                               " print('ready', flush=True); input()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        plan = plan_restore(small, snap, target)
        assert [f.rel for f in plan.to_write] == [TARBALL.encode()]
        apply_restore(small, plan)  # club.db is identical: nothing replaces it
    finally:
        holder.communicate("\n", timeout=30)
    assert _files(target) == _files(data)
