"""forget and prune: space comes back as the dry run says, kept snapshots stay whole, and
a snapshot running beside a prune never ends up needing a deleted chunk (format §10)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from benchmarks.clubgen import generate, one_day
from benchmarks.clubstate import club_state
from engine import PruneOptions, Repository, apply_restore, check, create_snapshot, plan_restore, prune
from engine.errors import RepositoryLocked
from engine.format import GARBAGE_PREFIX, LOCKS_PREFIX, SUMMARY_PREFIX, BlobType, Kind, pack_key, seal_object
from engine.forget import remove_snapshots
from engine.locks import Lock, process_space
from engine.packs import PackBuilder
from engine.pagemap import file_chunks
from engine.snapshot import Progress, SnapshotOptions
from engine.tree import walk

from .conftest import Clock, reopen

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _repo_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    generate(root, "tiny", seed=21)
    time.sleep(0.1)  # past the files cache's racy-timestamp window
    return root


def _snapshot(repo: Repository, data: Path, clock: Clock, **extra: Any) -> Any:
    clock.advance(minutes=10)
    return create_snapshot(repo, SnapshotOptions(source=data, host="test-host", now=clock, **extra))


def _restored_state(repo: Repository, snap: Any, target: Path) -> dict[str, object]:
    plan = plan_restore(repo, snap, target)
    apply_restore(repo, plan)
    return club_state(target, live=False)


def test_forget_then_prune_frees_what_the_dry_run_predicted(cli: Cli, data: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    for day in range(1, 6):
        assert cli("snapshot", str(data), repo=repo).returncode == 0
        one_day(data, seed=21, day=day)
    snapshots = _json(cli("snapshots", "--json", repo=repo))
    kept = [s["id"] for s in snapshots[-2:]]
    before_states = {}
    for snap_id in kept:
        assert cli("restore", snap_id, "--target", str(tmp_path / f"before-{snap_id[:8]}"), repo=repo).returncode == 0
        before_states[snap_id] = club_state(tmp_path / f"before-{snap_id[:8]}", live=False)

    forgotten = _json(cli("forget", "--keep-last", "2", "--json", repo=repo))
    assert len(forgotten["removed"]) == 3 and forgotten["kept"] == 2
    size_before = _repo_bytes(repo)
    listing_before = sorted(str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file())
    dry = _json(cli("prune", "--dry-run", "--json", repo=repo))
    assert dry["predicted_freed_bytes"] > 0 and dry["repack_packs"] + dry["unused_packs"] > 0
    assert _repo_bytes(repo) == size_before, "a dry run writes nothing"
    assert sorted(str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file()) == listing_before
    done = _json(cli("prune", "--json", repo=repo))
    freed = size_before - _repo_bytes(repo)
    assert abs(freed - dry["predicted_freed_bytes"]) <= 0.05 * dry["predicted_freed_bytes"], (freed, dry)
    assert done["pending_packs"] == 0 and not list((repo / "garbage").glob("*"))
    assert done["index_objects_after"] < done["index_objects_before"]

    result = cli("check", "--read-data", "--json", repo=repo)
    assert _json(result)["ok"] and not _json(result)["warnings"]
    for snap_id in kept:
        target = tmp_path / f"after-{snap_id[:8]}"
        assert cli("restore", snap_id, "--target", str(target), repo=repo).returncode == 0
        assert club_state(target, live=False) == before_states[snap_id]
    # A second prune finds nothing more to do.
    again = _json(cli("prune", "--json", repo=repo))
    assert again["packs_deleted"] == 0 and again["repack_packs"] == 0


def test_prune_keeps_every_part_of_a_split_tree(repo: Repository, data: Path, clock: Clock, tmp_path: Path,
                                                cache_dir: Path) -> None:
    """blobs/ with more than SPLIT_ABOVE entries is stored as a tree of parts: prune must mark
    each part and everything under it, or the kept snapshots lose their packages."""
    from engine.tree import SPLIT_ABOVE

    blobs = data / "blobs"
    for n in range(400 - len(list(blobs.iterdir()))):
        package = blobs / f"zz-extra-{n:03d}"
        package.mkdir()
        (package / "1.0.0.tar.gz").write_bytes(f"package {n} ".encode() * 40 + os.urandom(64))
    assert len(list(blobs.iterdir())) > SPLIT_ABOVE
    time.sleep(0.1)  # past the files cache's racy-timestamp window (not synchronisation)
    first = _snapshot(repo, data, clock)
    blobs_tree = next(e for p, e in walk(repo, first.info.tree) if p == b"blobs")
    from engine.format import unpack_record
    assert "parts" in unpack_record(repo.read_blob(blobs_tree["tree"]), "blobs"), "blobs/ must be a split tree"
    one_day(data, seed=21, day=1)
    for n in range(0, 400, 7):  # changes in several parts
        extra = blobs / f"zz-extra-{n:03d}"
        if extra.exists():
            (extra / "1.0.1.tar.gz").write_bytes(os.urandom(300))
    time.sleep(0.1)
    second = _snapshot(repo, data, clock)
    one_day(data, seed=21, day=2)
    time.sleep(0.1)
    third = _snapshot(repo, data, clock)
    expected = {snap.info.id: _restored_state(repo, snap.info, tmp_path / f"before-{n}")
                for n, snap in enumerate((second, third))}

    remove_snapshots(repo, [first.info])
    report = prune(repo, PruneOptions(max_unused=0.0))
    assert report.packs_deleted + report.repack_packs > 0, report
    fresh = reopen(repo, tmp_path / "fresh-cache")
    try:
        result = check(fresh, read_data=True)
        assert result.ok, result.errors
        for n, snap in enumerate((second, third)):
            assert _restored_state(fresh, snap.info, tmp_path / f"after-{n}") == expected[snap.info.id]
    finally:
        fresh.close()


def test_max_unused_bounds_what_is_repacked(repo: Repository, data: Path, clock: Clock, cache_dir: Path) -> None:
    first = _snapshot(repo, data, clock)
    one_day(data, seed=21, day=1)
    _snapshot(repo, data, clock)
    remove_snapshots(repo, [first.info])
    lenient = prune(repo, PruneOptions(max_unused=float("inf"), dry_run=True))
    strict = prune(repo, PruneOptions(max_unused=0.0, dry_run=True))
    assert lenient.repack_packs == 0 and lenient.garbage_left_bytes > 0
    assert strict.repack_packs > 0 and strict.garbage_left_bytes == 0
    assert strict.predicted_freed_bytes > lenient.predicted_freed_bytes


def test_unindexed_packs_are_deleted(repo: Repository, data: Path, clock: Clock) -> None:
    _snapshot(repo, data, clock)
    builder = PackBuilder(BlobType.DATA, repo.cipher)
    raw = os.urandom(5000)
    from engine.format import encode_blob
    blob_id = repo.chunk_id(raw)
    builder.add(blob_id, encode_blob(raw, blob_id, repo.cipher), len(raw))
    pack_id, pack_data, _ = builder.finish()
    repo.backend.put(pack_key(pack_id), pack_data)  # as a killed snapshot leaves one
    assert any("not in any index" in w for w in check(repo).warnings)
    report = prune(repo, PruneOptions())
    assert report.unindexed_packs == 1 and report.packs_deleted == 1
    assert not check(repo, read_data=True).warnings and check(repo).ok


def test_a_snapshot_running_beside_prune_keeps_every_chunk_it_uses(
        repo: Repository, data: Path, clock: Clock, cache_dir: Path, tmp_path: Path) -> None:
    """The hazard prune exists to avoid: a snapshot whose catalog still lists blobs a prune
    condemns dedups against them. Here the prune runs inside the snapshot (from its
    progress callback, through another host's catalog), so the timing is certain."""
    first = _snapshot(repo, data, clock)
    remove_snapshots(repo, [first.info])  # every blob of the data dir is garbage now...
    pruner = Repository.open(repo.backend, tmp_path / "other-host-cache", lambda: b"")
    reports = []

    def prune_once(progress: Progress) -> None:
        if not reports:
            reports.append(prune(pruner, PruneOptions(wait_s=0)))

    # ...but this snapshot's catalog synced before the prune, and dedups against them all.
    running = _snapshot(repo, data, clock, progress=prune_once)
    report = reports[0]
    assert report.unused_packs > 0 and report.pending_packs > 0, report
    garbage = [key for key, _ in repo.backend.list(GARBAGE_PREFIX)]
    assert len(garbage) == 1 and running.stats["blobs_added"] < 20
    # Readers take the condemned packs' blobs meanwhile: nothing is missing.
    assert check(repo, read_data=True).ok
    expected = club_state(data, live=False)
    assert _restored_state(reopen(repo, tmp_path / "cold"), running.info, tmp_path / "r1") == expected

    # The next prune finds the snapshot's lock gone: it re-indexes what the snapshot uses.
    second = prune(pruner, PruneOptions(wait_s=0))
    assert second.rescued_packs > 0 and second.pending_packs == 0
    assert not list(repo.backend.list(GARBAGE_PREFIX))
    fresh = reopen(repo, tmp_path / "cold-2")
    report_after = check(fresh, read_data=True)
    assert report_after.ok and not report_after.warnings, report_after
    assert _restored_state(fresh, running.info, tmp_path / "r2") == expected


def test_a_snapshot_started_after_the_mark_stores_condemned_blobs_anew(
        repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    first = _snapshot(repo, data, clock)
    remove_snapshots(repo, [first.info])
    holder = Lock(repo.backend, repo.cipher, "read").acquire()  # keeps the garbage pending
    report = prune(reopen(repo, tmp_path / "pruner"), PruneOptions(wait_s=0))
    assert report.pending_packs > 0
    later = _snapshot(repo, data, clock)
    assert later.stats["blobs_added"] > 100  # nothing taken from a condemned pack
    live = set(repo.catalog.packs())
    for _, entry in walk(repo, later.info.tree):
        if entry["type"] == "file":
            for chunk in file_chunks(repo, entry):
                assert repo.locate(chunk).pack in live
    holder.release()
    final = prune(reopen(repo, tmp_path / "pruner"), PruneOptions(wait_s=0))
    assert final.rescued_packs == 0 and final.swept_earlier_packs == report.pending_packs
    assert check(reopen(repo, tmp_path / "cold"), read_data=True).ok
    assert _restored_state(repo, later.info, tmp_path / "r") == club_state(data, live=False)


def test_dedup_still_works_after_a_repack(repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    first = _snapshot(repo, data, clock)
    one_day(data, seed=21, day=1)
    time.sleep(0.1)
    _snapshot(repo, data, clock)
    remove_snapshots(repo, [first.info])
    report = prune(repo, PruneOptions(max_unused=0.0))
    assert report.repack_packs > 0
    for catalog_dir in (None, tmp_path / "cold"):
        reader = repo if catalog_dir is None else reopen(repo, catalog_dir)
        again = _snapshot(reader, data, clock)
        assert again.stats["bytes_added"] < 200_000, again.stats  # trees and the DB's map, no data


def test_a_second_prune_is_refused_and_a_dead_ones_lock_is_not(
        cli: Cli, repo: Repository, data: Path, clock: Clock) -> None:
    _snapshot(repo, data, clock)
    repo_path = Path(repo.backend.location)
    live = Lock(repo.backend, repo.cipher, "prune").acquire()  # this test process: alive
    result = cli("prune", repo=repo_path)
    assert result.returncode == RepositoryLocked.exit_code, result.stderr
    assert result.stderr.count("\n") == 1 and "another prune is running" in result.stderr
    live.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"kind": "prune", "host": socket.gethostname(), "pid": int(dead.stdout), "space": process_space(),
              "created": "2026-01-01T00:00:00+00:00", "refreshed": "2099-01-01T00:00:00+00:00"}
    # The same dead pid in another pid namespace (a container with this host name) proves
    # nothing: that lock stays live.
    elsewhere = record | {"space": "another-boot/4026531836"}
    repo.backend.put(f"{LOCKS_PREFIX}prune-feedfeedfeedfeed", seal_object(Kind.LOCK, elsewhere, repo.cipher))
    assert cli("prune", repo=repo_path).returncode == RepositoryLocked.exit_code
    repo.backend.delete(f"{LOCKS_PREFIX}prune-feedfeedfeedfeed")
    repo.backend.put(f"{LOCKS_PREFIX}prune-deadbeefdeadbeef", seal_object(Kind.LOCK, record, repo.cipher))
    done = _json(cli("prune", "--json", repo=repo_path))
    assert done["stale_locks_removed"] == 1 and not list(repo.backend.list(LOCKS_PREFIX))


def test_a_lock_that_lapsed_stops_its_owner(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process suspended (or cut off) for longer than half the stale time may have been
    taken for dead by a prune: it must not save what depends on its lock, even after a
    later refresh succeeded."""
    lock = Lock(repo.backend, repo.cipher, "snapshot").acquire()
    lock.ensure_held()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 20 * 60)  # woke up 20 minutes later
    lock._write()  # the refresh thread's next write succeeds...
    with pytest.raises(RepositoryLocked):
        lock.ensure_held()  # ...but the gap stays on record
    monkeypatch.undo()
    lock.release()


def test_forget_by_id_rewrites_the_summary(repo: Repository, data: Path, clock: Clock, tmp_path: Path) -> None:
    repo.summary_every = 2
    snaps = [_snapshot(repo, data, clock).info for _ in range(4)]
    assert list(repo.backend.list(SUMMARY_PREFIX))
    remove_snapshots(repo, snaps[:3])
    summaries = [key for key, _ in repo.backend.list(SUMMARY_PREFIX)]
    assert len(summaries) == 1
    from engine.format import open_object
    record = open_object(Kind.SNAPSHOT_SUMMARY, repo.backend.get(summaries[0]), summaries[0], repo.cipher)
    assert [key for key, _ in record["snapshots"]] == [snaps[3].key]
    remove_snapshots(repo, snaps[3:])
    assert not list(repo.backend.list(SUMMARY_PREFIX)) and not repo.snapshots()


def test_forget_prune_with_the_stored_policy(cli: Cli, data: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    for tag in ("a", "b", "c", "monthly"):
        assert cli("snapshot", str(data), "--tag", tag, repo=repo).returncode == 0
    result = cli("forget", "--prune", repo=repo)
    assert result.returncode == 2 and "no retention policy" in result.stderr
    assert cli("policy", "set", "--keep-last", "1", "--keep-tag", "a", "--utc", repo=repo).returncode == 0
    shown = _json(cli("policy", "show", "--json", repo=repo))
    assert shown["policy"]["last"] == 1 and shown["policy"]["tags"] == ["a"] and shown["timezone"] == "UTC"
    dry = _json(cli("forget", "--dry-run", "--json", repo=repo))
    decisions = dry["groups"][0]["decisions"]
    assert [d["keep"] for d in decisions] == [True, False, False, True]
    assert decisions[0]["reasons"] == ["last 1"] and decisions[3]["reasons"] == ["tag a"]
    assert len(_json(cli("snapshots", "--json", repo=repo))) == 4, "a dry run forgets nothing"
    done = _json(cli("forget", "--prune", "--json", repo=repo))
    assert len(done["removed"]) == 2 and done["prune"]["snapshots"] == 2
    assert [s["tags"] for s in _json(cli("snapshots", "--json", repo=repo))] == [["a"], ["monthly"]]
    assert cli("policy", "clear", repo=repo).returncode == 0
    assert cli("forget", repo=repo).returncode == 2
    assert _json(cli("check", "--read-data", "--json", repo=repo))["ok"]


def test_bad_retention_options_are_one_line_errors(cli: Cli, data: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    for args in (("--keep-within", "3 days"), ("--keep-daily", "2", "--timezone", "Mars/Olympus"),
                 ("--keep-last", "1", "--group-by", "colour"), ("--keep-last", "1", "--max-unused", "lots")):
        result = cli("forget", *args, repo=repo)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_forget_prune_on_s3(cli: Cli, data: Path, s3_url: str, tmp_path: Path) -> None:
    """The same on a real S3 endpoint (moto's server): lists, deletes, garbage records."""
    env = {"CLUBSNAP_REPO": s3_url}
    assert cli("init", env=env).returncode == 0
    for day in (1, 2, 3):
        assert cli("snapshot", str(data), env=env).returncode == 0
        one_day(data, seed=21, day=day)
    latest = _json(cli("snapshots", "--json", env=env))[-1]
    assert cli("restore", "latest", "--target", str(tmp_path / "before"), env=env).returncode == 0
    done = _json(cli("forget", "--keep-last", "1", "--prune", "--json", "--requests", env=env))
    assert len(done["removed"]) == 2 and done["prune"]["packs_deleted"] > 0
    assert done["prune"]["pending_packs"] == 0
    checked = _json(cli("check", "--read-data", "--json", env=env))
    assert checked["ok"] and not checked["warnings"]
    assert cli("restore", latest["id"], "--target", str(tmp_path / "after"), env=env).returncode == 0
    assert club_state(tmp_path / "after", live=False) == club_state(tmp_path / "before", live=False)


def test_a_slow_reader_never_brings_back_a_deleted_index_object(tmp_path: Path) -> None:
    """Processes sharing a catalog: one listed index/ and read object O, then stalled; a
    prune deleted O and another process refreshed (its listing lacks O). The stalled
    one's O is refused, or a snapshot that refreshed in between (and that the prune does
    not wait for) would dedup against O's condemned packs."""
    from engine.catalog import Catalog
    from engine.format import ChunkId, PackId
    from engine.packs import BlobEntry
    first, second = Catalog(tmp_path / "catalog.db"), Catalog(tmp_path / "catalog.db")
    entry = BlobEntry(ChunkId(b"\1" * 32), BlobType.DATA, PackId(b"\2" * 32), 8, 100, 90)
    slow, cleared = first.record_listing({"o", "n"})
    assert not cleared
    second.record_listing({"n"})  # after the prune deleted o
    assert not first.add_index("o", {entry.pack: 500}, [entry], listing=slow)
    assert first.add_index("n", {entry.pack: 500}, [entry], listing=slow)  # still listed: fine
    assert second.index_object_names() == {"n"}
    _, cleared = second.record_listing(set())  # n deleted too: the catalog starts again
    assert cleared and not second.index_object_names() and not second.lookup(entry.id)
