"""Page-level capture of live SQLite databases (issue 4): byte-exact images under a real
writer process, numbered-row consistency across a snapshot loop, rollback-journal mode,
page maps that cost what changed, and restores that keep the file's owner."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from engine import Repository, apply_restore, create_snapshot, plan_restore
from engine.format import BlobType, ChunkId, digest
from engine.pagemap import LEAF_PAGES, load_page_ids, map_blobs, store_page_map
from engine.errors import TargetInUse
from engine.restore import check_databases
from engine.snapshot import SnapshotOptions
from engine.sources import sqlite as capture

from .conftest import Clock

WRITER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
conn.execute("PRAGMA busy_timeout=5000")
pause = float(sys.argv[2])
n = conn.execute("SELECT coalesce(max(n), 0) FROM numbered").fetchone()[0]
while True:
    n += 1
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO numbered VALUES (?, randomblob(300))", (n,))
    conn.execute("UPDATE counters SET hits = hits + 1 WHERE id = ?", (n * 7919 % 2000,))
    conn.execute("COMMIT")
    if pause:
        time.sleep(pause)
"""


def _database(path: Path, journal: str = "wal") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute("CREATE TABLE numbered(n INTEGER PRIMARY KEY, pad BLOB)")
    conn.execute("CREATE TABLE counters(id INTEGER PRIMARY KEY, hits INTEGER, pad TEXT)")
    conn.executemany("INSERT INTO counters VALUES (?, 0, ?)", [(i, "x" * 300) for i in range(2000)])
    conn.commit()
    conn.close()
    return path


def _writer(db: Path, pause: float) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(pause)])
    deadline = time.monotonic() + 10
    while _count(db) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


def _count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM numbered").fetchone()[0])
    finally:
        conn.close()


def _image_and_oracle(db: Path) -> tuple[bytes, bytes, dict[str, object]]:
    with capture.pinned_image(str(db)) as image:
        pages = b"".join(image.pages())
        oracle = sqlite3.connect(":memory:")
        image.connection.backup(oracle)  # same read transaction: the same commit
        return pages, oracle.serialize(), image.info


def _same_except_backup_header(image: bytes, oracle: bytes) -> bool:
    """The backup API rewrites the change counter, schema cookie and version-valid-for
    fields of page 1 (SQLITE_NOTES §1.2a); every other byte must match."""
    a, b = bytearray(image), bytearray(oracle)
    for offset in (24, 40, 92):
        a[offset:offset + 4] = b[offset:offset + 4]
    return a == b


def _in_another_process(db: Path, *statements: str) -> None:
    code = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('PRAGMA wal_autocheckpoint=0')\nfor s in sys.argv[2:]: c.execute(s).fetchall()\n"
            "import os; os._exit(0)")  # no close: a closing last connection would checkpoint
    subprocess.run([sys.executable, "-c", code, str(db), *statements], check=True)


def test_checkpoint_and_commits_while_pinned_do_not_reach_the_image(tmp_path: Path) -> None:
    """Pinned with frames not yet checkpointed: another process commits more and runs a
    checkpoint, which copies frames up to our mark into the file while we read."""
    db = _database(tmp_path / "club.db")
    holder = sqlite3.connect(db)  # keeps the WAL from being checkpointed away on close
    _in_another_process(db, "UPDATE counters SET hits = hits + 1")
    with capture.pinned_image(str(db)) as image:
        assert image.info["wal_frames"] > image.info["wal_frames_checkpointed"]  # WAL overlay used
        oracle = sqlite3.connect(":memory:")
        image.connection.backup(oracle)
        _in_another_process(db, "UPDATE counters SET hits = hits + 10", "INSERT INTO numbered VALUES (1, NULL)",
                            "PRAGMA wal_checkpoint(PASSIVE)")
        assert _same_except_backup_header(b"".join(image.pages()), oracle.serialize())
    holder.close()


