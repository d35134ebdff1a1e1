"""`clubsnap status`: the newest snapshot's age and the last verify's result, and an exit
code a cron job, a healthcheck or a monitoring probe can act on (22 when unhealthy)."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from engine import Repository
from engine.clubcheck import ClubReport
from engine.errors import BackendError, Unhealthy
from engine.format import VERIFICATION_PREFIX
from engine.health import KEEP_VERIFICATIONS, record_verification, repository_status
from engine.repository import SnapshotFilter

from .conftest import Clock

Cli = Callable[..., subprocess.CompletedProcess[str]]


def test_status_follows_snapshots_and_verifies(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=3)
    assert cli("init", repo=repo).returncode == 0
    empty = cli("status", "--max-age", "1h", repo=repo)
    assert empty.returncode == Unhealthy.exit_code and empty.stderr == "clubsnap: there is no snapshot\n"
    assert cli("status", repo=repo).returncode == 0  # no bound given: an empty repository is not a failure

    assert cli("snapshot", str(data), repo=repo).returncode == 0
    fresh = cli("status", "--max-age", "1h", "--json", repo=repo)
    assert fresh.returncode == 0, fresh.stderr
    report = json.loads(fresh.stdout)
    assert report["healthy"] and report["snapshots"] == 1 and report["last_verify"] is None
    assert report["newest"]["size"] > 1_000_000 and report["newest"]["age_s"] < 60

    assert cli("verify", "latest", repo=repo).returncode == 0
    verified = json.loads(cli("status", "--json", repo=repo).stdout)["last_verify"]
    assert verified["ok"] and verified["snapshot"] == report["newest"]["id"] and verified["missing"] == 0

    time.sleep(2.1)
    stale = cli("status", "--max-age", "2s", repo=repo)
    assert stale.returncode == Unhealthy.exit_code
    assert "the newest snapshot is" in stale.stderr and stale.stderr.count("\n") == 1
    bad = cli("status", "--max-age", "soon", repo=repo)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_failed_verify_makes_status_fail(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=4)
    next((data / "blobs").rglob("package.tar.gz")).unlink()  # club.db names it: inconsistent
    assert cli("init", repo=repo).returncode == 0
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    assert cli("verify", "latest", repo=repo).returncode == 18
    status = cli("status", "--json", repo=repo)  # no --max-age: a failed verify alone is unhealthy
    assert status.returncode == Unhealthy.exit_code
    report = json.loads(status.stdout)
    assert not report["last_verify"]["ok"] and report["last_verify"]["missing"] == 1
    assert any("last verify" in p for p in report["problems"])


def test_verification_records_are_capped_and_optional(repo: Repository, clock: Clock) -> None:
    from engine.repository import SnapshotInfo
    from engine.format import SnapshotId
    snap = SnapshotInfo(SnapshotId(b"\7" * 32), "snapshots/x", clock(), {"tree": b"\0" * 32})
    for number in range(KEEP_VERIFICATIONS + 4):
        clock.advance(minutes=1)
        report = ClubReport(missing=["a/1.0.0/artifacts/package.tar.gz"] if number % 2 else [])
        assert record_verification(repo, snap, report, clock())
    assert len(list(repo.backend.list(VERIFICATION_PREFIX))) == KEEP_VERIFICATIONS
    status = repository_status(repo, clock(), timedelta(hours=1))
    assert status.verification is not None and status.verification["ok"] is False  # the newest: number 33, odd
    assert "there is no snapshot" in status.problems[0] and "last verify" in status.problems[1]

    def refuse(*args: object, **kwargs: object) -> None:
        raise BackendError("AccessDenied: read-only credentials")

    repo.backend.put = refuse  # type: ignore[method-assign]
    assert record_verification(repo, snap, ClubReport(), clock()) is None  # the verify stands without it


def test_a_busy_registry_does_not_evict_another_registrys_verifications(repo: Repository, clock: Clock) -> None:
    """Two registries share a repository; the one verified every few minutes must not
    push the other's last verify out, or ``status --host`` would report none."""
    from engine.repository import SnapshotInfo
    from engine.format import SnapshotId

    def snapshot_of(host: str, marker: bytes) -> SnapshotInfo:
        return SnapshotInfo(SnapshotId(marker * 32), "snapshots/x", clock(),
                            {"tree": b"\0" * 32, "host": host, "source": "/var/lib/club"})

    quiet, busy = snapshot_of("quiet", b"\1"), snapshot_of("busy", b"\2")
    assert record_verification(repo, quiet, ClubReport(), clock())
    for _ in range(KEEP_VERIFICATIONS + 5):
        clock.advance(minutes=1)
        assert record_verification(repo, busy, ClubReport(), clock())
    assert len(list(repo.backend.list(VERIFICATION_PREFIX))) == KEEP_VERIFICATIONS + 1
    found = repository_status(repo, clock(), select=SnapshotFilter(host="quiet")).verification
    assert found is not None and found["snapshot"] == quiet.id.hex()


