"""One consistent cut between club.db and blobs/ (engine/consistency.py): blobs are
scanned before the databases are pinned, a named blob the scan missed is looked for
again, the databases are pinned again while club deletes what a pin names, a lost blob
(named, missing, still named by the live database) is carried forward and reported, a
capture that looks wrong is loud, and under heavy churn in either write order every
snapshot is consistent and complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import ChurnWriter, generate
from benchmarks.clubgen.churn import ORDERS
from benchmarks.churn_cut import in_step
from engine import Repository, apply_restore, create_snapshot, plan_restore
from engine import snapshot as snapshot_module
from engine.clubcheck import Expected, check_club
from engine.health import repository_status
from engine.snapshot import SnapshotOptions
from engine.sources import files as files_module

from .conftest import Clock

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def club(tmp_path: Path) -> Path:
    generate(tmp_path / "data", "tiny", seed=5)
    time.sleep(0.1)
    return tmp_path / "data"


def _delete_rows(club: Path, *versions: tuple[str, str]) -> None:
    """club's row delete of versions (their blobs are gone already), in its own commit."""
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None, timeout=5)
    conn.execute("PRAGMA foreign_keys = ON")  # as club's connection: the version's rows cascade
    try:
        for package, version in versions:
            conn.execute("DELETE FROM package_versions WHERE package_name = ? AND version = ?", (package, version))
    finally:
        conn.close()


def _insert_version(club: Path, package: str, version: str, tarball: bytes) -> None:
    """A publish's row commit (its tarball to be written after, in club's order)."""
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None, timeout=5)
    try:
        conn.execute("INSERT INTO package_versions (package_name, version, pubspec_json, archive_size_bytes, "
                     "archive_sha256, published_at) VALUES (?, ?, '{}', ?, ?, 0)",
                     (package, version, len(tarball), hashlib.sha256(tarball).hexdigest()))
    finally:
        conn.close()


def _version_of(tarball: Path) -> tuple[str, str]:
    return tarball.parent.parent.parent.name, tarball.parent.parent.name


def _deletable(club: Path) -> list[Path]:
    """Tarballs of versions no package names as its latest: club deletes them without
    a latest-pointer recompute."""
    conn = sqlite3.connect(f"file:{club / 'db' / 'club.db'}?mode=ro", uri=True)
    try:
        latest = {(p, v) for p, v in conn.execute("SELECT name, latest_version FROM packages")}
    finally:
        conn.close()
    return [t for t in sorted(club.glob("blobs/*/*/artifacts/package.tar.gz")) if _version_of(t) not in latest]


