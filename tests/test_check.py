"""`check` on a real repository, in process: each kind of damage is reported once, in words
that name the object and the files that need it, with and without reading data back (in
whole or a sampled fraction), and the verdict is stored for `status`.

Packs are kept small (4 KiB) so that each file's chunk sits in a pack of its own or with
one other, and a damaged pack names a known file."""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from engine import Repository, check, create_snapshot
from engine.backends.fs import FsBackend
from engine.damage import latest_check, read_damage
from engine.errors import BackendError, ObjectNotFound
from engine.format import (
    DAMAGE_PREFIX, DATA_PREFIX, GARBAGE_PREFIX, INDEX_PREFIX, SUMMARY_PREFIX, ChunkId, Kind, PackId, digest,
    open_object,
    pack_key, seal_object,
)
from engine.repository import SnapshotInfo
from engine.snapshot import SnapshotOptions
from engine.tree import lookup

from .conftest import Clock, reopen

UNINDEXED = ("pack(s) not in any index (left by an interrupted run; their chunks are uploaded again when "
             "needed, and prune deletes them)")
DAMAGE_RECORDED = re.compile(r"^damage recorded in damage/\S+: the next snapshot stores those blobs again from "
                             r"the source; then 'clubsnap repair packs' salvages the rest$")
NO_INTACT_COPY = ("1 damaged blob(s) have no intact copy yet: a snapshot of a data dir that still has them stores "
                  "them again")


class Two:
    """Two snapshots of a three-file data dir; b.bin changed in between. Files are read
    one at a time, so which chunks share a pack is the same on every run."""

    def __init__(self, repo: Repository, clock: Clock, root: Path) -> None:
        self.repo, self.root = repo, Path(repo.backend.location)
        repo.config = replace(repo.config, pack_size=4096)
        data = root / "data"
        (data / "blobs" / "sub").mkdir(parents=True)
        (data / "db").mkdir()
        rnd = random.Random(5)
        for name in ("a.bin", "b.bin", "sub/c.bin"):
            (data / "blobs" / name).write_bytes(rnd.randbytes(3000))
        self.first = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock, workers=1)).info
        clock.advance(minutes=1)
        (data / "blobs" / "b.bin").write_bytes(rnd.randbytes(3000))
        self.second = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock, workers=1)).info

    def packs(self) -> dict[str, int]:
        return dict(self.repo.backend.list(DATA_PREFIX))

    def pack_of(self, snap: SnapshotInfo, rel: bytes) -> tuple[str, int, int]:
        """The key of the pack holding the file's (single) chunk, and where the chunk is."""
        entry = lookup(self.repo, snap.tree, rel)[-1]  # type: ignore[index]
        (chunk,) = entry["chunks"]
        found = self.repo.catalog.lookup(chunk)
        assert found is not None
        return pack_key(found.pack), found.offset, found.length

    def chunks_in(self, key: str) -> dict[bytes, str]:
        """The files (path in the second snapshot or the first) whose chunk is in the pack."""
        pack = PackId.from_hex(key.rsplit("/", 1)[-1])
        found = {}
        for snap in (self.first, self.second):
            for rel in (b"blobs/a.bin", b"blobs/b.bin", b"blobs/sub/c.bin"):
                (chunk,) = lookup(self.repo, snap.tree, rel)[-1]["chunks"]  # type: ignore[index]
                entry = self.repo.catalog.lookup(chunk)
                if entry is not None and entry.pack == pack:
                    found[rel] = entry.id.short()
        return found

    def chunk_ids_in(self, key: str) -> list[bytes]:
        pack = PackId.from_hex(key.rsplit("/", 1)[-1])
        return [bytes(e.id) for e in self.repo.catalog.blobs_in_pack(pack)]

    def flip(self, key: str, at: int) -> None:
        path = self.root / key
        raw = bytearray(path.read_bytes())
        raw[at] ^= 0xFF
        path.chmod(0o600)
        path.write_bytes(bytes(raw))


@pytest.fixture
def two(repo: Repository, clock: Clock, tmp_path: Path) -> Two:
    return Two(repo, clock, tmp_path)


