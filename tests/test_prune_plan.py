"""What prune plans and reports, against what it then does: the counts of `prune --json`
and of the dry run must match the packs that go, and whatever goes, every kept snapshot
still checks and restores (format §10).

The repositories here are built so that each kind of pack is there at least twice
(wholly unused, partly unused, waited for), with a small pack size: the report's sums
then tell a count from a flag, and the repack choice is not hidden by the merging of
small packs."""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from engine import PruneOptions, Repository, apply_restore, check, create_snapshot, open_backend, plan_restore, prune
from engine.format import GARBAGE_PREFIX, INDEX_PREFIX, ChunkId, Kind, PackId, open_object, unpack_record
from engine.errors import RepositoryLocked
from engine.forget import remove_snapshots
from engine.locks import Lock, this_host
from engine.snapshot import SnapshotOptions
from engine.tree import walk

from .conftest import TEST_PASSWORD, Clock, reopen

prune_module = importlib.import_module("engine.prune")  # `engine.prune` is also the function

PACK_SIZE = 50_000   # four 15 kB files per pack: no data pack is "small" (below a quarter)
FILE_SIZE = 15_000   # below the chunker's minimum: one blob per file


class Club:
    """A data dir of incompressible files under blobs/, snapshotted into ``repo``."""

    def __init__(self, repo: Repository, root: Path, clock: Clock) -> None:
        self.repo, self.root, self.clock = repo, root, clock
        (root / "blobs").mkdir(parents=True)
        repo.config = replace(repo.config, pack_size=PACK_SIZE)

    def write(self, *names: str) -> None:
        for name in names:
            (self.root / "blobs" / name).write_bytes(os.urandom(FILE_SIZE))

    def remove(self, *names: str) -> None:
        for name in names:
            (self.root / "blobs" / name).unlink()

    def snapshot(self, repo: Repository | None = None) -> Any:
        time.sleep(0.05)  # past the files cache's racy-timestamp window (not synchronisation)
        self.clock.advance(minutes=10)
        return create_snapshot(repo or self.repo, SnapshotOptions(source=self.root, host="h", now=self.clock,
                                                                  workers=1)).info

    def state(self) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (self.root / "blobs").iterdir()}


@pytest.fixture
def secret_repo(tmp_path: Path, clock: Clock) -> Any:
    """An encrypted repository (what `init` makes by default): every object prune writes
    must be sealed under its key, or no reader can open it."""
    repository = Repository.init(open_backend(str(tmp_path / "secret-repo")), tmp_path / "secret-cache", clock,
                                 password=TEST_PASSWORD.encode(), kdf_log2_n=10)
    yield repository
    repository.close()


def _open(repo: Repository, cache: Path) -> Repository:
    """The same repository as another process opens it (cold catalog, the key from the password)."""
    return Repository.open(open_backend(repo.backend.location), cache, lambda: TEST_PASSWORD.encode())


def _names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{n:02d}" for n in range(count)]


def _three_generations(repo: Repository, tmp_path: Path, clock: Clock) -> tuple[Club, Any]:
    """Snapshots 1 and 2 forgotten, 3 kept. Snapshot 1 wrote a00..a19; 2 kept the even a's
    and wrote c00..c19; 3 keeps the even a's and writes b00..b19. So the a packs are half
    garbage (to repack), the c packs and two tree packs wholly (to delete)."""
    club = Club(repo, tmp_path / "club", clock)
    club.write(*_names("a", 20))
    first = club.snapshot()
    club.write(*_names("c", 20))
    club.remove(*_names("a", 20)[1::2])
    second = club.snapshot()
    club.remove(*_names("c", 20))
    club.write(*_names("b", 20))
    kept = club.snapshot()
    remove_snapshots(repo, [first, second])
    return club, kept


def _data_packs(repo: Repository) -> dict[str, int]:
    return {key.rsplit("/", 1)[-1]: size for key, size in repo.backend.list("data/")}


def _index(repo: Repository) -> dict[str, list[list[Any]]]:
    """Every pack the stored index objects name, with its blob rows; a pack named twice
    appears twice in the lists (the test asserts it is not)."""
    packs: dict[str, list[list[Any]]] = {}
    for key, _ in repo.backend.list(INDEX_PREFIX):
        for pack in open_object(Kind.INDEX, repo.backend.get(key), key, repo.cipher)["packs"]:
            packs.setdefault(bytes(pack["id"]).hex(), []).extend(pack["blobs"])
    return packs


def _used(repo: Repository) -> set[bytes]:
    """The blobs the listed snapshots need: their trees (and tree parts) and file chunks."""
    used: set[bytes] = set()
    stack = [ChunkId(s.tree) for s in repo.snapshots()]
    while stack:
        tree = stack.pop()
        if bytes(tree) in used:
            continue
        used.add(bytes(tree))
        record = unpack_record(repo.read_blob(tree), "tree")
        entries = list(record.get("entries", []))
        for part in record.get("parts", []):
            used.add(bytes(part))
            entries += unpack_record(repo.read_blob(ChunkId(part)), "part")["entries"]
        for entry in entries:
            if entry["type"] == "dir":
                stack.append(ChunkId(entry["tree"]))
            elif entry["type"] == "file":
                used.update(bytes(c) for c in entry["chunks"])
    return used


def _usage(repo: Repository) -> dict[str, tuple[int, int, int]]:
    """Per indexed pack: used blobs, their bytes, and the unused (garbage) bytes."""
    used = _used(repo)
    usage = {}
    for pack, rows in _index(repo).items():
        in_use = [r for r in rows if bytes(r[0]) in used]
        usage[pack] = (len(in_use), sum(r[3] for r in in_use), sum(r[3] for r in rows if bytes(r[0]) not in used))
    return usage


def _assert_whole(repo: Repository, tmp_path: Path, snap: Any, expected: dict[str, str], name: str,
                  warned: str = "") -> None:
    """From a cold catalog: the repository checks clean, reading every blob (warnings
    only about ``warned``), and the snapshot restores to what was snapshotted."""
    fresh = _open(repo, tmp_path / f"cold-{name}")
    try:
        result = check(fresh, read_data=True)
        assert result.ok and all(warned and warned in w for w in result.warnings), (result.errors, result.warnings)
        target = tmp_path / f"restored-{name}"
        apply_restore(fresh, plan_restore(fresh, snap, target))
        restored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (target / "blobs").iterdir()}
        assert restored == expected
    finally:
        fresh.close()


PLAN_FIELDS = ("snapshots", "packs", "pack_bytes", "used_blobs", "used_bytes", "unused_packs", "unused_bytes",
               "repack_packs", "repack_bytes", "repack_used_bytes", "repack_small_packs", "unindexed_packs",
               "unindexed_bytes", "swept_earlier_packs", "swept_earlier_bytes", "rescued_packs", "pending_packs",
               "pending_bytes", "garbage_left_bytes", "predicted_freed_bytes", "index_objects_before")