def test_versions_deleted_during_the_blob_scan_are_neither_carried_nor_lost(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """club deletes versions (blobs, then rows) and publishes one (row, then blob) while
    blobs/ is scanned: the pin after the scan names neither deleted version, and the
    published tarball is found by the second look."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    clock.advance(minutes=5)
    victims = _deletable(club)[:2]
    package = victims[0].parent.parent.parent.name
    published = club / "blobs" / package / "9.9.9" / "artifacts" / "package.tar.gz"
    original = snapshot_module.scan_tier

    def racing_scan(root: bytes, tier: str, scan: snapshot_module.Scan) -> None:
        if tier == "blobs":
            for tarball in victims:  # delete version: blobs first, then the row
                shutil.rmtree(tarball.parent.parent)
            _delete_rows(club, *map(_version_of, victims))
            _insert_version(club, package, "9.9.9", b"racing tarball")  # publish: the row first
        original(root, tier, scan)
        if tier == "blobs":  # ... and its tarball once the scan has passed
            published.parent.mkdir(parents=True)
            published.write_bytes(b"racing tarball")

    monkeypatch.setattr(snapshot_module, "scan_tier", racing_scan)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    record = result.info.record
    assert not result.partial, result.errors
    assert record["verified"]["consistent"], record["verified"]
    assert not {"carried_forward", "dangling", "lost"} & set(record)
    assert record["stats"]["blobs_looked_again"] == 1

    target = tmp_path / "restored"
    apply_restore(repo, plan_restore(repo, result.info, target))
    report = check_club(target)
    assert report.ok, report.missing
    assert (target / published.relative_to(club)).read_bytes() == b"racing tarball"


def test_a_delete_straddling_the_pin_pins_again(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """club removed a version's blobs during the scan; its row goes only after the pin:
    the live database no longer names it, so the databases are pinned again."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    clock.advance(minutes=5)
    victim = _deletable(club)[1]
    original_scan, original_live = snapshot_module.scan_tier, snapshot_module.live_names
    asked: list[int] = []

    def racing_scan(root: bytes, tier: str, scan: snapshot_module.Scan) -> None:
        if tier == "blobs":
            shutil.rmtree(victim.parent.parent)
        original_scan(root, tier, scan)

    def late_row_delete(database: str, items: list[Expected]) -> dict[str, Expected]:
        if not asked:
            _delete_rows(club, _version_of(victim))
        asked.append(len(items))
        return original_live(database, items)

    monkeypatch.setattr(snapshot_module, "scan_tier", racing_scan)
    monkeypatch.setattr(snapshot_module, "live_names", late_row_delete)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    record = result.info.record
    assert record["stats"]["pins"] == 2 and asked == [1]
    assert record["verified"]["consistent"] and not {"carried_forward", "dangling", "lost"} & set(record)


def test_a_publish_still_being_written_is_waited_for(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """club's order: the row is committed before the pin, the tarball lands after the
    first second look: a later try of the second look reads it."""
    package = sorted(club.glob("blobs/*/*/artifacts/package.tar.gz"))[0].parent.parent.parent.name
    published = club / "blobs" / package / "9.9.9" / "artifacts" / "package.tar.gz"
    _insert_version(club, package, "9.9.9", b"slow tarball")
    original_live = snapshot_module.live_names

    def tarball_lands_now(database: str, items: list[Expected]) -> dict[str, Expected]:
        published.parent.mkdir(parents=True, exist_ok=True)
        published.write_bytes(b"slow tarball")
        return original_live(database, items)

    monkeypatch.setattr(snapshot_module, "live_names", tarball_lands_now)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    record = result.info.record
    assert record["verified"]["consistent"] and "lost" not in record
    assert record["stats"]["pins"] == 1 and record["stats"]["blobs_looked_again"] == 1


def test_a_version_deleted_between_listing_and_reading_is_not_partial(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual race: blobs/ is listed, then club deletes a version before its files are
    read. The files vanish at open(); the snapshot is complete, not partial, and the pin
    (after the scan) no longer names the version."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    clock.advance(minutes=5)
    victim = _deletable(club)[3]
    for path in victim.parent.parent.rglob("*"):
        if path.is_file():
            os.utime(path)  # changed since the parent: the snapshot must open it again
    original = snapshot_module._SnapshotBuilder.read_files

    def delete_then_read(self: snapshot_module._SnapshotBuilder, scan: snapshot_module.Scan) -> object:
        shutil.rmtree(victim.parent.parent)  # after the listing, before the reads
        _delete_rows(club, _version_of(victim))
        return original(self, scan)

    monkeypatch.setattr(snapshot_module._SnapshotBuilder, "read_files", delete_then_read)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    assert not result.partial, result.errors
    record = result.info.record
    assert record["stats"]["files_vanished"] >= 1
    assert record["verified"]["consistent"] and not {"carried_forward", "dangling", "lost"} & set(record)
    target = tmp_path / "restored"
    apply_restore(repo, plan_restore(repo, result.info, target))
    assert check_club(target).ok


def test_a_version_directory_deleted_while_blobs_are_listed_is_not_partial(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Observation 6: club removes a version's directory after its parent was listed and
    before the directory itself is: a normal delete, not a PARTIAL snapshot that makes
    ``status`` page someone."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    clock.advance(minutes=5)
    victim = _deletable(club)[2]
    version_dir = victim.parent.parent
    wanted = os.fsencode(version_dir.relative_to(club))
    original = files_module._walk

    def deleting_walk(directory: bytes, rel: bytes, tier: str, scan: files_module.Scan) -> None:
        if rel == wanted:
            shutil.rmtree(version_dir)
            _delete_rows(club, _version_of(victim))
        original(directory, rel, tier, scan)

    monkeypatch.setattr(files_module, "_walk", deleting_walk)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    assert not result.partial, result.errors
    record = result.info.record
    assert record["stats"]["files_vanished"] == 1 and record["verified"]["consistent"]
    status = repository_status(repo, clock())
    assert status.healthy, status.problems


def test_snapshot_verify_flags_a_database_naming_a_missing_tarball(club: Path, cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    good = cli("snapshot", str(club), "--verify", "--json", repo=repo)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["verified"]["consistent"] is True

    fresh_repo = tmp_path / "fresh"
    assert cli("init", repo=fresh_repo).returncode == 0
    lost = sorted(club.glob("blobs/*/*/artifacts/package.tar.gz"))[0]
    lost.unlink()
    bad = cli("snapshot", str(club), "--verify", "--json", repo=fresh_repo)
    assert bad.returncode == 18, bad.stderr
    output = json.loads(bad.stdout)
    key = str(lost.relative_to(club / "blobs"))
    assert output["verified"]["consistent"] is False and output["dangling"] == [key]
    assert "missing or wrong in it" in bad.stderr
    # The snapshot was still saved: it is the best copy there is, and it says so.
    assert len(json.loads(cli("snapshots", "--json", repo=fresh_repo).stdout)) == 1
    check = cli("verify", "latest", "--json", repo=fresh_repo)
    assert check.returncode == 18 and any(key in m for m in json.loads(check.stdout)["missing"])


def test_a_lost_tarball_is_carried_forward_and_reported_every_time(club: Path, cli: Cli, tmp_path: Path) -> None:
    """Observation 4: a tarball removed from blobs/ while club.db still names it. Every
    later snapshot restores whole (the parent's copy carried forward) but says it is lost,
    without --verify too, and ``status`` fails on it."""
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    first = cli("snapshot", str(club), "--json", repo=repo)
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout)["id"]
    assert cli("status", repo=repo).returncode == 0
    lost = _deletable(club)[0]
    lost.unlink()
    path = str(lost.relative_to(club))
    ids = [first_id]
    for _ in range(2):
        taken = cli("snapshot", str(club), "--json", repo=repo)
        assert taken.returncode == 0, taken.stderr
        output = json.loads(taken.stdout)
        assert output["lost"] == [path] and output["lost_count"] == 1 and output["carried_forward"] == [path]
        assert (f"warning: {path}: lost: club.db names it but the data dir lacks it; carried forward from "
                f"snapshot {ids[-1][:8]}") in taken.stderr.splitlines()
        assert "note:" not in taken.stderr  # not "deleted during the scan": it was not
        ids.append(output["id"])
        status = cli("status", repo=repo)
        assert status.returncode == 22
        assert (f"the newest snapshot ({output['id'][:8]}) found 1 blob(s) club.db names missing from the "
                f"data dir: {path}") in status.stdout + status.stderr
    target = tmp_path / "restored"
    assert cli("restore", "latest", "--target", str(target), repo=repo).returncode == 0
    assert check_club(target).ok


def test_a_missing_tarball_is_loud_without_verify(club: Path, cli: Cli, tmp_path: Path) -> None:
    """Observation 5: a first snapshot of a data dir lacking a tarball club.db names says
    so on stderr, in --json and in its record, and ``status`` fails, with no --verify."""
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    lost = _deletable(club)[1]
    lost.unlink()
    path = str(lost.relative_to(club))
    taken = cli("snapshot", str(club), "--json", repo=repo)
    assert taken.returncode == 0, taken.stderr
    output = json.loads(taken.stdout)
    assert output["lost"] == [path] and output["dangling"] == [str(lost.relative_to(club / "blobs"))]
    assert (f"warning: {path}: lost: club.db names it but the data dir lacks it; no earlier copy"
            in taken.stderr.splitlines())
    assert cli("status", repo=repo).returncode == 22


def _zero_header(database: Path) -> None:
    with open(database, "r+b") as handle:
        handle.write(bytes(100))


def _corrupt_a_page(database: Path) -> None:
    """Garbage over one b-tree page of a table in the middle of the file: the header and
    schema still read, ``quick_check`` does not pass."""
    conn = sqlite3.connect(database)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'audit_log'").fetchone()[0]
    finally:
        conn.close()
    with open(database, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * page_size)


@pytest.mark.parametrize("damage", [_zero_header, _corrupt_a_page])
def test_a_database_that_looks_wrong_is_flagged(club: Path, cli: Cli, tmp_path: Path,
                                                damage: Callable[[Path], None]) -> None:
    """Observation 9: a club.db that is not SQLite (zeroed header) or fails quick_check is
    still kept (it is all there is) but flagged: a warning, `suspect_databases` in the
    record, and ``status`` fails."""
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    database = club / "db" / "club.db"
    assert not Path(f"{database}-wal").exists()  # the pages are all in the file
    damage(database)
    taken = cli("snapshot", str(club), "--json", repo=repo)
    assert taken.returncode == 0, taken.stderr
    output = json.loads(taken.stdout)
    assert output["suspect_databases"] == ["db/club.db"]
    assert any(line.startswith("warning: db/club.db: suspect: ") for line in taken.stderr.splitlines())
    status = cli("status", repo=repo)
    assert status.returncode == 22 and "looks damaged: db/club.db" in status.stdout + status.stderr


def test_quick_check_is_skipped_for_a_database_unchanged_since_the_parent(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged database costs no quick_check (its pages were checked by the parent),
    and a suspect verdict carries over with the parent's map."""
    _corrupt_a_page(club / "db" / "club.db")
    time.sleep(0.1)  # older than the racy window: the fingerprint is trusted
    first = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock)).info.record
    assert first["suspect_databases"] == ["db/club.db"]
    assert first["databases"][0]["suspect"].startswith("quick_check at capture failed")
    checks: list[object] = []
    original = snapshot_module._quick_check
    monkeypatch.setattr(snapshot_module, "_quick_check", lambda conn: checks.append(conn) or original(conn))
    clock.advance(minutes=5)
    second = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock)).info.record
    assert checks == [] and second["databases"][0]["bytes_read"] == 0
    assert second["suspect_databases"] == ["db/club.db"]
    assert second["databases"][0]["suspect"] == first["databases"][0]["suspect"]


CHURN_RUNS = 15  # snapshots per write order: 30 in all


@pytest.mark.parametrize("order", ORDERS)
def test_no_snapshot_under_churn_is_inconsistent_or_partial(
        order: str, repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """About 50 publishes and 15 deletes a second, in club's order and in the reverse one:
    every `snapshot --verify` is consistent and complete, and those restored pass
    check_club (orphans allowed: a publish after the pin leaves blobs no row names).
    ``in_step`` holds each scan until the churn has published again, every 10 files, so
    that changes land inside every scan, second look and page read."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    results = []
    with ChurnWriter(club, order, seed=len(order)) as writer:
        for _ in range(CHURN_RUNS):
            seen = writer.published
            while writer.published < seen + 3:  # the churn runs between snapshots as well
                time.sleep(0.001)
            clock.advance(seconds=1)
            results.append(create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True,
                                                                 progress=in_step(writer))))
        assert writer.deleted > 0
    assert writer.busy == 0
    records = [r.info.record for r in results]
    assert [r["verified"]["problems"] for r in records if not r["verified"]["consistent"]] == []
    assert [r.errors for r in results if r.partial] == []
    assert [r["lost"] for r in records if "lost" in r] == []
    for index in (CHURN_RUNS // 2, CHURN_RUNS - 1):
        target = tmp_path / f"restored-{index}"
        apply_restore(repo, plan_restore(repo, results[index].info, target))
        report = check_club(target)
        assert report.ok, (report.missing, report.database)