def _damage_records(repo: Repository) -> list[dict[str, object]]:
    """The damage records (format §6.14), as the next snapshot and `repair` read them."""
    found = []
    for key, _ in repo.backend.list(DAMAGE_PREFIX):
        record = read_damage(repo.backend, repo.cipher, key[len(DAMAGE_PREFIX):])
        found.append({"found_by": record["found_by"],
                      "packs": [(pack_key(PackId(p["id"])), p["missing"], sorted(p["blobs"])) for p in record["packs"]]})
    return found


def _last_check(repo: Repository) -> dict[str, object]:
    record = latest_check(repo.backend, repo.cipher)
    assert record is not None
    return {k: record[k] for k in ("read_data", "ok", "error_count", "errors")}


# ---- a sound repository --------------------------------------------------------------------

def test_a_sound_repository_checks_clean_and_counts_what_it_checked(two: Two) -> None:
    report = check(two.repo)
    assert report.ok and report.errors == [] and report.warnings == []
    # Root, blobs/, blobs/sub/ and db/ of the first; a new root and blobs/ for the second.
    assert (report.snapshots, report.trees, report.packs, report.packs_read) == (2, 6, len(two.packs()), 0)
    assert _last_check(two.repo) == {"read_data": None, "ok": True, "error_count": 0, "errors": []}


def test_reading_data_back_reads_every_pack_once_and_reports_progress(two: Two) -> None:
    progress: list[tuple[int, int]] = []
    report = check(two.repo, read_data=True, progress=lambda done, total: progress.append((done, total)))
    packs = len(two.packs())
    assert report.ok and report.warnings == [] and report.packs_read == packs == 5
    assert progress == [(n, packs) for n in range(1, packs + 1)]
    assert _last_check(two.repo) == {"read_data": 1.0, "ok": True, "error_count": 0, "errors": []}


@pytest.mark.parametrize(("subset", "read"), [(0.01, 1), (0.2, 1), (0.5, 2), (0.6, 3), (1.0, 5)])
def test_a_subset_reads_that_fraction_of_the_packs_at_least_one(two: Two, subset: float, read: int) -> None:
    progress: list[tuple[int, int]] = []
    report = check(two.repo, subset=subset, rng=random.Random(3), progress=lambda d, t: progress.append((d, t)))
    assert report.ok and report.packs_read == read and progress[-1] == (read, read)
    assert _last_check(two.repo)["read_data"] == subset