def test_the_report_counts_what_prune_deletes_and_repacks(secret_repo: Repository, tmp_path: Path,
                                                          clock: Clock) -> None:
    """Every count of `prune --json` against the packs that went: an operator sizes the
    next prune (and believes the dry run) from these numbers. (Encrypted: what prune
    writes must open with the key.)"""
    repo = secret_repo
    club, kept = _three_generations(repo, tmp_path, clock)
    expected_state = club.state()
    before = _data_packs(repo)
    usage = _usage(repo)
    index_before = len(list(repo.backend.list(INDEX_PREFIX)))
    unused = {p for p, (count, _, _) in usage.items() if count == 0}
    partly = {p for p, (count, _, garbage) in usage.items() if count and garbage}
    assert len(unused) >= 4 and len(partly) >= 2, usage  # the fixture gives sums, not single items

    dry = prune(repo, PruneOptions(max_unused=0.0, dry_run=True)).to_dict()
    assert _data_packs(repo) == before
    done = prune(repo, PruneOptions(max_unused=0.0))
    after = _data_packs(repo)
    deleted, written = set(before) - set(after), set(after) - set(before)

    assert deleted == unused | partly
    assert done.packs == len(before) and done.pack_bytes == sum(before.values())
    assert done.snapshots == 1
    assert done.used_blobs == sum(u[0] for u in usage.values())
    assert done.used_bytes == sum(u[1] for u in usage.values())
    assert (done.unused_packs, done.unused_bytes) == (len(unused), sum(before[p] for p in unused))
    assert (done.repack_packs, done.repack_bytes) == (len(partly), sum(before[p] for p in partly))
    assert done.repack_used_bytes == sum(usage[p][1] for p in partly)
    assert done.repack_small_packs == 0 and done.garbage_left_bytes == 0
    assert done.packs_deleted == len(deleted)
    assert done.freed_bytes == sum(before.values()) - sum(after.values())
    assert written and sum(after[p] for p in written) < done.repack_used_bytes * 1.05
    # The prediction costs each copied blob its trailer row: within a few pack headers (and,
    # encrypted, envelopes) of the truth; far less than a trailer row per copied blob.
    assert abs(done.predicted_freed_bytes - done.freed_bytes) <= 2 * prune_module.PACK_OVERHEAD_BYTES * len(written)
    assert 2 * prune_module.PACK_OVERHEAD_BYTES * len(written) < prune_module.TRAILER_ROW_BYTES * sum(
        usage[p][0] for p in partly)
    assert done.index_objects_before == index_before
    assert done.index_objects_after == len(list(repo.backend.list(INDEX_PREFIX))) == 1
    assert done.pending_packs == done.pending_bytes == 0 and not done.dry_run and done.stale_locks_removed == 0
    # The dry run said all of it beforehand.
    assert dry["dry_run"] and dry["packs_deleted"] == dry["freed_bytes"] == 0
    assert {f: dry[f] for f in PLAN_FIELDS} == {f: done.to_dict()[f] for f in PLAN_FIELDS}

    # The new index names each kept blob once, in the packs that are there.
    index = _index(repo)
    assert set(index) == set(after)
    ids = [bytes(r[0]) for rows in index.values() for r in rows]
    assert len(ids) == len(set(ids)) == done.used_blobs
    _assert_whole(repo, tmp_path, kept, expected_state, "after")
    again = prune(repo, PruneOptions(max_unused=0.0))
    assert again.packs_deleted == again.repack_packs == again.unused_packs == 0 and again.freed_bytes == 0
    # A long-lived process (`clubsnap run`) goes on writing with the same repository object.
    from engine.format import BlobType
    stored = repo.add_blob(BlobType.DATA, b"after the prune")
    repo.flush()
    assert _open(repo, tmp_path / "after-write").read_blob(stored) == b"after the prune"
    # And a second prune beside a running one is refused, naming it.
    other = Lock(repo.backend, repo.cipher, "prune").acquire()
    with pytest.raises(RepositoryLocked, match=r"^another prune is running \("):
        prune(repo, PruneOptions(max_unused=0.0))
    other.release()


def _exact_bound(garbage: int, used: int) -> float:
    """A max_unused whose bound (max_unused × used bytes) is exactly ``garbage`` bytes."""
    fraction = garbage / used
    for _ in range(64):
        if fraction * used == garbage:
            return fraction
        fraction = math.nextafter(fraction, math.inf if fraction * used < garbage else -math.inf)
    raise AssertionError(f"no float gives {garbage}/{used} exactly")


