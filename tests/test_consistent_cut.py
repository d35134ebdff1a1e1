"""One consistent cut between club.db and blobs/: a version deleted while the blobs are
scanned is carried forward, a publish racing the scan is at worst an orphan, and
`snapshot --verify` flags a snapshot whose database names blobs it lacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from engine import Repository, apply_restore, create_snapshot, plan_restore
from engine import snapshot as snapshot_module
from engine.clubcheck import check_club
from engine.snapshot import SnapshotOptions

from .conftest import Clock

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def club(tmp_path: Path) -> Path:
    generate(tmp_path / "data", "tiny", seed=5)
    time.sleep(0.1)
    return tmp_path / "data"


def test_versions_deleted_during_the_blob_scan_are_carried_forward(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    clock.advance(minutes=5)
    victims = sorted(club.glob("blobs/*/*/artifacts/package.tar.gz"))[:2]
    published = club / "blobs" / "racer" / "1.0.0" / "artifacts" / "package.tar.gz"
    original = snapshot_module.scan_tier

    def racing_scan(root: bytes, tier: str, scan: snapshot_module.Scan) -> None:
        if tier == "blobs":  # the database is captured by now: club acts in the window
            for tarball in victims:  # delete version: blobs first (the row goes after)
                shutil.rmtree(tarball.parent.parent)
            published.parent.mkdir(parents=True)  # a publish's blob, its row committed too late
            published.write_bytes(b"racing tarball")
        original(root, tier, scan)

    monkeypatch.setattr(snapshot_module, "scan_tier", racing_scan)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    record = result.info.record
    expected = sorted(str(v.relative_to(club)) for v in victims)
    assert record["carried_forward"] == expected
    assert record["verified"]["consistent"] and "dangling" not in record

    target = tmp_path / "restored"
    apply_restore(repo, plan_restore(repo, result.info, target))
    report = check_club(target)
    assert report.ok, report.missing
    assert all((target / v.relative_to(club)).read_bytes() for v in victims)
    assert "racer/1.0.0/artifacts/package.tar.gz" in report.orphans


def test_a_version_deleted_between_listing_and_reading_is_carried_not_partial(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual race: blobs/ is listed, then club deletes a version before its files are
    read. The files vanish at open(); the snapshot is complete, not partial."""
    create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock))
    clock.advance(minutes=5)
    victim = sorted(club.glob("blobs/*/*/artifacts/package.tar.gz"))[3].parent.parent
    for path in victim.rglob("*"):
        if path.is_file():
            os.utime(path)  # changed since the parent: the snapshot must open it again
    original = snapshot_module._SnapshotBuilder.read_files

    def delete_then_read(self: snapshot_module._SnapshotBuilder, scan: snapshot_module.Scan) -> object:
        shutil.rmtree(victim)  # after the listing, before the reads
        return original(self, scan)

    monkeypatch.setattr(snapshot_module._SnapshotBuilder, "read_files", delete_then_read)
    result = create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, verify=True))
    assert not result.partial, result.errors
    record = result.info.record
    assert f"{victim.relative_to(club)}/artifacts/package.tar.gz" in record["carried_forward"]
    assert record["verified"]["consistent"]
    target = tmp_path / "restored"
    apply_restore(repo, plan_restore(repo, result.info, target))
    assert check_club(target).ok


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
