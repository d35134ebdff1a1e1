"""Damage found is damage healed: a damaged chunk is stored again by the next snapshot,
one bad index object or snapshot record blocks nothing that does not need it, `status`
fails until the damage is repaired and checked clean, and `repair` heals what can be
healed and names what cannot (issue 16, observations 1-3)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from benchmarks.clubstate import club_state
from engine import Repository, check, create_snapshot
from engine.backends.fs import FsBackend
from engine.format import DATA_PREFIX, DAMAGE_PREFIX, PackId
from engine.packs import read_trailer
from engine.snapshot import SnapshotOptions

from .conftest import TEST_PASSWORD, Clock

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _flip(path: Path, at: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3 if at is None else at] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(raw))


def _largest_pack(repo: Path) -> Path:
    return max((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture
def club(tmp_path: Path) -> Path:
    generate(tmp_path / "data", "tiny", seed=9)
    return tmp_path / "data"


def test_known_damage_is_stored_again_and_status_fails_until_repaired(cli: Cli, club: Path, tmp_path: Path) -> None:
    """Observation 1: after `check --read-data` finds a flipped byte, the next snapshot of
    the intact data dir stores the damaged chunks again (it does not dedup against
    them), `status` exits 22 until `repair packs` and a clean check, and both the new and
    the old snapshot restore."""
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    first = json.loads(cli("snapshot", str(club), "--json", repo=repo).stdout)
    victim = _largest_pack(repo)
    _flip(victim)

    found = cli("check", "--read-data", repo=repo)
    assert found.returncode == 18 and victim.name in found.stdout
    assert list((repo / "damage").iterdir()), "the damage is recorded in the repository"
    assert cli("status", repo=repo).returncode == 22

    second = cli("snapshot", str(club), "--json", repo=repo)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["stats"]["blobs_added"] > 0, "damaged chunks were stored again"
    status = cli("status", repo=repo)
    assert status.returncode == 22 and "repair packs" in status.stderr

    restored = cli("restore", "latest", "--target", str(tmp_path / "latest"), repo=repo)
    assert restored.returncode == 0, restored.stderr
    assert club_state(tmp_path / "latest", live=False) == club_state(club, live=True)
    # The chunk ids are content addresses: the old snapshot is whole again too.
    old = cli("restore", first["id"], "--target", str(tmp_path / "first"), repo=repo)
    assert old.returncode == 0, old.stderr

    dry = json.loads(cli("repair", "packs", "--dry-run", "--json", repo=repo).stdout)
    assert dry["packs_repaired"] and dry["blobs_lost"] == 0 and victim.exists()
    repaired = cli("repair", "packs", "--json", repo=repo)
    assert repaired.returncode == 0, repaired.stderr
    assert not victim.exists() and not list((repo / "damage").iterdir())
    assert cli("status", repo=repo).returncode == 22, "the last check still found errors"
    assert cli("check", "--read-data", repo=repo).returncode == 0
    assert cli("status", repo=repo).returncode == 0


def test_damage_found_by_a_restore_is_recorded_for_the_next_snapshot(cli: Cli, club: Path, tmp_path: Path) -> None:
    """A restore whose blob fails authentication records it: no check needed for the next
    snapshot to store it again."""
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    cli("snapshot", str(club), repo=repo)
    _flip(_largest_pack(repo))
    assert cli("restore", "latest", "--target", str(tmp_path / "t"), repo=repo).returncode == 12
    assert list((repo / "damage").iterdir())
    snap = json.loads(cli("snapshot", str(club), "--json", repo=repo).stdout)
    assert snap["stats"]["blobs_added"] > 0
    assert cli("restore", "latest", "--target", str(tmp_path / "t2"), repo=repo).returncode == 0
    assert club_state(tmp_path / "t2", live=False) == club_state(club, live=True)


def test_one_damaged_index_object_blocks_nothing_on_a_fresh_host(cli: Cli, club: Path, tmp_path: Path) -> None:
    """Observation 2: with an empty catalog, one flipped byte in one index object; every
    pack is intact. Listing, restoring, snapshotting and rebuilding the catalog work, each
    with one warning naming the object and `repair index`; `repair index` heals it."""
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    cli("snapshot", str(club), repo=repo)
    (club / "blobs" / "extra.bin").write_bytes(b"x" * 5000)
    cli("snapshot", str(club), repo=repo)
    victim = sorted((repo / "index").iterdir())[0]
    _flip(victim, at=40)

    for number, command in enumerate((["snapshots"], ["restore", "latest", "--target", str(tmp_path / "r")],
                                      ["snapshot", str(club)], ["cache", "--rebuild", "--from-packs"])):
        result = cli(*command, repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / f"fresh-{number}")})
        assert result.returncode == 0, (command, result.stderr)
        warnings = [line for line in result.stderr.splitlines() if victim.name in line]
        if command[0] != "snapshots":  # a listing reads no index
            assert len(warnings) == 1 and "repair index" in warnings[0], (command, result.stderr)
        assert "Traceback" not in result.stderr
    assert club_state(tmp_path / "r", live=False) == club_state(club, live=True)

    assert cli("check", repo=repo).returncode == 18
    pruned = cli("prune", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh-p")})
    assert pruned.returncode == 12 and "repair index" in pruned.stderr, "the hidden blobs are no garbage"
    fixed = cli("repair", "index", "--json", repo=repo)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["damaged_index_objects"] == [f"index/{victim.name}"]
    assert not victim.exists()
    assert cli("check", "--read-data", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh-x")}).returncode == 0
    assert cli("prune", repo=repo).returncode == 0


def test_one_damaged_snapshot_record_blocks_no_backup(cli: Cli, club: Path, tmp_path: Path) -> None:
    """Observation 3: from an empty catalog, one damaged snapshot record; listing, status,
    snapshot, cache --rebuild work; `forget ID` removes it, and `repair snapshots` removes
    the others."""
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    ids = [json.loads(cli("snapshot", str(club), "--json", repo=repo).stdout)["id"] for _ in range(3)]
    records = sorted((repo / "snapshots").iterdir())
    _flip(records[0], at=40)
    _flip(records[1], at=40)

    fresh = {"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh")}
    listing = cli("snapshots", "--json", repo=repo, env=fresh)
    assert listing.returncode == 0 and [s["id"] for s in json.loads(listing.stdout)] == [ids[2]]
    assert "repair snapshots" in listing.stderr
    status = cli("status", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh-2")})
    assert "Traceback" not in status.stderr and status.returncode == 0
    assert cli("snapshot", str(club), repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh-3")}).returncode == 0
    assert cli("cache", "--rebuild", repo=repo, env=fresh).returncode == 0
    assert cli("forget", ids[0][:8], repo=repo, env=fresh).returncode == 0
    assert not records[0].exists()

    # A host with nothing cached can only remove it; the host that took the snapshot has
    # the record as stored in its catalog, and puts it back.
    fresh_repair = {"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh-r")}
    dry = json.loads(cli("repair", "snapshots", "--dry-run", "--json", repo=repo, env=fresh_repair).stdout)
    assert len(dry["records_removed"]) == 1 and records[1].exists()
    fixed = json.loads(cli("repair", "snapshots", "--json", repo=repo).stdout)
    assert fixed["records_recovered"] == [f"snapshots/{records[1].name}"] and not fixed["records_removed"]
    assert ids[1] in [s["id"] for s in json.loads(cli("snapshots", "--json", repo=repo, env=fresh_repair).stdout)]
    assert cli("check", repo=repo, env=fresh_repair).returncode == 0


def test_lost_data_is_named_and_snapshots_are_replaced_without_it(cli: Cli, club: Path, tmp_path: Path) -> None:
    """A pack that is gone holds the only copy of a file the source no longer has:
    `repair packs` names the file in each snapshot, `repair snapshots` replaces those
    snapshots by ones without it (tagged repaired), and everything else restores."""
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    doomed = club / "blobs" / "doomed" / "1.0.0" / "artifacts" / "package.tar.gz"
    doomed.parent.mkdir(parents=True)
    doomed.write_bytes(bytes(range(256)) * 400)
    first = json.loads(cli("snapshot", str(club), "--json", repo=repo).stdout)["id"]
    shutil.rmtree(club / "blobs" / "doomed")
    second = json.loads(cli("snapshot", str(club), "--json", repo=repo).stdout)["id"]
    inspect = Repository.open(FsBackend(repo), tmp_path / "inspect", lambda: TEST_PASSWORD.encode())
    inspect.sync_index()
    holder = inspect.catalog.lookup(inspect.chunk_id(doomed_bytes := bytes(range(256)) * 400))
    inspect.close()
    assert holder is not None and doomed_bytes
    pack = repo / "data" / holder.pack.hex()[:2] / holder.pack.hex()
    pack.unlink()

    assert cli("check", repo=repo).returncode == 18  # the indexed pack is missing: recorded
    assert cli("snapshot", str(club), repo=repo).returncode == 0  # stores again what the source still has
    report = json.loads(cli("repair", "packs", "--json", repo=repo).stdout)
    assert f"snapshot {first[:8]} blobs/doomed/1.0.0/artifacts/package.tar.gz" in report["unrecoverable"]
    assert not any(second[:8] in line for line in report["unrecoverable"])
    fixed = json.loads(cli("repair", "snapshots", "--json", repo=repo).stdout)
    assert [r["id"] for r in fixed["records_replaced"]] == [first]
    assert fixed["records_replaced"][0]["removed"] == ["blobs/doomed/1.0.0/artifacts/package.tar.gz"]
    assert cli("check", "--read-data", repo=repo).returncode == 0
    listing = json.loads(cli("snapshots", "--json", repo=repo).stdout)
    assert len(listing) == 3 and "repaired" in listing[0]["tags"] and listing[0]["id"] != first
    target = tmp_path / "old"
    assert cli("restore", listing[0]["id"], "--target", str(target), repo=repo).returncode == 0
    assert not (target / "blobs" / "doomed" / "1.0.0" / "artifacts" / "package.tar.gz").exists()
    assert club_state(target, live=False) == club_state(club, live=True)  # all else is as it was


def test_a_damaged_record_is_put_back_from_the_summary(repo: Repository, club: Path, clock: Clock) -> None:
    """A snapshot summary holds a copy of every record: `repair snapshots` puts a
    damaged record back from it instead of removing it."""
    from engine.repair import repair_snapshots

    repo.summary_every = 1
    for _ in range(2):
        create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
        clock.advance(minutes=1)
    keys = [key for _, _, key in repo.snapshot_keys()]
    path = Path(repo.backend.location) / keys[0]
    _flip(path, at=40)
    repo.catalog.remove_snapshots(keys)
    report = repair_snapshots(repo)
    assert report.records_recovered == [keys[0]] and not report.records_removed
    assert check(repo).ok


def test_a_pack_with_a_damaged_trailer_keeps_every_blob(repo: Repository, club: Path, clock: Clock) -> None:
    """A flipped byte outside every blob (the trailer) damages no blob: check records the
    pack, repair packs copies all of its blobs and nothing is lost."""
    from engine.repair import repair_packs

    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    root = Path(repo.backend.location)
    key, size = max(repo.backend.list(DATA_PREFIX), key=lambda item: item[1])
    entries = read_trailer(repo.backend, PackId.from_hex(key.rsplit("/", 1)[-1]), size, repo.cipher)
    _flip(root / key, at=size - 12)  # inside the trailer
    assert max(e.offset + e.length for e in entries) < size - 12
    report = check(repo, read_data=True)
    assert not report.ok
    assert list(repo.backend.list(DAMAGE_PREFIX))
    repaired = repair_packs(repo)
    assert repaired.blobs_lost == 0 and repaired.blobs_salvaged == len(entries)
    assert check(repo, read_data=True).ok


class _FlakyBackend(FsBackend):
    """Fault injection on the real local backend: GETs of keys starting with ``prefix``
    fail as an unreachable storage would, ``failures`` times, after ``skip`` succeed."""

    def __init__(self, root: Path, prefix: str, failures: int, skip: int = 0) -> None:
        super().__init__(root)
        self.prefix, self.failures, self.skip = prefix, failures, skip

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith(self.prefix) and self.failures:
            if self.skip:
                self.skip -= 1
            else:
                self.failures -= 1
                from engine.errors import BackendError
                raise BackendError(f"{key}: connection reset (injected)")
        return super().get(key, offset, length)


def _flaky(repo: Repository, cache: Path, prefix: str, failures: int, skip: int = 0) -> Repository:
    return Repository.open(_FlakyBackend(Path(repo.backend.location), prefix, failures, skip), cache)


def test_transient_read_errors_are_no_damage(repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """A pack that cannot be read this time is a check error, never a damage record:
    that would make status fail and repair drop intact data."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    flaky = _flaky(repo, tmp_path / "flaky", DATA_PREFIX, failures=4)
    report = check(flaky, read_data=True)
    assert not report.ok and any("not read back" in e for e in report.errors)
    assert not list(flaky.backend.list(DAMAGE_PREFIX))
    flaky.close()