def test_repacking_takes_the_worst_packs_first_and_stops_at_the_bound(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """--max-unused: the packs with the most garbage for their size are repacked first,
    and no more of them than it takes to bring the garbage left down to the bound (garbage
    exactly at the bound is within it). Each repack rewrites a pack: one too many costs
    a rewrite, one too few leaves more garbage than the operator allowed."""
    club = Club(repo, tmp_path / "club", clock)
    names = _names("a", 19)  # packs of a00-03, a04-07, a08-11, a12-15 and a16-18 (one worker: in order)
    club.write(*names)
    first = club.snapshot()
    chunk_of = {}
    for entry in unpack_record(repo.read_blob(ChunkId(first.tree)), "root")["entries"]:
        for blob_entry in unpack_record(repo.read_blob(ChunkId(entry["tree"])), "blobs")["entries"]:
            chunk_of[blob_entry["name"].decode()] = bytes(blob_entry["chunks"][0])
    kept = {"a00", "a04", "a05", "a08", "a09", "a10", "a12", "a13", "a14", "a15", "a16"}
    club.remove(*(set(names) - kept))
    second = club.snapshot()
    expected_state = club.state()
    remove_snapshots(repo, [first])
    index = _index(repo)
    pack_of = {name: next(p for p, rows in index.items() if any(bytes(r[0]) == chunk for r in rows))
               for name, chunk in chunk_of.items()}
    worst, mid_small, mid, least, clean = (pack_of[n] for n in ("a00", "a16", "a04", "a08", "a12"))
    assert [len(index[p]) for p in (worst, mid_small, mid, least, clean)] == [4, 3, 4, 4, 4], "packed in order"
    lengths = {r[3] for p in (worst, mid_small, mid, least, clean) for r in index[p]}
    assert len(lengths) == 1, lengths  # equal files, equal blobs: garbage counts in blobs
    blob = lengths.pop()
    usage = _usage(repo)
    assert [usage[p][2] // blob for p in (worst, mid_small, mid, least, clean)] == [3, 2, 2, 1, 0]
    # By garbage per pack byte: worst (3/4), mid_small (2/3), mid (2/4), least (1/4). The
    # bound is what is left once the first two are repacked: exactly 3 blobs.
    used_bytes = sum(u[1] for u in usage.values())
    before = _data_packs(repo)

    bound = _exact_bound(3 * blob, used_bytes)
    dry = prune(repo, PruneOptions(max_unused=bound, dry_run=True))
    assert (dry.repack_packs, dry.garbage_left_bytes) == (2, 3 * blob), dry
    done = prune(repo, PruneOptions(max_unused=bound))
    after = _data_packs(repo)
    assert set(before) - set(after) == {worst, mid_small} | {p for p, (count, _, _) in usage.items() if count == 0}
    assert {mid, least, clean} <= set(after)
    assert (done.repack_packs, done.repack_bytes) == (2, before[worst] + before[mid_small])
    assert done.garbage_left_bytes == 3 * blob == sum(u[2] for p, u in _usage(repo).items())
    _assert_whole(repo, tmp_path, second, expected_state, "bound")
    # Within the bound now: the same bound repacks nothing more; a tighter one takes the next worst.
    assert prune(repo, PruneOptions(max_unused=bound)).repack_packs == 0
    tighter = prune(repo, PruneOptions(max_unused=math.nextafter(bound, 0.0)))
    assert tighter.repack_packs == 1 and mid not in _data_packs(repo) and least in _data_packs(repo)
    assert tighter.garbage_left_bytes == blob
    _assert_whole(repo, tmp_path, second, expected_state, "tighter")


def _garbage(repo: Repository) -> dict[str, dict[str, Any]]:
    return {key: repo.read_garbage(key[len(GARBAGE_PREFIX):]) for key, _ in repo.backend.list(GARBAGE_PREFIX)}


def _condemned(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    packs = [(bytes(p["id"]).hex(), int(p["size"])) for record in records.values() for p in record["packs"]]
    assert len(packs) == len(dict(packs)), "a pack in two garbage records"
    return dict(packs)


def test_garbage_waits_for_the_processes_that_ran_at_its_prune_and_no_others(
        secret_repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Condemned packs wait for the snapshots and restores that were running when their
    prune replaced the index (they may have seen them as live), and only for those: a
    process that started later never holds them up. What waits is reported as pending,
    to the byte, over several garbage records (the per-record bound made small here)."""
    repo = secret_repo  # (encrypted: the garbage records must open with the key)
    monkeypatch.setattr(prune_module, "INDEX_ENTRIES_PER_OBJECT", 8)  # two packs of four fit exactly
    club, kept = _three_generations(repo, tmp_path, clock)
    expected_state = club.state()
    usage = _usage(repo)
    condemned_first = {p for p, (count, _, garbage) in usage.items() if garbage}
    before = _data_packs(repo)
    early = Lock(repo.backend, repo.cipher, "read").acquire()
    first = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    records = _garbage(repo)
    assert len(records) > 2 and all(r["waiting_for"] == [early.key] for r in records.values())
    # Each says who wrote it and when, for an operator wondering why packs are still there.
    assert all(set(r) == {"time", "host", "waiting_for", "packs"} and r["host"] == this_host()
               and datetime.fromisoformat(r["time"]).tzinfo for r in records.values())
    # The condemned packs, in order, fill each record as far as the bound lets them.
    chunks = sorted(([bytes(p["id"]) for p in r["packs"]], [len(p["blobs"]) for p in r["packs"]])
                    for r in records.values())
    assert [p for ids, _ in chunks for p in ids] == sorted(p for ids, _ in chunks for p in ids)
    assert all(sum(counts) <= 8 for _, counts in chunks)
    assert all(sum(counts) + following[1][0] > 8 for (_, counts), following in zip(chunks, chunks[1:]))
    assert set(_condemned(records)) == condemned_first and first.packs_deleted == 0
    assert (first.pending_packs, first.pending_bytes) == (len(condemned_first),
                                                          sum(before[p] for p in condemned_first))
    assert first.waited_for == [early.key]
    # A consolidated index in objects of at most eight blobs (a pack is never split).
    index = _index(repo)
    assert len(list(repo.backend.list(INDEX_PREFIX))) == first.index_objects_after > 2
    assert sum(len(rows) for rows in index.values()) == first.used_blobs
    _assert_whole(repo, tmp_path, kept, expected_state, "first")

    # More garbage while the early reader runs; a second reader joins.
    club.write(*_names("d", 8))
    forgotten = club.snapshot()
    remove_snapshots(repo, [forgotten])
    later = Lock(repo.backend, repo.cipher, "read").acquire()
    between = _data_packs(repo)
    second = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    new_records = {k: r for k, r in _garbage(repo).items() if k not in records}
    assert new_records and all(r["waiting_for"] == sorted([early.key, later.key]) for r in new_records.values())
    new_condemned = _condemned(new_records)
    assert second.swept_earlier_packs == 0 and second.packs_deleted == 0
    assert second.pending_packs == len(condemned_first) + len(new_condemned)
    assert second.pending_bytes == sum(between[p] for p in condemned_first | set(new_condemned))

    # The early reader ends, a third starts: the first prune's garbage goes, the second's waits.
    early.release()
    third_reader = Lock(repo.backend, repo.cipher, "read").acquire()
    third = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert (third.swept_earlier_packs, third.swept_earlier_bytes) == (
        len(condemned_first), sum(before[p] for p in condemned_first))
    assert third.packs_deleted == len(condemned_first)
    assert third.predicted_freed_bytes == third.freed_bytes == sum(before[p] for p in condemned_first)
    assert (third.pending_packs, third.pending_bytes) == (len(new_condemned), sum(new_condemned.values()))
    assert set(_garbage(repo)) == set(new_records)
    stored = _data_packs(repo)
    assert not condemned_first & set(stored) and set(new_condemned) <= set(stored)
    _assert_whole(repo, tmp_path, kept, expected_state, "third")

    later.release()
    last = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert last.swept_earlier_packs == last.packs_deleted == len(new_condemned) and last.pending_packs == 0
    assert not _garbage(repo) and set(_data_packs(repo)) == set(_index(repo))
    third_reader.release()
    _assert_whole(repo, tmp_path, kept, expected_state, "last")


class _Killed(BaseException):
    """Stands for SIGKILL at one point of a prune (the process ends, nothing runs after)."""


def _forget_all_but_last(repo: Repository, tmp_path: Path, clock: Clock) -> tuple[Club, Any]:
    club = Club(repo, tmp_path / "club", clock)
    club.write(*_names("a", 12))
    first = club.snapshot()
    club.remove(*_names("a", 12)[::2])
    club.write(*_names("b", 4))
    kept = club.snapshot()
    remove_snapshots(repo, [first])
    return club, kept


def _kill_before_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self: Any, names: list[str], marked: set[str]) -> None:
        raise _Killed()
    monkeypatch.setattr(prune_module._Pruner, "_sweep_new", killed)


def test_garbage_of_a_prune_killed_before_its_wait_is_swept_when_nothing_runs(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after replacing the index, a prune leaves garbage records that name no
    process: with none running now, none can have seen the packs as live, and the next
    prune deletes them."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    before = _data_packs(repo)
    with monkeypatch.context() as patch:
        _kill_before_the_wait(patch)
        with pytest.raises(_Killed):
            prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    records = _garbage(repo)
    assert records and all(r["waiting_for"] is None for r in records.values())
    condemned = _condemned(records)
    assert len(condemned) >= 2 and set(condemned) <= set(before)
    _assert_whole(repo, tmp_path, kept, expected_state, "killed")
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert (done.swept_earlier_packs, done.swept_earlier_bytes) == (len(condemned), sum(condemned.values()))
    assert done.packs_deleted == len(condemned) and done.pending_packs == done.rescued_packs == 0
    assert not _garbage(repo) and not set(condemned) & set(_data_packs(repo))
    _assert_whole(repo, tmp_path, kept, expected_state, "swept")


def test_garbage_of_a_killed_prune_is_handed_to_the_processes_running_at_the_next(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage of a killed prune, with a restore running at the next prune: that restore
    may have read the replaced index, so the packs wait for it; the next prune writes
    that down (waiting for that restore, not for whatever runs later), and sweeps once
    it has ended, even with another process running by then."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    with monkeypatch.context() as patch:
        _kill_before_the_wait(patch)
        with pytest.raises(_Killed):
            prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    condemned = _condemned(_garbage(repo))
    reader = Lock(repo.backend, repo.cipher, "read").acquire()
    earlier_garbage = prune_module._Pruner._earlier_garbage

    def with_one_gone(self: Any) -> dict[str, Any]:  # a record listed, then gone (it sorts first)
        return {"0" * 64: (None, {}), **earlier_garbage(self)}

    with monkeypatch.context() as patch:
        patch.setattr(prune_module._Pruner, "_earlier_garbage", with_one_gone)
        held = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert held.swept_earlier_packs == held.packs_deleted == 0
    assert (held.pending_packs, held.pending_bytes) == (len(condemned), sum(condemned.values()))
    records = _garbage(repo)
    assert records and all(r["waiting_for"] == [reader.key] for r in records.values())
    assert _condemned(records) == condemned and set(condemned) <= set(_data_packs(repo))
    reader.release()
    newcomer = Lock(repo.backend, repo.cipher, "snapshot").acquire()
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    newcomer.release()
    assert done.swept_earlier_packs == done.packs_deleted == len(condemned) and done.pending_packs == 0
    assert not _garbage(repo)
    _assert_whole(repo, tmp_path, kept, expected_state, "handed-on")


def test_interrupted_while_waiting_the_garbage_is_handed_on(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """Ctrl-C while prune waits for a running restore: its garbage records are written
    again naming that restore, so the next prune sweeps them once it ends (and not
    before)."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    reader = Lock(repo.backend, repo.cipher, "read").acquire()
    newcomers = []

    def interrupt(text: str) -> None:
        if text.startswith("waiting for"):  # a snapshot started after the index was replaced
            newcomers.append(Lock(repo.backend, repo.cipher, "snapshot").acquire())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(repo, PruneOptions(max_unused=0.0, wait_s=600, progress=interrupt))
    records = _garbage(repo)
    assert records and all(r["waiting_for"] == [reader.key] for r in records.values())
    newcomers[0].release()
    condemned = _condemned(records)
    assert set(condemned) <= set(_data_packs(repo))
    assert prune(repo, PruneOptions(max_unused=0.0, wait_s=0)).packs_deleted == 0
    reader.release()
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert done.swept_earlier_packs == done.packs_deleted == len(condemned)
    assert not _garbage(repo)
    _assert_whole(repo, tmp_path, kept, expected_state, "interrupted")


def test_a_snapshot_finishing_while_prune_waits_gets_the_condemned_packs_it_uses_back(
        secret_repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot that synced its catalog before the prune replaced the index dedups
    against condemned blobs. Prune waits for it; once it has saved its record, prune
    lists it, indexes the packs it uses again instead of deleting them, and deletes the
    rest. The snapshot restores whole, from a cold catalog too."""
    repo = secret_repo  # (encrypted: the rescuing index objects must open with the key)
    monkeypatch.setattr(prune_module, "WAIT_POLL_S", 0.01)  # the product's poll, made quick
    club = Club(repo, tmp_path / "club", clock)
    repo.config = replace(repo.config, pack_size=1000)  # a pack per file: more to rescue than one index object takes
    monkeypatch.setattr(prune_module, "INDEX_ENTRIES_PER_OBJECT", 90)  # two garbage records, both rescued from
    for name in _names("a", 100):
        (club.root / "blobs" / name).write_bytes(os.urandom(1200))
    first = club.snapshot()
    club.write(*_names("z", 8))
    second = club.snapshot()
    remove_snapshots(repo, [first, second])  # every pack is garbage now
    club.remove(*_names("z", 8))
    expected_state = club.state()  # the a's only: their packs are needed again, the z's not
    condemned, rows_before = _data_packs(repo), _index(repo)
    started, go = threading.Event(), threading.Event()
    results: list[Any] = []

    def pause(progress: Any) -> None:
        if not started.is_set():
            started.set()
            assert go.wait(60)

    def run_snapshot() -> None:
        time.sleep(0.05)  # past the files cache's racy-timestamp window (not synchronisation)
        clock.advance(minutes=10)
        results.append(create_snapshot(repo, SnapshotOptions(source=club.root, host="h", now=clock, workers=1,
                                                             progress=pause)))

    snapshotter = threading.Thread(target=run_snapshot)
    snapshotter.start()
    try:
        assert started.wait(60)
        pruner = _open(repo, tmp_path / "pruner-cache")
        pruner.config = repo.config
        said: list[str] = []

        def release_snapshot(text: str) -> None:
            said.append(text)
            if text.startswith("waiting for"):
                go.set()

        report = prune(pruner, PruneOptions(max_unused=0.0, wait_s=60, progress=release_snapshot))
    finally:
        go.set()
        snapshotter.join()
    running = results[0]
    assert running.stats["blobs_added"] < 5, running.stats  # deduplicated against the condemned a's
    assert any(s.startswith("waiting for 1 running") for s in said)
    assert report.waited_for == [] and report.pending_packs == 0
    used = _used(repo)
    a_packs = {p for p in condemned if any(bytes(r[0]) in used for r in rows_before[p])}
    assert len(a_packs) > 100 and len(condemned) - len(a_packs) >= 8
    assert report.rescued_packs == len(a_packs)
    index = _index(repo)  # each pack named once, each blob once
    assert all(len(rows) == len({bytes(r[0]) for r in rows}) for rows in index.values())
    assert a_packs <= set(index)
    assert report.packs_deleted == len(condemned) - len(a_packs)
    assert report.freed_bytes == sum(size for p, size in condemned.items() if p not in a_packs)  # nothing copied
    assert not _garbage(repo) and a_packs <= set(_data_packs(repo)) <= set(_index(repo))
    _assert_whole(repo, tmp_path, running.info, expected_state, "rescued")
    again = prune(pruner, PruneOptions(max_unused=0.0, wait_s=0))  # (repacks a rescued tree pack)
    assert again.unused_packs == again.rescued_packs == again.swept_earlier_packs == 0
    pruner.close()
    _assert_whole(repo, tmp_path, running.info, expected_state, "merged")


def test_index_objects_are_cut_at_pack_boundaries_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new index object starts at the first pack after the bound is reached, never
    inside a pack: a reader holding one object knows each of its packs wholly, and no
    object holds more than the bound plus one pack (bounded memory for every reader)."""
    monkeypatch.setattr(prune_module, "INDEX_ENTRIES_PER_OBJECT", 3)
    packs = [PackId(bytes([n]) * 32) for n in range(1, 6)]
    sizes = {p: 1000 * n for n, p in enumerate(packs, 1)}
    counts = [2, 1, 3, 1, 4]
    rows = [(bytes([n, b]) * 16, 1, bytes(p), 10 * b, 7, 9)
            for n, (p, count) in enumerate(zip(packs, counts)) for b in range(count)]
    batches = list(prune_module.index_batches(iter(rows), sizes))
    assert [[bytes(rec["id"]) for rec in batch] for batch in batches] == [
        [bytes(packs[0]), bytes(packs[1])], [bytes(packs[2])], [bytes(packs[3]), bytes(packs[4])]]
    records = [rec for batch in batches for rec in batch]
    assert [rec["size"] for rec in records] == [sizes[p] for p in packs]
    assert [rec["blobs"] for rec in records] == [
        [[bytes(r[0]), r[1], r[3], r[4], r[5]] for r in rows if r[2] == bytes(p)] for p in packs]
    assert list(prune_module.index_batches(iter([]), {})) == []


def test_garbage_may_be_swept_only_once_nothing_it_waits_for_runs() -> None:
    """The sweep rule: a record naming the processes it waits for waits for those only;
    one naming none (its prune died first) waits for everything running now."""
    may_sweep = prune_module._may_sweep
    assert may_sweep(["locks/read-1"], set()) and may_sweep(["locks/read-1"], {"locks/read-2"})
    assert not may_sweep(["locks/read-1", "locks/snapshot-2"], {"locks/snapshot-2", "locks/read-3"})
    assert may_sweep([], {"locks/read-3"})
    assert may_sweep(None, set()) and not may_sweep(None, {"locks/read-3"})


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(raw))


def _file(repo: Repository, key: str) -> Path:
    return Path(repo.backend.location) / key


def test_prune_refuses_beside_a_damaged_snapshot_record_or_index_object(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A damaged snapshot record hides what it uses, a damaged index object where its
    blobs are: prune would take them for garbage. It refuses, deletes nothing, and names
    the first damaged object and the repair that comes first."""
    from engine.errors import IntegrityError
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    club.write("extra")
    newer = club.snapshot()
    snapshot_key = next(k for k, _ in repo.backend.list("snapshots/") if newer.key in k or k == newer.key)
    _flip(_file(repo, snapshot_key))
    before = _data_packs(repo)
    with pytest.raises(IntegrityError) as refused:
        prune(reopen(repo, tmp_path / "p1"), PruneOptions(max_unused=0.0))
    assert str(refused.value) == (f"prune refused: 1 damaged index object(s) or snapshot record(s), first "
                                  f"{snapshot_key}; run 'clubsnap repair snapshots' first")
    index_key = sorted(k for k, _ in repo.backend.list(INDEX_PREFIX))[0]
    _flip(_file(repo, index_key))
    with pytest.raises(IntegrityError) as refused:
        prune(reopen(repo, tmp_path / "p2"), PruneOptions(max_unused=0.0, dry_run=True))
    assert str(refused.value) == (f"prune refused: 2 damaged index object(s) or snapshot record(s), first "
                                  f"{index_key}; run 'clubsnap repair index' first")
    assert _data_packs(repo) == before and not _garbage(repo)


def test_a_damaged_garbage_record_has_its_packs_condemned_again(
        secret_repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable garbage record leaves its packs named by nothing: the next prune
    warns, takes them for unindexed packs (their blob lists from their own trailers)
    and condemns them anew; the records beside it (one swept meanwhile, one still
    waiting) are read on as usual. Every kept snapshot still restores."""
    from engine.errors import ObjectNotFound
    repo = secret_repo  # (encrypted: the packs' own trailers are read under the key)
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    reader = Lock(repo.backend, repo.cipher, "read").acquire()
    prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    club.write(*_names("d", 6))
    forgotten = club.snapshot()
    remove_snapshots(repo, [forgotten])
    prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    records = _garbage(repo)
    assert len(records) == 2
    damaged_key, valid_key = sorted(records)
    damaged, valid = _condemned({damaged_key: records[damaged_key]}), _condemned({valid_key: records[valid_key]})
    assert len(damaged) >= 2 and len(valid) >= 2
    _flip(_file(repo, damaged_key))
    # A record listed, then swept by the time it is read (it sorts first).
    phantom = GARBAGE_PREFIX + "0" * 64
    repo.backend.put(phantom, b"swept meanwhile")
    read_garbage = Repository.read_garbage

    def swept_meanwhile(self: Repository, name: str, catalog: bool = False) -> dict[str, Any]:
        if name == phantom[len(GARBAGE_PREFIX):]:
            raise ObjectNotFound(phantom)
        return read_garbage(self, name, catalog)

    monkeypatch.setattr(Repository, "read_garbage", swept_meanwhile)
    pruner = _open(repo, tmp_path / "after-damage")
    pruner.config = repo.config  # the small packs of this test
    held = prune(pruner, PruneOptions(max_unused=0.0, wait_s=0))
    assert any(damaged_key in w and w.endswith("(its packs are condemned again)") for w in held.warnings), held.warnings
    assert (held.unindexed_packs, held.unindexed_bytes) == (len(damaged), sum(damaged.values()))
    assert held.packs_deleted == 0 and held.pending_packs == len(damaged) + len(valid)
    reader.release()
    done = prune(pruner, PruneOptions(max_unused=0.0, wait_s=0))
    assert done.unindexed_packs == 0 and done.packs_deleted == len(damaged) + len(valid)
    assert not (set(damaged) | set(valid)) & set(_data_packs(repo))
    monkeypatch.undo()
    repo.backend.delete(phantom)
    # (The damaged record itself is left: check may still warn of it, of nothing else.)
    assert set(_garbage_keys(repo)) <= {damaged_key}
    _assert_whole(repo, tmp_path, kept, expected_state, "damaged-garbage", warned=damaged_key)


def _garbage_keys(repo: Repository) -> list[str]:
    return [key for key, _ in repo.backend.list(GARBAGE_PREFIX)]


def test_damaged_packs_are_left_to_repair(repo: Repository, tmp_path: Path, clock: Clock,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged pack still in use is never repacked (the copy would stop at the damaged
    blob, or carry it on) but named in a warning; an unindexed pack whose trailer is
    unreadable is left alone, with a warning, rather than deleted blind, and one deleted
    since the listing is passed over: the unindexed packs after them are still deleted."""
    from engine.errors import ObjectNotFound
    from engine.format import BlobType, encode_blob, pack_key
    from engine.packs import PackBuilder
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    usage = _usage(repo)
    partly = sorted(p for p, (count, _, garbage) in usage.items() if count and garbage)
    assert len(partly) >= 2
    victim = partly[0]
    _flip(_file(repo, pack_key(PackId.from_hex(victim))))
    assert not check(repo, read_data=True).ok  # records the damage
    builder = PackBuilder(BlobType.DATA, repo.cipher)
    raw = os.urandom(5000)
    builder.add(repo.chunk_id(raw), encode_blob(raw, repo.chunk_id(raw), repo.cipher), len(raw))
    _, data, _ = builder.finish()
    stray = PackId(b"\0" * 31 + b"\1")  # sorts first: a killed upload's torn pack
    repo.backend.put(pack_key(stray), bytes(data[:-10]))
    gone = PackId(b"\0" * 32)  # listed, deleted before its trailer is read
    repo.backend.put(pack_key(gone), b"deleted meanwhile")
    builder = PackBuilder(BlobType.DATA, repo.cipher)
    raw = os.urandom(5000)
    builder.add(repo.chunk_id(raw), encode_blob(raw, repo.chunk_id(raw), repo.cipher), len(raw))
    leftover, data, _ = builder.finish()  # a killed snapshot's pack: deleted
    repo.backend.put(pack_key(leftover), bytes(data))
    read_trailer = prune_module.read_trailer

    def deleted_meanwhile(backend: Any, pack: PackId, size: int, cipher: Any) -> Any:
        if pack == gone:
            raise ObjectNotFound(pack_key(pack))
        return read_trailer(backend, pack, size, cipher)

    monkeypatch.setattr(prune_module, "read_trailer", deleted_meanwhile)
    done = prune(repo, PruneOptions(max_unused=0.0))
    assert f"{pack_key(PackId.from_hex(victim))} is damaged and still in use: left to 'clubsnap repair packs'" \
        in done.warnings
    assert any(w.endswith("(an unindexed pack: left alone)") for w in done.warnings), done.warnings
    after = _data_packs(repo)
    assert victim in after and stray.hex() in after
    assert not set(partly[1:]) & set(after) and done.repack_packs == len(partly) - 1
    assert done.unindexed_packs == 1 and leftover.hex() not in after


def test_a_prune_asked_to_stop_hands_its_garbage_on_instead_of_waiting(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """`clubsnap run` on SIGTERM sets ``stop``: a prune waiting minutes for a running
    restore ends its wait at once, leaving the garbage to the next prune, pending."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    reader = Lock(repo.backend, repo.cipher, "read").acquire()
    stop = threading.Event()
    said: list[str] = []

    def asked_to_stop(text: str) -> None:
        said.append(text)
        if text.startswith("waiting for"):
            stop.set()

    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=3600, progress=asked_to_stop, stop=stop))
    assert said.count("waiting for 1 running snapshot(s)/restore(s) before deleting") == 1
    condemned = _condemned(_garbage(repo))
    assert done.waited_for == [reader.key] and done.packs_deleted == 0
    assert (done.pending_packs, done.pending_bytes) == (len(condemned), sum(condemned.values()))
    reader.release()
    assert prune(repo, PruneOptions(max_unused=0.0, wait_s=0)).swept_earlier_packs == len(condemned)
    _assert_whole(repo, tmp_path, kept, expected_state, "stopped")


def test_without_a_wait_prune_does_not_wait(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """--wait 0s: garbage a running process may use is handed on at once, unannounced."""
    _forget_all_but_last(repo, tmp_path, clock)
    reader = Lock(repo.backend, repo.cipher, "snapshot").acquire()
    said: list[str] = []
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0, progress=said.append))
    reader.release()
    assert not [s for s in said if s.startswith("waiting")] and done.waited_for == [reader.key]
    assert done.pending_packs >= 2 and done.packs_deleted == 0


def test_small_packs_are_merged_per_type_and_their_garbage_goes_with_them(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """Frequent snapshots leave small packs; prune merges those of a type into one (a
    request each instead of dozens), below the repack bound too, and their garbage goes
    with them; a big pack's garbage within the bound stays, and is what is reported left.
    A damaged small pack is not merged (left to repair)."""
    club = Club(repo, tmp_path / "club", clock)
    club.write(*_names("a", 4))  # one big pack
    for name in ("x0", "x1"):
        (club.root / "blobs" / name).write_bytes(os.urandom(3000))
    first = club.snapshot()
    club.remove("a03", "x1")
    (club.root / "blobs" / "y0").write_bytes(os.urandom(3000))
    second = club.snapshot()
    (club.root / "blobs" / "y1").write_bytes(os.urandom(3000))
    third = club.snapshot()
    (club.root / "blobs" / "y2").write_bytes(os.urandom(3000))
    fourth = club.snapshot()
    expected_state = club.state()
    remove_snapshots(repo, [first])
    usage = _usage(repo)
    before = _data_packs(repo)
    small = {p for p in before if before[p] < PACK_SIZE // 4}
    (big_pack,) = set(before) - small
    assert usage[big_pack][2] > 0  # a03: garbage within the bound
    unused = {p for p in small if usage[p][0] == 0}
    mergeable = small - unused
    assert len(unused) == 1 and len(mergeable) == 7  # the first snapshot's trees; 4 data and 3 tree packs
    # The newest data pack is damaged: it stays out of the merge.
    from engine.format import pack_key
    newest_data = next(p for p in mergeable if any(
        bytes(r[0]) == bytes(_chunk(repo, fourth, "y2")) for r in _index(repo)[p]))
    _flip(_file(repo, pack_key(PackId.from_hex(newest_data))))
    assert not check(repo, read_data=True).ok
    done = prune(repo, PruneOptions(max_unused=1.0))
    after = _data_packs(repo)
    assert (done.repack_small_packs, done.repack_packs) == (6, 6)
    assert done.garbage_left_bytes == usage[big_pack][2] > 0
    assert big_pack in after and newest_data in after
    assert not (mergeable - {newest_data}) & set(after) and not unused & set(after)
    assert len(set(after) - set(before)) == 2  # one data pack, one tree pack
    assert sum(_usage(repo)[p][2] for p in after) == done.garbage_left_bytes
    assert any("is damaged and still in use" in w for w in done.warnings)
    third_state = {name: digest for name, digest in expected_state.items() if name != "y2"}
    fresh = reopen(repo, tmp_path / "cold-small")
    target = tmp_path / "restored-small"
    apply_restore(fresh, plan_restore(fresh, third, target))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (target / "blobs").iterdir()} == third_state
    fresh.close()


def _chunk(repo: Repository, snap: Any, name: str) -> ChunkId:
    return next(ChunkId(e["chunks"][0]) for p, e in walk(repo, ChunkId(snap.tree)) if p == b"blobs/" + name.encode())


def test_a_pack_a_quarter_of_the_target_size_is_not_small(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """Small means below a quarter of the target pack size (the bound that keeps each
    byte merged a bounded number of times); two small packs of a type are enough to merge."""
    club = Club(repo, tmp_path / "club", clock)
    (club.root / "blobs" / "p").write_bytes(os.urandom(3000))
    club.snapshot()
    (club.root / "blobs" / "q").write_bytes(os.urandom(5000))
    last = club.snapshot()
    expected_state = club.state()
    index = _index(repo)
    data = sorted((size, p) for p, size in _data_packs(repo).items() if len(index[p]) == 1 and size > 3000)
    (_, lesser), (bigger_size, bigger) = data
    repo.config = replace(repo.config, pack_size=4 * bigger_size + 3)  # a quarter: just bigger_size
    first = prune(repo, PruneOptions(max_unused=0.0))
    assert (first.repack_small_packs, first.packs_deleted) == (2, 2)  # the two tree packs only
    assert {lesser, bigger} <= set(_data_packs(repo))
    repo.config = replace(repo.config, pack_size=4 * bigger_size + 4)
    second = prune(repo, PruneOptions(max_unused=0.0))
    assert (second.repack_small_packs, second.packs_deleted) == (2, 2)
    assert not {lesser, bigger} & set(_data_packs(repo))
    _assert_whole(repo, tmp_path, last, expected_state, "merged")


def test_a_pack_indexed_without_blobs_is_deleted_as_unused(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """An index entry naming a pack but none of its blobs gives nothing a snapshot could
    read there: the pack counts as unused, with its size, and goes."""
    from engine.format import BlobType, digest, encode_blob, index_key, pack_key, seal_object
    from engine.packs import PackBuilder
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    baseline = prune(repo, PruneOptions(max_unused=1.0, dry_run=True))
    builder = PackBuilder(BlobType.DATA, repo.cipher)
    raw = os.urandom(4000)
    builder.add(repo.chunk_id(raw), encode_blob(raw, repo.chunk_id(raw), repo.cipher), len(raw))
    empty, data, _ = builder.finish()
    repo.backend.put(pack_key(empty), bytes(data))
    record = seal_object(Kind.INDEX, {"packs": [{"id": bytes(empty), "size": len(data), "blobs": []}]}, repo.cipher)
    repo.backend.put(index_key(digest(record)), record)
    dry = prune(repo, PruneOptions(max_unused=1.0, dry_run=True))
    assert (dry.unused_packs, dry.unused_bytes) == (baseline.unused_packs + 1, baseline.unused_bytes + len(data))
    assert (dry.used_blobs, dry.used_bytes, dry.garbage_left_bytes) == (
        baseline.used_blobs, baseline.used_bytes, baseline.garbage_left_bytes)
    done = prune(repo, PruneOptions(max_unused=1.0))
    assert done.packs_deleted == dry.unused_packs + dry.repack_packs and empty.hex() not in _data_packs(repo)
    _assert_whole(repo, tmp_path, kept, expected_state, "empty-entry")


def test_a_repack_stops_at_a_damaged_blob_instead_of_copying_it_on(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A used blob found damaged while repacking is not copied into a new pack (the
    damage would live on under a good pack's name, its old pack deleted): prune stops,
    deletes nothing, and records the damage; the next prune leaves that pack to repair."""
    from engine.errors import IntegrityError
    from engine.format import pack_key
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    usage = _usage(repo)
    partly = sorted(p for p, (count, _, garbage) in usage.items() if count and garbage)
    used = _used(repo)
    victim = partly[0]
    row = next(r for r in _index(repo)[victim] if bytes(r[0]) in used)
    path = _file(repo, pack_key(PackId.from_hex(victim)))
    raw = bytearray(path.read_bytes())
    raw[row[2] + row[3] // 2] ^= 0xFF  # inside that used blob
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    before = _data_packs(repo)
    with pytest.raises(IntegrityError, match="recorded as damaged"):
        prune(repo, PruneOptions(max_unused=0.0))
    assert set(before) <= set(_data_packs(repo)) and not _garbage(repo)
    assert set(repo.catalog.damaged_packs()) == {PackId.from_hex(victim)}
    done = prune(repo, PruneOptions(max_unused=0.0))
    assert victim in _data_packs(repo) and any(victim in w and "damaged" in w for w in done.warnings)


class _Pauses(threading.Event):
    """A stop event (as `clubsnap run` passes) that notes each pause prune asks of it."""

    def __init__(self, after_first: Any = None) -> None:
        super().__init__()
        self.pauses: list[float | None] = []
        self.after_first = after_first

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout)
        if len(self.pauses) == 1 and self.after_first:
            self.after_first()
        return super().wait(timeout)


def test_prune_waits_for_the_processes_it_found_not_for_those_started_since(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore that starts while prune waits read the new index: it cannot use the
    condemned packs, and prune does not wait for it."""
    monkeypatch.setattr(prune_module, "WAIT_POLL_S", 0.01)
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    first = Lock(repo.backend, repo.cipher, "read").acquire()
    started: list[Lock] = []

    def first_ends_another_starts() -> None:
        first.release()
        started.append(Lock(repo.backend, repo.cipher, "read").acquire())

    pauses = _Pauses(first_ends_another_starts)
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=600, stop=pauses))
    started[0].release()
    assert done.waited_for == [] and done.pending_packs == 0 and not _garbage(repo)
    assert done.packs_deleted == done.unused_packs + done.repack_packs >= 2
    assert len(pauses.pauses) == 1
    _assert_whole(repo, tmp_path, kept, expected_state, "newcomer")


def test_the_wait_ends_at_its_bound(repo: Repository, tmp_path: Path, clock: Clock,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--wait bounds the wait: each pause is one poll interval at most, and the pauses
    never add up to more than the wait (the last one is cut to what is left)."""
    monkeypatch.setattr(prune_module, "WAIT_POLL_S", 0.2)
    _forget_all_but_last(repo, tmp_path, clock)
    reader = Lock(repo.backend, repo.cipher, "read").acquire()
    pauses = _Pauses()
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0.3, stop=pauses))
    reader.release()
    assert done.waited_for == [reader.key] and done.pending_packs >= 2 and done.packs_deleted == 0
    assert len(pauses.pauses) >= 2 and all(p is not None and 0 <= p <= 0.2 for p in pauses.pauses)
    assert sum(p for p in pauses.pauses if p is not None) <= 0.3


def test_a_prune_killed_while_deleting_leaves_the_rest_to_the_next(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between two pack deletions: the garbage record still names the pack already
    gone. The next prune deletes the others and counts only what it deleted."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    condemned_at: dict[str, dict[str, int]] = {}
    delete = type(repo.backend).delete
    deleted: list[str] = []

    def killed_at_the_second_pack(self: Any, key: str) -> None:
        if key.startswith("data/"):
            if not condemned_at:
                condemned_at["record"] = _condemned(_garbage(repo))
            if deleted:
                raise _Killed()
            deleted.append(key.rsplit("/", 1)[-1])
        delete(self, key)

    with monkeypatch.context() as patch:
        patch.setattr(type(repo.backend), "delete", killed_at_the_second_pack)
        with pytest.raises(_Killed):
            prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    condemned = condemned_at["record"]
    assert len(condemned) >= 3 and deleted[0] in condemned and deleted[0] not in _data_packs(repo)
    assert _condemned(_garbage(repo)) == condemned  # still names the deleted one
    rest = {p: size for p, size in condemned.items() if p != deleted[0]}
    reader = Lock(repo.backend, repo.cipher, "read").acquire()  # the record waits for it now
    held = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert (held.pending_packs, held.pending_bytes) == (len(rest), sum(rest.values())) and held.packs_deleted == 0
    reader.release()
    # And a record listed, then gone by the time it is read again (it sorts first).
    earlier_garbage = prune_module._Pruner._earlier_garbage

    def with_one_gone(self: Any) -> dict[str, Any]:
        return {"0" * 64: ([], {}), **earlier_garbage(self)}

    with monkeypatch.context() as patch:
        patch.setattr(prune_module._Pruner, "_earlier_garbage", with_one_gone)
        done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert (done.swept_earlier_packs, done.swept_earlier_bytes) == (len(rest), sum(rest.values()))
    assert (done.packs_deleted, done.freed_bytes) == (len(rest), sum(rest.values()))
    assert not _garbage(repo) and not set(condemned) & set(_data_packs(repo))
    _assert_whole(repo, tmp_path, kept, expected_state, "killed-deleting")


def _rebuilt_before_copies(monkeypatch: pytest.MonkeyPatch, repo: Repository, calls: set[int]) -> list[int]:
    """Another process sharing the local catalog (a 'cache --rebuild') clears it just
    before the given calls (1-based) of prune's one-read copy of the index."""
    from engine.catalog import Catalog
    other = Catalog(repo.catalog.path)
    copy_index = Catalog.copy_index
    seen: list[int] = []

    def cleared_first(self: Catalog, blobs: str, packs: str) -> set[str]:
        seen.append(len(seen) + 1)
        if len(seen) in calls:
            other.record_listing(set())
        return copy_index(self, blobs, packs)

    monkeypatch.setattr(Catalog, "copy_index", cleared_first)
    return seen


def test_a_catalog_rebuilt_under_prune_is_read_again_or_refused(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prune decides from its own copy of the index, which must hold every index object
    it listed: a copy taken just after another process cleared the shared catalog lacks
    them (every pack would look unindexed). It reads again; a catalog cleared at every
    try stops it with a one-line reason, having deleted nothing."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    before = _data_packs(repo)
    with monkeypatch.context() as patch:
        seen = _rebuilt_before_copies(patch, repo, set(range(1, 6)))
        with pytest.raises(RepositoryLocked) as refused:
            prune(repo, PruneOptions(max_unused=0.0))
    assert len(seen) == 5 and _data_packs(repo) == before and not _garbage(repo)
    assert str(refused.value) == ("the local catalog kept being rebuilt by another process (a 'cache --rebuild'?); "
                                  "prune again when it has finished")
    usage = _usage(repo)
    with monkeypatch.context() as patch:
        seen = _rebuilt_before_copies(patch, repo, {1, 2, 3, 4})
        done = prune(repo, PruneOptions(max_unused=0.0))
    assert seen[:5] == [1, 2, 3, 4, 5]
    assert done.unindexed_packs == 0 and done.unused_packs == sum(1 for u in usage.values() if u[0] == 0)
    assert done.packs_deleted == sum(1 for u in usage.values() if u[2]) and not _garbage(repo)
    _assert_whole(repo, tmp_path, kept, expected_state, "reread")


def test_a_catalog_rebuilt_during_the_sweep_leaves_the_garbage_to_the_next_prune(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before sweeping, prune lists the snapshots again and copies the index again, to
    spare what a snapshot finished meanwhile uses. A copy cleared by another process
    could not tell: the garbage is handed on, waiting for nobody, and the next prune
    sweeps it."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    with monkeypatch.context() as patch:
        _rebuilt_before_copies(patch, repo, {2})  # the sweep's copy
        held = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    records = _garbage(repo)
    condemned = _condemned(records)
    assert records and all(r["waiting_for"] == [] for r in records.values())
    assert held.packs_deleted == 0 and (held.pending_packs, held.pending_bytes) == (
        len(condemned), sum(condemned.values()))
    assert set(condemned) <= set(_data_packs(repo))
    _assert_whole(repo, tmp_path, kept, expected_state, "handed-on-rebuilt")
    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=0))
    assert done.swept_earlier_packs == done.packs_deleted == len(condemned) and not _garbage(repo)
    _assert_whole(repo, tmp_path, kept, expected_state, "swept-rebuilt")


def test_a_condemned_pack_indexed_again_while_prune_waits_is_kept(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack an index object names again by the sweep (a 'repair index' from the packs
    meanwhile) is live: prune leaves it, and deletes the rest of its garbage record."""
    from engine.format import digest, index_key, seal_object
    monkeypatch.setattr(prune_module, "WAIT_POLL_S", 0.01)
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    reader = Lock(repo.backend, repo.cipher, "read").acquire()
    again: list[str] = []

    def repaired_meanwhile() -> None:
        (record,) = _garbage(repo).values()
        first = min(record["packs"], key=lambda p: bytes(p["id"]))  # the first the sweep looks at
        data = seal_object(Kind.INDEX, {"packs": [first]}, repo.cipher)
        repo.backend.put(index_key(digest(data)), data)
        again.append(bytes(first["id"]).hex())
        reader.release()

    done = prune(repo, PruneOptions(max_unused=0.0, wait_s=600, stop=_Pauses(repaired_meanwhile)))
    condemned = done.unused_packs + done.repack_packs
    assert condemned >= 3 and done.waited_for == [] and done.rescued_packs == 0
    assert done.packs_deleted == condemned - 1 and not _garbage(repo)
    assert again[0] in _data_packs(repo) and again[0] in _index(repo)
    _assert_whole(repo, tmp_path, kept, expected_state, "indexed-again")


def test_the_next_prune_indexes_again_what_a_snapshot_that_ran_beside_the_last_one_uses(
        secret_repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A snapshot running beside a prune (synced before the index was replaced) dedups
    against condemned packs and saves after that prune gave up waiting. The next prune
    finds its lock gone, indexes again exactly the packs it uses, deletes the rest, and
    says so; from a cold catalog the snapshot restores whole (encrypted repository)."""
    repo = secret_repo
    club = Club(repo, tmp_path / "club", clock)
    club.write(*_names("a", 12), *_names("z", 8))
    first = club.snapshot()
    remove_snapshots(repo, [first])
    club.remove(*_names("z", 8))
    expected_state = club.state()
    pruner = _open(repo, tmp_path / "other-host")
    pruner.config = repo.config
    reports: list[Any] = []

    def prune_beside(progress: Any) -> None:
        if not reports:
            reports.append(prune(pruner, PruneOptions(max_unused=0.0, wait_s=0)))

    time.sleep(0.05)  # past the files cache's racy-timestamp window (not synchronisation)
    clock.advance(minutes=10)
    running = create_snapshot(repo, SnapshotOptions(source=club.root, host="h", now=clock, workers=1,
                                                    progress=prune_beside))
    assert running.stats["blobs_added"] < 5 and reports[0].pending_packs >= 4
    records = _garbage(repo)
    condemned = _condemned(records)
    used = _used(repo)
    needed = {bytes(p["id"]).hex() for r in records.values() for p in r["packs"]
              if any(bytes(b[0]) in used for b in p["blobs"])}
    assert len(needed) >= 3 and len(condemned) - len(needed) >= 2
    done = prune(pruner, PruneOptions(max_unused=1.0, wait_s=0))
    assert done.rescued_packs == len(needed) and done.pending_packs == 0
    assert (done.swept_earlier_packs, done.swept_earlier_bytes) == (
        len(condemned) - len(needed), sum(s for p, s in condemned.items() if p not in needed))
    assert needed <= set(_data_packs(repo)) and not (set(condemned) - needed) & set(_data_packs(repo))
    index = _index(repo)
    assert needed <= set(index) and all(len(rows) == len({bytes(r[0]) for r in rows}) for rows in index.values())
    assert not _garbage(repo)
    pruner.close()
    _assert_whole(repo, tmp_path, running.info, expected_state, "rescued-next")


@pytest.mark.parametrize("lapses_at", ["repacking 1/", "wrote "])
def test_a_prune_whose_lock_lapsed_stops_before_its_next_change(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, lapses_at: str) -> None:
    """Suspended (or cut off) past half the stale time, a prune may have been taken for
    dead and a second one started: it must not write an index object or delete anything
    after that, whether it was repacking or about to replace the index."""
    club, kept = _forget_all_but_last(repo, tmp_path, clock)
    expected_state = club.state()
    index_before = {key for key, _ in repo.backend.list(INDEX_PREFIX)}
    packs_before = _data_packs(repo)
    now = time.time()

    def suspended(text: str) -> None:
        if text.startswith(lapses_at):
            monkeypatch.setattr(time, "time", lambda: now + 20 * 60)  # woke up 20 minutes later

    with pytest.raises(RepositoryLocked):
        prune(repo, PruneOptions(max_unused=0.0, wait_s=0, progress=suspended))
    monkeypatch.undo()
    index_after = {key for key, _ in repo.backend.list(INDEX_PREFIX)}
    assert index_before <= index_after and set(packs_before) <= set(_data_packs(repo))
    if lapses_at == "repacking 1/":
        assert index_after == index_before and not _garbage(repo)  # not even the repack's own index object
    _assert_whole(repo, tmp_path, kept, expected_state, "lapsed-" + lapses_at.split()[0], warned="not in any index")
    prune(repo, PruneOptions(max_unused=0.0, wait_s=0))  # the next one finishes the work
    _assert_whole(repo, tmp_path, kept, expected_state, "after-lapsed-" + lapses_at.split()[0])


def test_prune_keeps_the_pages_of_every_kept_database_version(repo: Repository, tmp_path: Path,
                                                              clock: Clock) -> None:
    """A database is stored as pages behind a page map; consecutive snapshots share most
    pages, and prune marks only the pages that differ from the version it marked before
    (compared a block of ids at a time). Every page a kept version needs must survive a
    prune that repacks everything, and so must every part of a split directory and a
    directory that changed beside one that did not: each kept snapshot restores exactly."""
    import sqlite3
    from engine.tree import SPLIT_ABOVE
    club = Club(repo, tmp_path / "club", clock)
    for n in range(SPLIT_ABOVE + 44):  # blobs/ is split into parts
        (club.root / "blobs" / f"p{n:03d}").write_bytes(os.urandom(40))
    (club.root / "db").mkdir()
    database = club.root / "db" / "app.sqlite"
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(n, os.urandom(1900)) for n in range(2300)])  # > 1024 pages
    conn.commit()
    snaps, states = [], []

    def snapshot() -> None:
        snaps.append(club.snapshot())
        states.append({**club.state(), "db": hashlib.sha256(database.read_bytes()).hexdigest()})

    snapshot()
    for step in (1, 2):  # pages changed at the start and past the first block of ids
        conn.executemany("UPDATE t SET body = ? WHERE id = ?",
                         [(os.urandom(1900), n) for n in (*range(step * 10, step * 10 + 6), *range(2200, 2204))])
        conn.commit()
        snapshot()
    conn.close()
    (club.root / "blobs" / "p000").write_bytes(os.urandom(40))  # blobs/ changes, db/ does not
    snapshot()
    entry = next(e for p, e in walk(repo, ChunkId(snaps[0].tree)) if p == b"db/app.sqlite")
    assert "page_map" in entry and database.stat().st_size > 1100 * 4096
    assert "parts" in unpack_record(repo.read_blob(ChunkId(next(
        e for p, e in walk(repo, ChunkId(snaps[0].tree)) if p == b"blobs")["tree"])), "blobs")
    remove_snapshots(repo, [snaps[0]])
    done = prune(repo, PruneOptions(max_unused=0.0))
    assert done.packs_deleted > 0 and done.repack_packs > 0
    fresh = _open(repo, tmp_path / "cold-db")
    try:
        result = check(fresh, read_data=True)
        assert result.ok and not result.warnings, (result.errors, result.warnings)
        for n in (1, 2, 3):
            target = tmp_path / f"restored-db-{n}"
            apply_restore(fresh, plan_restore(fresh, snaps[n], target))
            restored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (target / "blobs").iterdir()}
            restored["db"] = hashlib.sha256((target / "db" / "app.sqlite").read_bytes()).hexdigest()
            assert restored == states[n], n
    finally:
        fresh.close()


def test_a_repack_writes_out_what_it_copied_batch_by_batch(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a repack holds before writing it out is bounded however much moves: once a
    batch of blobs is copied it is written out (its pack closed and recorded) before the
    next old pack is read. Here five packs each give two blobs, the batch is four, and
    new packs could hold sixteen: three new packs (4, 4, 2)."""
    monkeypatch.setattr(prune_module, "USED_BATCH", 4)
    club, kept = _three_generations(repo, tmp_path, clock)
    expected_state = club.state()
    usage = _usage(repo)
    partly = {p for p, (count, _, garbage) in usage.items() if count and garbage}
    assert sorted(usage[p][0] for p in partly) == [2] * 5
    before = _data_packs(repo)
    repo.config = replace(repo.config, pack_size=4 * max(before.values()) + 1)  # none small, sixteen blobs a pack
    done = prune(repo, PruneOptions(max_unused=0.0))
    assert done.repack_packs == 5 and done.repack_small_packs == 0
    written = set(_data_packs(repo)) - set(before)
    assert sorted(len(_index(repo)[p]) for p in written) == [2, 4, 4]
    _assert_whole(repo, tmp_path, kept, expected_state, "batches")