def test_fully_checkpointed_then_the_wal_restarts_while_pinned(tmp_path: Path) -> None:
    """Pinned when every frame was checkpointed: the file alone is read, and a writer that
    restarts the WAL meanwhile (it may: nothing in the WAL is ours) changes nothing."""
    db = _database(tmp_path / "club.db")
    holder = sqlite3.connect(db)
    _in_another_process(db, "UPDATE counters SET hits = hits + 1", "PRAGMA wal_checkpoint(TRUNCATE)")
    with capture.pinned_image(str(db)) as image:
        assert image.info["wal_frames"] == image.info["wal_frames_checkpointed"]  # file-only branch
        oracle = sqlite3.connect(":memory:")
        image.connection.backup(oracle)
        _in_another_process(db, "UPDATE counters SET hits = hits + 100", "INSERT INTO numbered VALUES (2, NULL)")
        assert _same_except_backup_header(b"".join(image.pages()), oracle.serialize())
    holder.close()


@pytest.mark.parametrize("pause", [0.002, 0.0])
def test_capture_equals_the_backup_api_under_a_writer_process(tmp_path: Path, pause: float) -> None:
    db = _database(tmp_path / "club.db")
    writer = _writer(db, pause)
    try:
        for _ in range(15):
            image, oracle, info = _image_and_oracle(db)
            assert _same_except_backup_header(image, oracle)
            assert info["journal_mode"] == "wal"
    finally:
        writer.kill()
        writer.wait()


def test_sealed_capture_when_the_writer_never_pauses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "OPTIMISTIC_TRIES", 0)  # go straight to the sealed pin
    db = _database(tmp_path / "club.db")
    writer = _writer(db, 0.0)
    try:
        for _ in range(5):
            image, oracle, info = _image_and_oracle(db)
            assert _same_except_backup_header(image, oracle)
            assert info["sealed"] is True and float(info["seal_ms"]) < 1000  # type: ignore[arg-type]
        before = _count(db)
        time.sleep(0.2)
        assert _count(db) > before  # the writer was never stopped for good
    finally:
        writer.kill()
        writer.wait()


def test_rollback_journal_database_is_read_under_its_shared_lock(tmp_path: Path) -> None:
    db = _database(tmp_path / "club.db", journal="delete")
    writer = _writer(db, 0.001)
    try:
        for _ in range(5):
            image, oracle, info = _image_and_oracle(db)
            assert info["journal_mode"] == "rollback"
            assert _same_except_backup_header(image, oracle)
    finally:
        writer.kill()
        writer.wait()


def test_every_snapshot_holds_rows_one_to_n_without_a_gap(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    """The issue's acceptance test: a writer commits numbered rows while snapshots are
    taken in a loop; each restored database passes integrity_check and holds exactly
    rows 1..N, N between the counts seen just before and just after that snapshot."""
    data = tmp_path / "data"
    db = _database(data / "db" / "club.db")
    (data / "blobs").mkdir()
    writer = _writer(db, 0.001)
    taken = []
    try:
        for _ in range(8):
            before = _count(db)
            snap = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock)).info
            taken.append((snap, before, _count(db)))
            clock.advance(minutes=1)
    finally:
        writer.kill()
        writer.wait()
    assert taken[-1][1] > taken[0][1]  # the writer really ran throughout
    for snap, before, after in taken:
        target = tmp_path / f"r-{snap.id.short()}"
        plan = plan_restore(repo, snap, target)
        apply_restore(repo, plan)
        assert check_databases(plan) == {"db/club.db": "ok"}
        conn = sqlite3.connect(f"file:{target / 'db' / 'club.db'}?mode=ro&immutable=1", uri=True)
        count, low, high = conn.execute("SELECT count(*), min(n), max(n) FROM numbered").fetchone()
        conn.close()
        assert low == 1 and high == count and before <= count <= after


def test_a_database_that_does_not_exist_yet_and_then_does(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "db").mkdir(parents=True)
    (data / "blobs").mkdir()
    first = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock))
    assert first.info.record["databases"] == [] and not first.partial
    _database(data / "db" / "club.db")
    clock.advance(minutes=1)
    second = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock))
    assert [d["path"] for d in second.info.record["databases"]] == [b"db/club.db"]


def _snapshot_then_add_a_row(repo: Repository, clock: Clock, data: Path, target: Path):  # type: ignore[no-untyped-def]
    """A one-database data dir, snapshotted; then ``target``'s database gets a new row."""
    db = _database(data / "db" / "club.db")
    (data / "blobs").mkdir()
    snap = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock)).info
    if target != data:
        apply_restore(repo, plan_restore(repo, snap, target))
    conn = sqlite3.connect(target / "db" / "club.db")
    conn.execute("INSERT INTO numbered VALUES (1, NULL)")
    conn.commit()
    conn.close()
    return db, snap