def test_repairs_stop_before_deleting_when_storage_fails(repo: Repository, club: Path, clock: Clock,
                                                         tmp_path: Path) -> None:
    """An index object or a tree that cannot be read this time is not damage: repair
    index and repair snapshots stop, and delete nothing."""
    from engine.errors import BackendError
    from engine.format import INDEX_PREFIX, SNAPSHOT_PREFIX
    from engine.repair import repair_index, repair_snapshots

    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    index_before = sorted(repo.backend.list(INDEX_PREFIX))
    flaky = _flaky(repo, tmp_path / "c1", INDEX_PREFIX, failures=1, skip=len(index_before) + 1)
    with pytest.raises(BackendError):
        repair_index(flaky)  # the second read of an index object fails
    flaky.close()
    assert sorted(repo.backend.list(INDEX_PREFIX)) == index_before
    records = sorted(repo.backend.list(SNAPSHOT_PREFIX))
    flaky = _flaky(repo, tmp_path / "c2", DATA_PREFIX, failures=100)
    with pytest.raises(BackendError):
        repair_snapshots(flaky)  # no tree can be read: nothing is lost for it
    flaky.close()
    assert sorted(repo.backend.list(SNAPSHOT_PREFIX)) == records
    assert check(repo, read_data=True).ok


def test_a_host_that_loaded_the_damaged_copy_switches_to_the_intact_one(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """Two copies of the same blobs in two packs (two writers stored them); a host whose
    catalog chose the one that is later damaged learns of the damage from another host's
    check and reads the intact copy."""
    from engine import apply_restore, plan_restore
    from engine.repository import Repository as Repo

    snap = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock)).info
    key, size = max(repo.backend.list(DATA_PREFIX), key=lambda item: item[1])
    pack = PackId.from_hex(key.rsplit("/", 1)[-1])
    entries = read_trailer(repo.backend, pack, size, repo.cipher)
    repo.start_session()
    for entry in entries:  # a second copy of every blob of the largest pack, in a new pack
        repo.copy_blob(entry, repo.backend.get(key, entry.offset, entry.length))
    repo.flush()
    host_a = Repo.open(FsBackend(Path(repo.backend.location)), tmp_path / "host-a")
    host_a.sync_index()
    chosen = host_a.catalog.lookup(entries[0].id)
    assert chosen is not None
    _flip(Path(repo.backend.location) / f"data/{chosen.pack.hex()[:2]}/{chosen.pack.hex()}")
    host_b = Repo.open(FsBackend(Path(repo.backend.location)), tmp_path / "host-b")
    assert not check(host_b, read_data=True).ok  # records the damage
    host_b.close()
    target = tmp_path / "restored"
    apply_restore(host_a, plan_restore(host_a, snap, target), set_owner=False)
    assert club_state(target, live=False) == club_state(club, live=True)
    host_a.close()


def test_a_parent_page_map_lost_from_the_repository_is_never_reused(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """A host still has the parent's page map in its tree cache after its pack was lost:
    the next snapshot of the unchanged database must store a new map, not refer to the
    lost one (it would restore without its database)."""
    from engine import apply_restore, plan_restore
    from engine.tree import lookup

    first = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock)).info
    clock.advance(minutes=5)
    page_map = lookup(repo, first.tree, b"db/club.db")[-1]["page_map"]  # type: ignore[index]
    holder = repo.catalog.lookup(page_map)
    assert holder is not None
    (Path(repo.backend.location) / f"data/{holder.pack.hex()[:2]}/{holder.pack.hex()}").unlink()
    assert not check(repo).ok  # the missing pack is recorded as damage
    second = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    assert any("parent page map" in w for w in second.warnings), second.warnings
    fresh = Repository.open(FsBackend(Path(repo.backend.location)), tmp_path / "fresh")
    target = tmp_path / "restored"
    apply_restore(fresh, plan_restore(fresh, second.info, target), set_owner=False)
    assert club_state(target, live=False) == club_state(club, live=True)
    fresh.close()
