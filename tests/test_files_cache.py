"""The files cache (engine/catalog.py ``files``, engine/snapshot.py): a file whose size,
mtime, ctime and inode match what the cache remembers, and whose chunks are all still
stored, is not read again; anything else is read, so a changed file is never taken from
the cache. A file changed within the racy window, or changing while read, is not
remembered; a file gone from the data dir is dropped from the cache."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from engine import Repository, apply_restore, create_snapshot, plan_restore
from engine import snapshot as snapshot_module
from engine.backends.s3 import S3Backend, S3Settings
from engine.catalog import CachedFile
from engine.errors import IntegrityError, SourceError
from engine.format import ChunkId
from engine.snapshot import RACY_WINDOW_NS, SnapshotOptions, SnapshotResult

from .conftest import Clock, s3_client

FILES = {"a/1.0.0/artifacts/package.tar.gz": os.urandom(3000), "a/2.0.0/artifacts/package.tar.gz": b"two" * 999,
         "b/0.1.0/screenshots/0": os.urandom(200_000), "b/0.1.0/artifacts/package.tar.gz": b"b"}


def _aged(root: Path) -> None:
    """Wait (on the file system's own clock) until every file is older than the racy
    window: the cache trusts only those."""
    newest = max(p.stat().st_ctime_ns for p in root.rglob("*"))
    while time.time_ns() - newest <= RACY_WINDOW_NS + 5_000_000:
        time.sleep(0.01)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for key, content in FILES.items():
        path = root / "blobs" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    _aged(root)
    return root


def snap(repo: Repository, data: Path, clock: Clock) -> SnapshotResult:
    clock.advance(minutes=1)
    return create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock))


def cached(repo: Repository, data: Path) -> dict[bytes, CachedFile]:
    return repo.catalog.load_files(str(data.absolute()))


def restore(repo: Repository, result: SnapshotResult, target: Path) -> dict[str, bytes]:
    apply_restore(repo, plan_restore(repo, result.info, target))
    return {p.relative_to(target / "blobs").as_posix(): p.read_bytes() for p in (target / "blobs").rglob("*")
            if p.is_file()}


def test_unchanged_files_are_not_read_again(repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    """The second snapshot of an unchanged data dir reads nothing and restores the same."""
    total = sum(map(len, FILES.values()))
    first = snap(repo, data, clock).stats
    assert (first["files"], first["files_new"], first["files_unmodified"], first["files_changed"]) == (4, 4, 0, 0)
    assert first["bytes_read"] == first["bytes_total"] == total
    assert first["requests"]["put"] == first["packs_written"] + first["index_objects_written"] == 3
    remembered = cached(repo, data)
    assert set(remembered) == {b"blobs/" + k.encode() for k in FILES}
    for key, content in FILES.items():
        st = (data / "blobs" / key).stat()
        entry = remembered[b"blobs/" + key.encode()]
        assert (entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode) == (
            len(content), st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        assert entry.chunks and entry.etag is None

    second = snap(repo, data, clock)
    stats = second.stats
    assert (stats["files"], stats["files_new"], stats["files_unmodified"], stats["files_changed"]) == (4, 0, 4, 0)
    assert stats["bytes_read"] == 0 and stats["bytes_total"] == total
    assert stats["requests"]["put"] == stats["packs_written"] == 0  # nothing new to store
    assert restore(repo, second, tmp_path / "restored") == FILES


def test_a_changed_file_is_read_again_even_with_its_old_size_and_mtime(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    """New bytes written in place, then the old mtime put back (as a copy tool might):
    the ctime still tells, and the snapshot holds the new bytes."""
    snap(repo, data, clock)
    key = "a/1.0.0/artifacts/package.tar.gz"
    path = data / "blobs" / key
    before = path.stat()
    changed = os.urandom(len(FILES[key]))
    path.write_bytes(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    _aged(data)
    result = snap(repo, data, clock)
    assert (result.stats["files_changed"], result.stats["files_unmodified"], result.stats["files_new"]) == (1, 3, 0)
    assert result.stats["bytes_read"] == len(changed)
    assert restore(repo, result, tmp_path / "restored") == {**FILES, key: changed}
    assert cached(repo, data)[b"blobs/" + key.encode()].ctime_ns == path.stat().st_ctime_ns


@pytest.mark.parametrize("field", ["size", "mtime_ns", "ctime_ns", "inode"])
def test_any_difference_from_the_cache_means_the_file_is_read(
        repo: Repository, data: Path, clock: Clock, field: str) -> None:
    """Each of size, mtime, ctime and inode decides on its own: a cache entry that differs
    from the file in any one of them is not trusted."""
    snap(repo, data, clock)
    rel = b"blobs/a/2.0.0/artifacts/package.tar.gz"
    entry = cached(repo, data)[rel]
    repo.catalog.update_files(str(data.absolute()), {rel: replace(entry, **{field: getattr(entry, field) + 1})}, [])
    result = snap(repo, data, clock)
    assert (result.stats["files_changed"], result.stats["files_unmodified"]) == (1, 3)
    assert result.stats["bytes_read"] == len(FILES["a/2.0.0/artifacts/package.tar.gz"])
    assert cached(repo, data)[rel] == entry  # remembered again as the file is


def test_a_cached_file_whose_chunks_are_not_all_stored_is_read(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    """A cache entry naming a chunk the repository does not hold (pruned, or a cache from
    elsewhere) must not be trusted: the snapshot would refer to data it lacks."""
    snap(repo, data, clock)
    rel = b"blobs/b/0.1.0/screenshots/0"
    entry = cached(repo, data)[rel]
    bogus = replace(entry, chunks=[*entry.chunks, ChunkId(os.urandom(32))])  # all but one stored
    repo.catalog.update_files(str(data.absolute()), {rel: bogus}, [])
    result = snap(repo, data, clock)
    assert (result.stats["files_changed"], result.stats["files_unmodified"]) == (1, 3)
    assert result.stats["bytes_read"] == len(FILES["b/0.1.0/screenshots/0"])
    assert restore(repo, result, tmp_path / "restored") == FILES
    assert cached(repo, data)[rel] == entry


def test_a_new_file_is_new_and_a_gone_file_leaves_the_cache(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    snap(repo, data, clock)
    shutil.rmtree(data / "blobs" / "a" / "2.0.0")
    added = data / "blobs" / "c" / "1.0.0" / "artifacts" / "package.tar.gz"
    added.parent.mkdir(parents=True)
    added.write_bytes(b"new package")
    _aged(data)
    result = snap(repo, data, clock)
    assert (result.stats["files_new"], result.stats["files_unmodified"], result.stats["files_changed"]) == (1, 3, 0)
    remembered = cached(repo, data)
    assert b"blobs/a/2.0.0/artifacts/package.tar.gz" not in remembered
    assert set(remembered) == {b"blobs/" + k.encode() for k in FILES if not k.startswith("a/2.0.0")} | {
        b"blobs/c/1.0.0/artifacts/package.tar.gz"}
    expected = {k: v for k, v in FILES.items() if not k.startswith("a/2.0.0")}
    assert restore(repo, result, tmp_path / "restored") == {**expected, "c/1.0.0/artifacts/package.tar.gz": b"new package"}


def test_files_changed_within_the_racy_window_are_not_remembered(
        repo: Repository, data: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose ctime is too close to the scan may change again within the same clock
    tick unnoticed: it is snapshotted but not cached, so the next snapshot reads it."""
    monkeypatch.setattr(snapshot_module, "RACY_WINDOW_NS", 3600 * 10**9)  # every file is "just written"
    first = snap(repo, data, clock)
    assert first.stats["files_new"] == 4 and cached(repo, data) == {}
    second = snap(repo, data, clock)
    assert second.stats["files_unmodified"] == 0 and second.stats["bytes_read"] == sum(map(len, FILES.values()))


def test_a_file_growing_while_read_is_stored_whole_but_not_remembered(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What was read is stored (all of it), but a file whose size moved during the read
    is not remembered: its cache entry would describe neither version."""
    key = "a/2.0.0/artifacts/package.tar.gz"
    path = data / "blobs" / key
    original = snapshot_module.chunk_stream

    def growing(handle, *args):  # type: ignore[no-untyped-def]
        if handle.name == os.fsencode(path):
            with open(path, "ab") as more:
                more.write(b"+appended")
        return original(handle, *args)

    monkeypatch.setattr(snapshot_module, "chunk_stream", growing)
    result = snap(repo, data, clock)
    remembered = cached(repo, data)
    assert b"blobs/" + key.encode() not in remembered and len(remembered) == 3
    assert restore(repo, result, tmp_path / "restored")[key] == FILES[key] + b"+appended"


def test_a_file_rewritten_after_the_listing_is_stored_and_remembered_as_read(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced between the listing and its read: the snapshot takes what it read,
    with the times of the file it opened, and the cache remembers that file, so the
    next snapshot does not read it again."""
    key = "a/1.0.0/artifacts/package.tar.gz"
    path = data / "blobs" / key
    original = snapshot_module._SnapshotBuilder.read_files
    mtime = 1_700_000_000_123_456_789

    def rewrite_then_read(self: snapshot_module._SnapshotBuilder, scan: snapshot_module.Scan) -> object:
        path.write_bytes(b"rewritten")
        os.utime(path, ns=(mtime, mtime))
        return original(self, scan)

    monkeypatch.setattr(snapshot_module._SnapshotBuilder, "read_files", rewrite_then_read)
    monkeypatch.setattr(snapshot_module, "RACY_WINDOW_NS", -3600 * 10**9)  # trust the just-written file
    first = snap(repo, data, clock)
    target = tmp_path / "restored"
    assert restore(repo, first, target)[key] == b"rewritten"
    assert (target / "blobs" / key).stat().st_mtime_ns == mtime
    assert cached(repo, data)[b"blobs/" + key.encode()].size == len(b"rewritten")
    monkeypatch.setattr(snapshot_module._SnapshotBuilder, "read_files", original)
    second = snap(repo, data, clock)
    assert second.stats["files_unmodified"] == 4 and second.stats["bytes_read"] == 0


def test_a_file_gone_before_its_read_is_vanished_and_one_unreadable_is_an_error(
        repo: Repository, data: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted between the listing and the read: as if deleted before (not partial).
    Something unreadable in its place: an error that names it (partial)."""
    original = snapshot_module._SnapshotBuilder.read_files

    def damage_then_read(self: snapshot_module._SnapshotBuilder, scan: snapshot_module.Scan) -> object:
        (data / "blobs" / "a" / "1.0.0" / "artifacts" / "package.tar.gz").unlink()
        unreadable = data / "blobs" / "a" / "2.0.0" / "artifacts" / "package.tar.gz"
        unreadable.unlink()
        unreadable.mkdir()
        return original(self, scan)

    monkeypatch.setattr(snapshot_module._SnapshotBuilder, "read_files", damage_then_read)
    result = snap(repo, data, clock)
    assert result.errors == ["blobs/a/2.0.0/artifacts/package.tar.gz: unreadable (Is a directory)"]
    assert result.info.record["partial"] and result.stats["files_vanished"] == 1
    assert result.stats["files"] == 2
    assert set(cached(repo, data)) == {b"blobs/b/0.1.0/screenshots/0", b"blobs/b/0.1.0/artifacts/package.tar.gz"}


def test_the_files_cache_keeps_each_source_apart(repo: Repository) -> None:
    """Entries are per source: updating or dropping a path of one source leaves another
    source's entry of the same path alone; the ETag round-trips."""
    one = CachedFile(10, 11, 12, 13, [ChunkId(b"\x01" * 32), ChunkId(b"\x02" * 32)])
    other = CachedFile(20, 21, 22, 23, [ChunkId(b"\x03" * 32)], etag='"abc"')
    repo.catalog.update_files("/data/one", {b"blobs/x": one, b"blobs/y": one}, [])
    repo.catalog.update_files("s3://bucket/store", {b"blobs/x": other}, [])
    assert repo.catalog.load_files("/data/one") == {b"blobs/x": one, b"blobs/y": one}
    assert repo.catalog.load_files("s3://bucket/store") == {b"blobs/x": other}
    repo.catalog.update_files("/data/one", {b"blobs/y": replace(one, size=99)}, [b"blobs/x"])
    assert repo.catalog.load_files("/data/one") == {b"blobs/y": replace(one, size=99)}
    assert repo.catalog.load_files("s3://bucket/store") == {b"blobs/x": other}
    assert repo.catalog.load_files("/data/none") == {}


# ---- a bucket source (--blobs s3://…): size and ETag decide ------------------------------------

@pytest.fixture
def blob_bucket(tmp_path: Path, s3_env: dict[str, str]) -> tuple[Path, str, str]:
    """A data dir whose blobs live in a (moto) bucket, the bucket, and the blob store's URL."""
    data = tmp_path / "bucketdata"
    (data / "db").mkdir(parents=True)
    (data / "db" / "notes.txt").write_bytes(b"the database lives here")
    (data / "blobs" / "stale").mkdir(parents=True)  # left from before the move to a bucket
    (data / "blobs" / "stale" / "old.tar.gz").write_bytes(b"not club's blobs any more")
    bucket = f"club-cache-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    for key, content in FILES.items():
        client.put_object(Bucket=bucket, Key=f"store/{key}", Body=content)
    return data, bucket, f"s3://{bucket}/store"


def snap_bucket(repo: Repository, data: Path, url: str, clock: Clock) -> SnapshotResult:
    """One snapshot with its own blob store object, as one `snapshot --blobs` run has;
    its progress ends at the total of files and objects."""
    clock.advance(minutes=1)
    store = S3Backend(url, S3Settings.from_environ(os.environ, "CLUBSNAP_BLOBS_S3_"))
    seen: list[snapshot_module.Progress] = []
    result = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock, blob_store=store,
                                                   progress=seen.append))
    assert seen[-1].files_done == seen[-1].files_total == result.stats["files"]
    return result


def test_bucket_objects_unchanged_in_size_and_etag_are_not_downloaded_again(
        repo: Repository, clock: Clock, tmp_path: Path, blob_bucket: tuple[Path, str, str]) -> None:
    """The bucket's files cache: an object of the size and ETag remembered, whose chunks
    are stored, costs no request; a replaced one (same size, new bytes) is read again; a
    deleted one leaves the cache; a cache entry naming a chunk not stored is not trusted."""
    data, bucket, store = blob_bucket
    with pytest.raises(SourceError, match="has no db/ directory"):  # the database must be local
        snap_bucket(repo, data / "blobs", store, clock)
    first = snap_bucket(repo, data, store, clock)
    assert first.stats["files_new"] == 5 and first.stats["blobs_requests"]["get"] == 4
    remembered = repo.catalog.load_files(store)
    assert set(remembered) == {b"blobs/" + k.encode() for k in FILES}
    assert all(e.etag and e.size == len(FILES[p.decode()[6:]]) for p, e in remembered.items())

    second = snap_bucket(repo, data, store, clock)
    assert second.stats["blobs_requests"]["get"] == 0
    assert second.stats["files_unmodified"] == 5 and second.stats["bytes_read"] == 0

    client = s3_client()
    key = "a/1.0.0/artifacts/package.tar.gz"
    changed = bytes(b ^ 0xFF for b in FILES[key])
    client.put_object(Bucket=bucket, Key=f"store/{key}", Body=changed)
    client.delete_object(Bucket=bucket, Key="store/b/0.1.0/artifacts/package.tar.gz")
    rel = b"blobs/b/0.1.0/screenshots/0"
    entry = repo.catalog.load_files(store)[rel]
    repo.catalog.update_files(store, {rel: replace(entry, chunks=[*entry.chunks, ChunkId(os.urandom(32))])}, [])
    third = snap_bucket(repo, data, store, clock)
    assert third.stats["files_changed"] == 2 and third.stats["files_unmodified"] == 2  # and db/notes.txt
    assert third.stats["blobs_requests"]["get"] == 2
    remembered = repo.catalog.load_files(store)
    assert set(remembered) == {b"blobs/" + k.encode() for k in FILES if k != "b/0.1.0/artifacts/package.tar.gz"}
    assert remembered[rel] == entry
    got = restore(repo, third, tmp_path / "restored")
    assert got == {**{k: v for k, v in FILES.items() if k != "b/0.1.0/artifacts/package.tar.gz"}, key: changed}
    assert snap_bucket(repo, data, store, clock).stats["blobs_requests"]["get"] == 0


def test_a_damaged_files_cache_entry_is_named_as_such(repo: Repository) -> None:
    """An undecodable entry says it is the files cache (a cache: --cache-dir elsewhere
    rebuilds it), not some repository record."""
    repo.catalog.update_files("/data", {b"blobs/x": CachedFile(1, 2, 3, 4, [ChunkId(b"\x01" * 32)])}, [])
    conn = sqlite3.connect(repo.catalog.path, isolation_level=None)
    try:
        conn.execute("UPDATE files SET chunks = ? WHERE source = '/data'", (b"\xc1\xff\x00",))
    finally:
        conn.close()
    with pytest.raises(IntegrityError, match=r"^files cache: undecodable record"):
        repo.catalog.load_files("/data")