def test_a_subset_finds_damage_in_the_packs_it_samples(two: Two) -> None:
    """Which packs a subset reads is random: over enough checks every pack is read."""
    key, offset, length = two.pack_of(two.first, b"blobs/a.bin")
    two.flip(key, offset + length // 2)
    read_back = f"{key}: pack content does not match its name (corrupted)"
    found = [read_back in check(two.repo, subset=0.2, rng=random.Random(seed)).errors for seed in range(12)]
    assert any(found) and not all(found)


def test_an_empty_repository_checks_clean_even_with_a_subset(repo: Repository) -> None:
    report = check(repo, subset=0.5)
    assert report.ok and (report.snapshots, report.trees, report.packs, report.packs_read) == (0, 0, 0, 0)


# ---- packs ---------------------------------------------------------------------------------

def test_a_missing_pack_is_reported_and_recorded_as_damage(two: Two) -> None:
    """Every blob the index places in a missing pack is lost: the check says so, records
    the damage (the next snapshot stores those blobs again), and from then on names the
    files of every snapshot that need them."""
    key, _, _ = two.pack_of(two.first, b"blobs/a.bin")
    lost = two.chunks_in(key)
    assert set(lost) == {b"blobs/a.bin", b"blobs/b.bin"}  # b.bin as the first snapshot had it
    (two.root / key).unlink()
    report = check(two.repo)
    assert report.errors == [f"{key}: indexed pack is missing"] and not report.ok
    assert (report.snapshots, report.trees, report.packs) == (2, 6, 4)
    assert len(report.warnings) == 2 and DAMAGE_RECORDED.match(report.warnings[0])
    assert report.warnings[1] == NO_INTACT_COPY.replace("1 damaged", "2 damaged")
    ids = sorted(bytes(c) for c in two.chunk_ids_in(key))
    assert _damage_records(two.repo) == [{"found_by": "check", "packs": [(key, True, ids)]}]
    again = check(two.repo)
    first, second = two.first.id.short(), two.second.id.short()
    assert again.errors == [f"{key}: indexed pack is missing",
                            f"snapshot {first} blobs/a.bin: chunk {lost[b'blobs/a.bin']} missing",
                            f"snapshot {first} blobs/b.bin: chunk {lost[b'blobs/b.bin']} missing",
                            f"snapshot {second} blobs/a.bin: chunk {lost[b'blobs/a.bin']} missing"]
    assert again.warnings == [NO_INTACT_COPY.replace("1 damaged", "2 damaged")]
    assert _last_check(two.repo) == {"read_data": None, "ok": False, "error_count": 4, "errors": again.errors}


def test_a_pack_of_another_size_than_indexed_is_damage(two: Two) -> None:
    """Its blobs may all read back intact: still, the pack is not the one indexed, and
    every blob the index places there counts as lost."""
    key, _, _ = two.pack_of(two.first, b"blobs/sub/c.bin")
    ids = sorted(two.chunk_ids_in(key))
    (only,) = ids  # c.bin's chunk is alone in its pack
    size = two.packs()[key]
    with open(two.root / key, "ab") as handle:
        handle.write(b"\0" * 10)
    report = check(two.repo, read_data=True)
    assert report.errors[0] == f"{key}: size {size + 10} differs from indexed {size}"
    assert DAMAGE_RECORDED.match(report.warnings[0])
    assert [r["packs"] for r in _damage_records(two.repo)] == [[(key, True, ids)]]
    assert check(two.repo).errors[:2] == [f"{key}: size {size + 10} differs from indexed {size}",
                                          f"snapshot {two.first.id.short()} blobs/sub/c.bin: chunk "
                                          f"{ChunkId(only).short()} missing"]


def test_a_damaged_blob_is_found_by_reading_back_and_its_files_are_named(two: Two) -> None:
    """Only the blob that fails is damaged: the other blob of its pack still restores,
    and the files named are exactly those that need the damaged one, per snapshot."""
    key, offset, length = two.pack_of(two.first, b"blobs/a.bin")
    two.flip(key, offset + length // 2)
    assert check(two.repo).ok  # the structure is sound: only reading the data shows it
    report = check(two.repo, read_data=True)
    first, second = two.first.id.short(), two.second.id.short()
    assert report.errors == [f"{key}: pack content does not match its name (corrupted)",
                             f"snapshot {first} blobs/a.bin: damaged data",
                             f"snapshot {second} blobs/a.bin: damaged data"]
    assert report.packs_read == 5 and DAMAGE_RECORDED.match(report.warnings[0])
    assert report.warnings[1:] == [NO_INTACT_COPY]
    assert _last_check(two.repo) == {"read_data": 1.0, "ok": False, "error_count": 3, "errors": report.errors}
    chunk = two.chunks_in(key)
    (a_bin,) = lookup(two.repo, two.first.tree, b"blobs/a.bin")[-1]["chunks"]  # type: ignore[index]
    assert _damage_records(two.repo) == [{"found_by": "check", "packs": [(key, False, [bytes(a_bin)])]}]
    # Recorded: a check that reads nothing reports it as well, until it is repaired.
    later = check(two.repo)
    assert later.errors == [f"snapshot {first} blobs/a.bin: chunk {chunk[b'blobs/a.bin']} missing",
                            f"snapshot {second} blobs/a.bin: chunk {chunk[b'blobs/a.bin']} missing",
                            f"{key}: recorded as damaged; run 'clubsnap repair packs'"]
    assert later.warnings == [NO_INTACT_COPY]


class _Faulty(FsBackend):
    """The real local backend with faults injected on GETs of one key: whole-object reads
    come back garbled ``garble`` times, fail as an unreachable storage would (``fail``), or
    as if the object had been deleted since the listing (``vanished``)."""

    def __init__(self, root: Path, key: str, garble: int = 0, fail: bool = False, vanished: bool = False,
                 garble_ranges: int = 0) -> None:
        super().__init__(root)
        self.key, self.garble, self.fail, self.vanished, self.garble_ranges = key, garble, fail, vanished, garble_ranges

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super().get(key, offset, length)
        if key != self.key:
            return data
        if self.vanished:
            raise ObjectNotFound(f"{key}: not found (injected)")
        if self.fail:
            raise BackendError(f"{key}: connection reset (injected)")
        whole = offset == 0 and length is None
        if whole and self.garble or not whole and self.garble_ranges:
            if whole:
                self.garble -= 1
            else:
                self.garble_ranges -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:] if len(data) > 1 else data
            return data[:8] + bytes([data[8] ^ 0xFF]) + data[9:] if whole else data
        return data


def _faulty(two: Two, tmp_path: Path, **faults: object) -> Iterator[Repository]:
    key, _, _ = two.pack_of(two.first, b"blobs/a.bin")
    repo = Repository.open(_Faulty(two.root, key, **faults), tmp_path / "faulty-cache")  # type: ignore[arg-type]
    try:
        yield repo
    finally:
        repo.close()


def test_a_read_garbled_once_on_its_way_is_no_damage(two: Two, tmp_path: Path) -> None:
    for repo in _faulty(two, tmp_path, garble=1):
        report = check(repo, read_data=True)
        assert report.ok and report.packs_read == 5
        assert not list(repo.backend.list(DAMAGE_PREFIX))


def test_a_pack_garbled_twice_whose_blobs_read_right_loses_no_blob(two: Two, tmp_path: Path) -> None:
    """Two whole reads fail, yet each blob read on its own is intact (or fails only
    once): the pack is reported, and no file is named as damaged."""
    key, _, _ = two.pack_of(two.first, b"blobs/a.bin")
    for repo in _faulty(two, tmp_path, garble=2, garble_ranges=1):
        report = check(repo, read_data=True)
        assert report.errors == [f"{key}: pack content does not match its name (corrupted)"]
        assert report.packs_read == 5


def test_a_pack_that_cannot_be_read_is_an_error_but_no_damage(two: Two, tmp_path: Path) -> None:
    key, _, _ = two.pack_of(two.first, b"blobs/a.bin")
    for repo in _faulty(two, tmp_path, fail=True):
        report = check(repo, read_data=True)
        assert report.errors == [f"{key}: not read back ({key}: connection reset (injected))"]
        assert report.packs_read == 5 and report.warnings == []
        assert not list(repo.backend.list(DAMAGE_PREFIX))


def test_a_pack_gone_between_listing_and_reading_is_missing(two: Two, tmp_path: Path) -> None:
    key, _, _ = two.pack_of(two.first, b"blobs/a.bin")  # a data pack: no tree is read from it
    for repo in _faulty(two, tmp_path, vanished=True):
        report = check(repo, read_data=True)
        assert report.errors == [f"{key}: indexed pack is missing"]
        assert report.packs_read == 4  # the others


def test_a_pack_not_in_any_index_is_a_warning(two: Two) -> None:
    """Left by an interrupted run: harmless, and counted."""
    key = next(iter(two.packs()))
    stray = PackId(digest(b"stray"))
    (two.root / pack_key(stray)).parent.mkdir(exist_ok=True)
    shutil.copy(two.root / key, two.root / pack_key(stray))
    report = check(two.repo)
    assert report.ok and report.packs == 6 and report.warnings == [f"1 {UNINDEXED}"]
    assert check(two.repo, read_data=True).packs_read == 5  # nothing needs it: not read back


# ---- records and trees ---------------------------------------------------------------------

def test_a_damaged_snapshot_record_is_reported(two: Two, tmp_path: Path) -> None:
    two.flip(two.first.key, 40)
    fresh = reopen(two.repo, tmp_path / "fresh")  # a host that never cached the record
    report = check(fresh)
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{two.first.key}: ")
    assert report.snapshots == 1
    fresh.close()


def test_a_snapshot_record_under_another_name_is_reported(two: Two) -> None:
    """Its content is intact, but not what its name says: another snapshot's id, or
    another time (which would pass an old snapshot for a newer one)."""
    data = (two.root / two.first.key).read_bytes()
    renamed = two.first.key.replace(two.first.id.hex(), two.second.id.hex())
    retimed = two.first.key.replace("20260409T100000", "20260409T110000")
    for key in (renamed, retimed):
        (two.root / key).write_bytes(data)
    report = check(two.repo)
    assert sorted(report.errors) == sorted([f"{renamed}: content does not match its name (corrupted)",
                                            f"{retimed}: the time in the name differs from the record's "
                                            f"(2026-04-09T10:00:00+00:00)"])
    assert report.snapshots == 2


def test_a_damaged_index_object_and_the_files_it_leaves_without_chunks(two: Two, tmp_path: Path) -> None:
    """A new host cannot use a damaged index object: check re-reads each from storage
    (never trusting the catalog's copy), and names the files whose chunks it held."""
    key = min(k for k, _ in two.repo.backend.list(INDEX_PREFIX))
    record = open_object(Kind.INDEX, (two.root / key).read_bytes(), key, two.repo.cipher)
    two.flip(key, len((two.root / key).read_bytes()) // 2)
    assert check(two.repo).errors == [f"{key}: content does not match its name (corrupted)"]
    fresh = reopen(two.repo, tmp_path / "fresh")
    report = check(fresh)
    assert report.errors[0] == f"{key}: content does not match its name (corrupted)"
    assert all(e.startswith("snapshot ") and e.endswith(" missing") for e in report.errors[1:])
    assert len(report.errors) > 1 and report.warnings == [f"{len(record['packs'])} {UNINDEXED}"]
    fresh.close()


def test_a_damaged_tree_is_reported_with_its_snapshot_and_directory(two: Two, tmp_path: Path) -> None:
    sub = lookup(two.repo, two.first.tree, b"blobs/sub")[-1]  # type: ignore[index]
    found = two.repo.catalog.lookup(sub["tree"])
    assert found is not None
    two.flip(pack_key(found.pack), found.offset + found.length // 2)
    fresh = reopen(two.repo, tmp_path / "fresh")  # no tree cache: read from storage
    report = check(fresh)
    assert report.errors[0].startswith(f"snapshot {two.first.id.short()} blobs/sub/: {pack_key(found.pack)}: blob ")
    assert report.errors[1:] == [f"{pack_key(found.pack)}: recorded as damaged; run 'clubsnap repair packs'"]
    assert report.trees == 5  # the damaged one is not counted; the second snapshot shares it
    fresh.close()


def test_the_rest_of_a_snapshot_is_checked_past_a_damaged_tree(two: Two, tmp_path: Path) -> None:
    """db/ is read first (the walk takes the last entry first): its damage must not end
    the walk of that snapshot, whose blobs/ still gets checked."""
    db = lookup(two.repo, two.first.tree, b"db")[-1]  # type: ignore[index]
    found = two.repo.catalog.lookup(db["tree"])
    assert found is not None
    two.flip(pack_key(found.pack), found.offset + found.length // 2)
    fresh = reopen(two.repo, tmp_path / "fresh")
    report = check(fresh)
    assert report.errors[0].startswith(f"snapshot {two.first.id.short()} db/: ") and len(report.errors) == 2
    assert report.trees == 5  # all but db/
    fresh.close()


def test_a_damaged_root_tree_is_reported_as_slash(two: Two, tmp_path: Path) -> None:
    found = two.repo.catalog.lookup(two.second.tree)
    assert found is not None
    two.flip(pack_key(found.pack), found.offset + found.length // 2)
    fresh = reopen(two.repo, tmp_path / "fresh")
    report = check(fresh)
    assert any(e.startswith(f"snapshot {two.second.id.short()} /: ") for e in report.errors)
    fresh.close()


def test_a_damaged_summary_or_garbage_record_is_only_a_warning(two: Two) -> None:
    """Summaries only save requests, and prune condemns a damaged garbage record's packs
    again: neither fails the check."""
    two.repo.write_summary()
    (summary,) = [k for k, _ in two.repo.backend.list(SUMMARY_PREFIX)]
    intact = (two.root / summary).read_bytes()
    # Named by the hash after the last "_", whatever comes before it; a name without one
    # names no hash at all.
    (two.root / f"{SUMMARY_PREFIX}odd_name_{digest(intact).hex()}").write_bytes(intact)
    unnamed = f"{SUMMARY_PREFIX}{digest(intact).hex()}"
    (two.root / unnamed).write_bytes(intact)
    two.flip(summary, len((two.root / summary).read_bytes()) // 2)
    garbage = f"{GARBAGE_PREFIX}{'0' * 64}"
    (two.root / garbage).parent.mkdir(exist_ok=True)
    (two.root / garbage).write_bytes(seal_object(Kind.GARBAGE, {"packs": [], "waiting_for": None}, two.repo.cipher))
    junk = f"{GARBAGE_PREFIX}{'1' * 64}"
    (two.root / junk).write_bytes(b"junk" * 20)
    junk_summary = summary.rsplit("_", 1)[0] + f"_{'2' * 64}"
    (two.root / junk_summary).write_bytes(b"junk" * 20)
    report = check(two.repo)
    assert report.ok
    garbage_warning = (f"{garbage}: content does not match its name (corrupted) (a garbage record: prune "
                       f"condemns its packs again)")
    junk_warning = f"{junk}: not a clubsnap object (bad magic) (a garbage record: prune condemns its packs again)"
    # Once as the index sync met them, once as the check re-read them.
    assert sorted(report.warnings[:4]) == [garbage_warning, garbage_warning, junk_warning, junk_warning]
    assert sorted(report.warnings[4:]) == sorted([
        f"{summary}: content does not match its name (corrupted) (a snapshot summary: listing falls back to the "
        f"records)",
        f"{junk_summary}: not a clubsnap object (bad magic) (a snapshot summary: listing falls back to the records)",
        f"{unnamed}: content does not match its name (corrupted) (a snapshot summary: listing falls back to the "
        f"records)"])


def test_packs_a_prune_condemned_are_read_and_their_blobs_count(two: Two, tmp_path: Path) -> None:
    """A snapshot that finished while a prune ran may use blobs of a condemned pack until
    the next prune re-indexes them: no chunk is missing, and reading data reads them."""
    key = min(k for k, _ in two.repo.backend.list(INDEX_PREFIX))
    data = (two.root / key).read_bytes()
    record = open_object(Kind.INDEX, data, key, two.repo.cipher)
    condemned = seal_object(Kind.GARBAGE, {"packs": record["packs"], "waiting_for": None}, two.repo.cipher)
    (two.root / GARBAGE_PREFIX).mkdir(exist_ok=True)
    (two.root / f"{GARBAGE_PREFIX}{digest(condemned).hex()}").write_bytes(condemned)
    (two.root / key).unlink()
    fresh = reopen(two.repo, tmp_path / "fresh")
    report = check(fresh, read_data=True)
    assert report.ok and report.warnings == [] and report.packs_read == 5
    fresh.close()


def test_a_repository_that_cannot_be_listed_fails_the_check_at_once(two: Two, tmp_path: Path) -> None:
    class Unlistable(FsBackend):
        def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:  # type: ignore[override]
            if prefix.startswith("snapshots/"):
                raise BackendError(f"{prefix}: listing refused (injected)")
            return super().list(prefix)

    repo = Repository.open(Unlistable(two.root), tmp_path / "c")
    report = check(repo)
    assert report.errors == ["snapshots/: listing refused (injected)"] and report.snapshots == 0
    repo.close()


# ---- damage recorded earlier ---------------------------------------------------------------

def _index_object_of(two: Two, key: str) -> str:
    """The index object that places blobs in the pack ``key``."""
    pack = bytes(PackId.from_hex(key.rsplit("/", 1)[-1]))
    for index, _ in two.repo.backend.list(INDEX_PREFIX):
        record = open_object(Kind.INDEX, (two.root / index).read_bytes(), index, two.repo.cipher)
        if any(bytes(p["id"]) == pack for p in record["packs"]):
            return index
    raise AssertionError(f"no index object names {key}")


def test_a_pack_put_back_after_its_loss_was_recorded_stays_damaged_until_repaired(two: Two) -> None:
    """Recorded as missing, then found again (copied back from elsewhere): its blobs are
    still counted as lost until `repair packs` settles it, and the check says so."""
    key, _, _ = two.pack_of(two.first, b"blobs/a.bin")
    saved = (two.root / key).read_bytes()
    (two.root / key).unlink()
    assert not check(two.repo).ok
    (two.root / key).write_bytes(saved)
    report = check(two.repo)
    assert f"{key}: recorded as damaged (missing); run 'clubsnap repair packs'" in report.errors


class _NoDeletes(FsBackend):
    """Read-only credentials, as far as deleting goes."""

    def delete(self, key: str) -> None:
        raise BackendError(f"{key}: delete refused (injected)")


def test_recorded_damage_of_a_pack_the_index_no_longer_names_but_storage_holds(two: Two, tmp_path: Path) -> None:
    key, offset, length = two.pack_of(two.first, b"blobs/a.bin")
    two.flip(key, offset + length // 2)
    assert not check(two.repo, read_data=True).ok
    (two.root / _index_object_of(two, key)).unlink()
    fresh = reopen(two.repo, tmp_path / "fresh")
    report = check(fresh)
    assert f"{key}: recorded as damaged; run 'clubsnap repair packs'" in report.errors
    fresh.close()


def test_recorded_damage_of_a_pack_gone_from_storage_and_index_is_settled(two: Two, tmp_path: Path) -> None:
    """A repair elsewhere removed the pack and its index entries; this host cannot delete
    the damage record, yet the check does not report a pack nothing refers to."""
    key, offset, length = two.pack_of(two.first, b"blobs/a.bin")
    two.flip(key, offset + length // 2)
    assert not check(two.repo, read_data=True).ok
    (two.root / _index_object_of(two, key)).unlink()
    (two.root / key).unlink()
    fresh = Repository.open(_NoDeletes(two.root), tmp_path / "fresh")
    report = check(fresh)
    assert not [e for e in report.errors if "recorded as damaged" in e] and list(fresh.backend.list(DAMAGE_PREFIX))
    fresh.close()


def test_an_encrypted_repository_is_checked_through_its_key(tmp_path: Path, clock: Clock) -> None:
    from engine import open_backend

    repo = Repository.init(open_backend(str(tmp_path / "encrypted")), tmp_path / "cache", clock,
                           password=b"secret", kdf_log2_n=10)
    two = Two(repo, clock, tmp_path)
    two.repo.write_summary()
    report = check(repo, read_data=True)
    assert report.ok and report.warnings == [] and (report.snapshots, report.packs_read) == (2, 5)
    key, offset, length = two.pack_of(two.first, b"blobs/b.bin")
    two.flip(key, offset + length // 2)
    damaged = check(repo, read_data=True)
    assert damaged.errors[1:] == [f"snapshot {two.first.id.short()} blobs/b.bin: damaged data"]
    repo.close()


# ---- databases: chunks through page maps ---------------------------------------------------

def _club_db(path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE numbered(n INTEGER PRIMARY KEY, pad BLOB)")
    conn.executemany("INSERT INTO numbered VALUES (?, randomblob(500))", [(i,) for i in range(1, 61)])
    conn.commit()
    conn.close()


@pytest.fixture
def with_db(repo: Repository, clock: Clock, tmp_path: Path) -> Two:
    """Two snapshots of a data dir with an unchanged database, touched in between: two
    db/ trees (the file's times differ), one page map."""
    import os
    import time

    data = tmp_path / "data"
    (data / "db").mkdir(parents=True)
    _club_db(data / "db" / "club.db")
    (data / "blobs").mkdir()
    past = time.time() - 60  # old enough to be trusted: the second snapshot reuses the map
    two = Two.__new__(Two)
    two.repo, two.root = repo, Path(repo.backend.location)
    snaps = []
    for n in range(2):
        os.utime(data / "db" / "club.db", (past + n, past + n))
        snaps.append(create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock, workers=1)).info)
        clock.advance(minutes=1)
    two.first, two.second = snaps
    return two


def _page_map(two: Two, snap: SnapshotInfo) -> bytes:
    return lookup(two.repo, snap.tree, b"db/club.db")[-1]["page_map"]  # type: ignore[index,no-any-return]


def test_a_lost_database_page_is_named_once_for_the_map_both_snapshots_share(with_db: Two) -> None:
    two = with_db
    assert _page_map(two, two.first) == _page_map(two, two.second)
    assert two.first.tree != two.second.tree
    assert check(two.repo).ok
    page_pack = max(two.packs().items(), key=lambda item: item[1])[0]
    (two.root / page_pack).unlink()
    assert check(two.repo).errors == [f"{page_pack}: indexed pack is missing"]
    again = check(two.repo)
    assert again.errors[0] == f"{page_pack}: indexed pack is missing"
    missing = [e for e in again.errors if e.startswith("snapshot ")]
    assert len(missing) == 1 and missing[0].startswith(f"snapshot {two.first.id.short()} db/club.db: chunk ")


def test_a_damaged_database_page_names_the_database_in_each_snapshot(with_db: Two) -> None:
    two = with_db
    page_pack = max(two.packs().items(), key=lambda item: item[1])[0]
    two.flip(page_pack, two.packs()[page_pack] // 2)
    report = check(two.repo, read_data=True)
    assert report.errors[1:] == [f"snapshot {two.first.id.short()} db/club.db: damaged data",
                                 f"snapshot {two.second.id.short()} db/club.db: damaged data"]


def test_a_damaged_page_map_is_reported_with_the_database_it_maps(with_db: Two, tmp_path: Path) -> None:
    two = with_db
    found = two.repo.catalog.lookup(_page_map(two, two.first))
    assert found is not None
    two.flip(pack_key(found.pack), found.offset + found.length // 2)
    fresh = reopen(two.repo, tmp_path / "fresh")  # no local copy of the map
    report = check(fresh)
    assert report.errors[0].startswith(f"snapshot {two.first.id.short()} db/club.db: page map: ")
    assert len([e for e in report.errors if "page map" in e]) == 2  # the second snapshot's too: it was not read
    fresh.close()


def test_files_of_later_snapshots_are_named_past_one_whose_tree_is_damaged(two: Two, tmp_path: Path) -> None:
    key, offset, length = two.pack_of(two.first, b"blobs/a.bin")
    two.flip(key, offset + length // 2)
    root = two.repo.catalog.lookup(two.first.tree)  # the first snapshot's root: its alone
    assert root is not None
    two.flip(pack_key(root.pack), root.offset + root.length // 2)
    fresh = reopen(two.repo, tmp_path / "fresh")
    report = check(fresh, read_data=True)
    assert f"snapshot {two.second.id.short()} blobs/a.bin: damaged data" in report.errors
    assert f"snapshot {two.first.id.short()} blobs/a.bin: damaged data" not in report.errors  # unreadable
    fresh.close()


class _Counting(FsBackend):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pack_reads = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith(DATA_PREFIX) and offset == 0 and length is None:
            self.pack_reads += 1
        return super().get(key, offset, length)


def test_an_encrypted_repository_reads_each_pack_back_once(tmp_path: Path, clock: Clock) -> None:
    """A pack that checks out is read once: a second read is only for one that failed."""
    from engine import open_backend

    repo = Repository.init(open_backend(str(tmp_path / "encrypted")), tmp_path / "cache", clock,
                           password=b"secret", kdf_log2_n=10)
    Two(repo, clock, tmp_path)
    repo.close()
    counting = _Counting(tmp_path / "encrypted")
    again = Repository.open(counting, tmp_path / "cache2", password=lambda: b"secret")
    counting.pack_reads = 0
    report = check(again, read_data=True)
    assert report.ok and report.packs_read == 5 and counting.pack_reads == 5
    again.close()