def test_a_verify_that_cannot_restore_is_recorded_as_failed(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=6)
    assert cli("init", repo=repo).returncode == 0
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    for pack in (repo / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()  # the data is gone: the snapshot cannot be restored
    assert cli("verify", "latest", repo=repo).returncode != 0
    status = cli("status", "--max-age", "1h", "--json", repo=repo)
    assert status.returncode == Unhealthy.exit_code
    assert "restore failed" in json.loads(status.stdout)["last_verify"]["problems"][0]


def test_a_snapshot_dated_in_the_future_is_suspect(repo: Repository, tmp_path: Path) -> None:
    from datetime import datetime, timezone
    from engine import SnapshotOptions, create_snapshot
    generate(tmp_path / "data", "tiny", seed=7)
    ahead = datetime.now(timezone.utc) + timedelta(days=400)  # a host with a wrong clock
    create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host="h", now=lambda: ahead))
    status = repository_status(repo, datetime.now(timezone.utc), timedelta(hours=1))
    assert not status.healthy and "in the future" in status.problems[0]


def test_status_judges_one_registry_of_a_shared_repository(cli: Cli, tmp_path: Path) -> None:
    ours, theirs, repo = tmp_path / "ours", tmp_path / "theirs", tmp_path / "repo"
    generate(ours, "tiny", seed=8)
    generate(theirs, "tiny", seed=9)
    assert cli("init", repo=repo).returncode == 0
    ours_id = json.loads(cli("snapshot", str(ours), "--host", "reg-a", "--json", repo=repo).stdout)["id"]
    assert cli("verify", "latest", "--host", "reg-a", repo=repo).returncode == 0
    theirs_id = json.loads(cli("snapshot", str(theirs), "--host", "reg-b", "--json", repo=repo).stdout)["id"]

    mine = cli("status", "--host", "reg-a", "--max-age", "1h", "--max-verify-age", "1h", "--json", repo=repo)
    assert mine.returncode == 0, mine.stderr
    report = json.loads(mine.stdout)
    assert report["snapshots"] == 1 and report["newest"]["id"] == ours_id
    assert report["last_verify"]["snapshot"] == ours_id and report["filter"] == {"host": "reg-a", "source": None}
    # The other registry's newest snapshot was never verified; a relative --path means the same dir.
    other = cli("status", "--path", "theirs", "--max-verify-age", "1h", "--json", repo=repo, cwd=tmp_path)
    assert other.returncode == Unhealthy.exit_code
    assert json.loads(other.stdout)["newest"]["id"] == theirs_id
    assert f"no verify of a snapshot of {theirs} is recorded" in other.stderr
    # Retention forgets the verified snapshot: its verify still counts for its registry.
    assert cli("forget", ours_id, repo=repo).returncode == 0
    forgotten = json.loads(cli("status", "--host", "reg-a", "--max-verify-age", "1h", "--json", repo=repo).stdout)
    assert forgotten["snapshots"] == 0 and forgotten["last_verify"]["snapshot"] == ours_id and forgotten["healthy"]
    assert cli("status", "--host", "reg-a", "--max-age", "1h", repo=repo).returncode == Unhealthy.exit_code