def test_restore_keeps_the_replaced_databases_owner_and_mode(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    target = tmp_path / "target"
    db, snap = _snapshot_then_add_a_row(repo, clock, tmp_path / "data", target)
    restored = target / "db" / "club.db"
    if os.geteuid() == 0:
        os.chown(restored, 65534, 65534)
    os.chmod(restored, 0o640)
    apply_restore(repo, plan_restore(repo, snap, target))
    st = restored.stat()
    assert st.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert _count(restored) == 0  # the snapshot's content, not the row added since


class _Blobs:
    """An in-memory blob store: the page-map algorithm on its own, with read counting."""

    def __init__(self) -> None:
        self.blobs: dict[ChunkId, bytes] = {}
        self.reads = 0

    def add_blob(self, blob_type: BlobType, raw: bytes, blob_id: ChunkId | None = None) -> ChunkId:
        key = ChunkId(digest(raw))
        self.blobs[key] = raw
        return key

    def read_blob(self, blob_id: ChunkId) -> bytes:
        self.reads += 1
        return self.blobs[blob_id]


def _page_ids(pages: int, version: dict[int, int]) -> bytes:
    return b"".join(digest(f"{p}:{version.get(p, 0)}".encode()) for p in range(1, pages + 1))


def _snapshots(store: _Blobs, count: int, pages: int, changes_per_snapshot: int) -> Iterator[tuple[ChunkId, bytes]]:
    version: dict[int, int] = {}
    parent = None
    for n in range(count):
        for i in range(changes_per_snapshot):
            page = (n * 7919 + i * 104729) % pages + 1
            version[page] = version.get(page, 0) + 1
        pages += 3 if n % 3 == 0 else -1 if n % 5 == 0 else 0  # grows, and now and then shrinks
        ids = _page_ids(pages, version)
        parent = store_page_map(store, ids, 4096, parent)
        yield parent, ids


def test_page_maps_restore_exactly_and_cost_what_changed() -> None:
    store = _Blobs()
    pages = 5 * LEAF_PAGES
    maps = list(_snapshots(store, 130, pages, changes_per_snapshot=20))
    for map_id, ids in maps:
        assert load_page_ids(store, map_id) == ids
        records = [b for b in map_blobs(store, map_id) if b"page_map" in store.blobs[b]]
        assert len(records) <= 1 + 8  # the base and at most popcount(n) <= log2(256) deltas
    sizes = [len(store.blobs[m]) for m, _ in maps[1:]]
    # The average map costs a small multiple of its 20 changed pages' 36-byte entries,
    # amortised rebasing included; a flat list of 5k ids would be 160 KiB each.
    rebase_bytes = sum(len(b) for b in store.blobs.values() if b"page_ids" in b)
    assert (sum(sizes) + rebase_bytes) / len(sizes) < 20 * 36 * 12


def test_an_unchanged_database_shares_its_parents_map_and_a_rewrite_rebases() -> None:
    store = _Blobs()
    ids = _page_ids(3000, {})
    first = store_page_map(store, ids, 4096, None)
    assert store_page_map(store, ids, 4096, first) == first
    rewritten = _page_ids(3000, {p: 1 for p in range(1, 3001)})
    rebased = store_page_map(store, rewritten, 4096, first)
    assert b"base" in store.blobs[rebased] and load_page_ids(store, rebased) == rewritten


def test_restore_refuses_a_database_a_process_has_open_unless_forced(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    data = tmp_path / "data"
    db, snap = _snapshot_then_add_a_row(repo, clock, data, data)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(db)!r}); c.execute('SELECT 1 FROM numbered').fetchall()\n"
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        with pytest.raises(TargetInUse, match=f"process {holder.pid} .*F_GETLK"):  # works across users
            apply_restore(repo, plan_restore(repo, snap, data))
        assert _count(db) == 1  # untouched
        apply_restore(repo, plan_restore(repo, snap, data), allow_in_use=True)
        assert _count(db) == 0
    finally:
        holder.kill()
        holder.wait()