def test_max_verify_age_bounds_the_last_verify(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    from engine import SnapshotOptions, create_snapshot
    generate(tmp_path / "data", "tiny", seed=10)
    snap = create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host="h", now=clock)).info
    never = repository_status(repo, clock(), max_verify_age=timedelta(hours=1))
    assert never.problems == ["no verify of a snapshot is recorded"]
    record_verification(repo, snap, ClubReport(), clock())
    clock.advance(hours=2)
    assert repository_status(repo, clock(), max_verify_age=timedelta(hours=3)).healthy
    stale = repository_status(repo, clock(), max_verify_age=timedelta(hours=1))
    assert stale.verify_age == timedelta(hours=2) and stale.problems == ["the last verify ran 2h00m ago (bound 60m)"]
    assert repository_status(repo, clock()).healthy  # no bound given: an old verify is no failure


def test_a_verification_record_without_the_snapshot_fields_matches_by_id(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    """Records written before they named the snapshot's host and source are matched by
    their snapshot id against the snapshots listed."""
    from engine import SnapshotOptions, create_snapshot
    from engine.format import SNAPSHOT_STAMP, Kind, digest, seal_object
    generate(tmp_path / "data", "tiny", seed=11)
    snap = create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host="h", now=clock)).info
    record = {"time": clock().isoformat(), "host": "verifier", "snapshot": snap.id.hex(),
              "snapshot_time": snap.time.isoformat(), "ok": True, "checked": {}, "missing": 0, "database": 0,
              "problems": []}
    data = seal_object(Kind.VERIFICATION, record, repo.cipher)
    repo.backend.put(f"{VERIFICATION_PREFIX}{clock().strftime(SNAPSHOT_STAMP)}_{digest(data).hex()}", data)
    found = repository_status(repo, clock(), select=SnapshotFilter(host="h")).verification
    assert found is not None and found["snapshot"] == snap.id.hex()
    assert repository_status(repo, clock(), select=SnapshotFilter(host="verifier")).verification is None


def test_a_repository_gone_midway_is_no_verify_result(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    """Its disk unmounted during a verify, every object of a repository is "missing": that
    says nothing of the backup, so no failed verify is recorded (nor could it be)."""
    import shutil
    from engine import SnapshotOptions, create_snapshot
    from engine.health import verify_snapshot
    generate(tmp_path / "data", "tiny", seed=23)
    snap = create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host="h", now=clock)).info
    root = Path(repo.backend.location)
    get = repo.backend.get

    def unmounting(key: str, *window: int) -> bytes:
        if key.startswith("data/") and root.exists():
            shutil.move(root, tmp_path / "elsewhere")  # the disk goes away mid-restore
        return get(key, *window)

    repo.backend.get = unmounting  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="not there any more"):
        verify_snapshot(repo, snap, str(tmp_path), clock())
    shutil.move(tmp_path / "elsewhere", root)
    assert not list(repo.backend.list(VERIFICATION_PREFIX))


def test_a_verification_record_that_is_no_record_is_passed_over(repo: Repository, clock: Clock) -> None:
    """A well-sealed object whose payload is not a map (a buggy writer) must not stop
    status, nor ``run`` reading the last verdict at start: the record before it counts."""
    from engine.format import SNAPSHOT_STAMP, Kind, digest, seal_object
    from engine.repository import SnapshotInfo
    from engine.format import SnapshotId
    snap = SnapshotInfo(SnapshotId(b"\3" * 32), "snapshots/x", clock(), {"tree": b"\0" * 32, "host": "h", "source": "/d"})
    assert record_verification(repo, snap, ClubReport(), clock())
    for odd in ([1, 2, 3], {"time": clock().isoformat(), "snapshot_source": "/d", "snapshot_tags": 5}):
        clock.advance(minutes=1)
        data = seal_object(Kind.VERIFICATION, odd, repo.cipher)
        repo.backend.put(f"{VERIFICATION_PREFIX}{clock().strftime(SNAPSHOT_STAMP)}_{digest(data).hex()}", data)
    found = repository_status(repo, clock(), select=SnapshotFilter(tags=("daily",))).verification
    assert found is None
    found = repository_status(repo, clock(), select=SnapshotFilter(host="h", source="/d")).verification
    assert found is not None and found["snapshot"] == snap.id.hex()