def test_killing_a_snapshot_mid_capture_leaves_the_writer_and_the_repository_fine(
        cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    """SIGKILL while the database is being read under a live writer: the kernel drops the
    read lock, the writer keeps committing, the repository checks clean, and the next
    snapshot restores rows 1..N."""
    data = tmp_path / "data"
    db = _database(data / "db" / "club.db")
    conn = sqlite3.connect(db)
    conn.executemany("INSERT INTO numbered VALUES (?, randomblob(3000))", [(-i,) for i in range(1, 12001)])
    conn.commit()  # ~40 MB: reading it takes long enough to be killed in the middle
    conn.close()
    (data / "blobs").mkdir()
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    writer = _writer(db, 0.002)
    try:
        for delay in (0.35, 0.45, 0.55, 0.7):
            process = subprocess.Popen([sys.executable, "-m", "engine", "snapshot", str(data)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            process.kill()
            process.wait()
            before = _count(db)
            time.sleep(0.1)
            assert _count(db) > before  # no lock left behind
            check = cli("check", repo=repo)
            assert check.returncode == 0, check.stdout + check.stderr
        final = cli("snapshot", str(data), repo=repo)
        assert final.returncode == 0, final.stderr
    finally:
        writer.kill()
        writer.wait()
    target = tmp_path / "restored"
    assert cli("restore", "latest", "--target", str(target), repo=repo).returncode == 0
    restored = sqlite3.connect(f"file:{target / 'db' / 'club.db'}?mode=ro&immutable=1", uri=True)
    count, high = restored.execute("SELECT count(*), max(n) FROM numbered WHERE n > 0").fetchone()
    assert restored.execute("PRAGMA integrity_check").fetchone()[0] == "ok" and count == high > 0
    restored.close()


def test_an_untouched_database_is_not_read_again_and_any_change_is_seen(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = _database(data / "db" / "club.db")
    (data / "blobs").mkdir()
    holder = sqlite3.connect(db)  # keeps the WAL (and its state) between snapshots
    holder.execute("INSERT INTO numbered VALUES (1, NULL)")
    holder.commit()
    time.sleep(0.1)  # past the racy window

    def snap() -> dict[str, object]:
        clock.advance(minutes=1)
        info = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock)).info
        (database,) = info.record["databases"]
        return {**database, "snapshot": info}

    first, second = snap(), snap()
    assert first["bytes_read"] > 0 and second["bytes_read"] == 0 and second["pages_changed"] == 0
    holder.close()  # club stopped: the WAL is checkpointed and removed, and made anew by each reader
    time.sleep(0.1)
    stopped, again = snap(), snap()
    assert stopped["bytes_read"] > 0 and again["bytes_read"] == 0 and again["pages_changed"] == 0
    holder = sqlite3.connect(db)
    holder.execute("INSERT INTO numbered VALUES (2, NULL)")  # a commit: only the WAL changes
    holder.commit()
    third = snap()
    assert third["bytes_read"] > 0 and third["pages_changed"] > 0
    holder.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the file changes, the image does not
    time.sleep(0.1)
    fourth = snap()
    assert fourth["bytes_read"] > 0 and fourth["pages_changed"] == 0 and fourth["pages_stored"] == 0
    holder.close()
    for case, rows in ((second, 1), (third, 2), (fourth, 2)):
        target = tmp_path / f"r{rows}-{case['pages_changed']}-{case['bytes_read']}"
        snapshot = case["snapshot"]
        apply_restore(repo, plan_restore(repo, snapshot, target))  # type: ignore[arg-type]
        assert _count(target / "db" / "club.db") == rows


def test_a_wal_left_without_its_database_is_not_replayed_over_the_restore(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    """An operator deleted a broken club.db but not its -wal: SQLite would replay that WAL
    over the restored file (nothing ties a WAL to its database)."""
    data = tmp_path / "data"
    _database(data / "db" / "club.db")
    (data / "blobs").mkdir()
    snap = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock)).info
    target = tmp_path / "target"
    apply_restore(repo, plan_restore(repo, snap, target))
    restored = target / "db" / "club.db"
    writer = sqlite3.connect(restored)  # the same database moves on in its WAL, then "crashes"
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO numbered VALUES (7, NULL)")
    writer.commit()
    wal = Path(f"{restored}-wal").read_bytes()
    writer.close()
    restored.unlink()
    Path(f"{restored}-shm").unlink(missing_ok=True)
    Path(f"{restored}-wal").write_bytes(wal)  # left behind, with a committed row in it
    assert len(wal) > 0
    apply_restore(repo, plan_restore(repo, snap, target))
    assert not Path(f"{restored}-wal").exists()
    assert _count(restored) == 0
