"""``clubsnap run``: snapshots, retention and verification on a schedule, in one process.

For a container or a systemd service. Jobs run one at a time, so two never overlap
against the repository from this process, and a file lock in the local cache refuses a
second ``run`` on this host. A failed job is logged and tried again at its next time;
the scheduler itself keeps going. A stop request (SIGTERM) is honoured between jobs:
the job running finishes first (a snapshot killed outright is safe too, format §7).

The repository is opened once, so an encrypted one pays its key derivation once.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, time as clock_time, timedelta
from pathlib import Path
from typing import Any, Callable

from .errors import CheckFailed, EngineError, RepositoryLocked
from .forget import StoredPolicy, load_policy, plan_forget, remove_snapshots
from .health import verify_snapshot
from .prune import PruneOptions, prune
from .repository import Repository
from .snapshot import SnapshotOptions, create_snapshot

Log = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Schedule:
    snapshot_every: float | None = 600.0   # seconds; None: no periodic snapshot
    daily_at: clock_time | None = None     # local time of a snapshot tagged "daily"
    prune_every: float | None = 86400.0    # forget by the retention policy, then prune
    verify_every: float | None = 86400.0   # verify the newest snapshot

    def describe(self) -> str:
        parts = [f"snapshot every {self.snapshot_every:g}s" if self.snapshot_every else "",
                 f"daily snapshot at {self.daily_at:%H:%M}" if self.daily_at else "",
                 f"forget and prune every {self.prune_every:g}s" if self.prune_every else "",
                 f"verify every {self.verify_every:g}s" if self.verify_every else ""]
        return ", ".join(p for p in parts if p) or "nothing"


@dataclass
class Jobs:
    """What the scheduler runs, bound to one repository and data dir."""

    repo: Repository
    snapshot: Callable[[list[str]], SnapshotOptions]  # tags -> options (a fresh clock reading each time)
    retention: StoredPolicy | None
    prune_options: PruneOptions
    temp_dir: str | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now().astimezone())


def run(jobs: Jobs, schedule: Schedule, stop: threading.Event, log: Log, lock_dir: Path) -> int:
    """Run until ``stop`` is set; returns how many jobs failed."""
    lock = _exclusive(lock_dir / "run.lock")
    try:
        return _loop(jobs, schedule, stop, log)
    finally:
        os.close(lock)


def _exclusive(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise RepositoryLocked(f"another 'clubsnap run' uses this repository on this host ({path})") from exc
    return fd


def _loop(jobs: Jobs, schedule: Schedule, stop: threading.Event, log: Log) -> int:
    start = time.monotonic()
    due = {"snapshot": start if schedule.snapshot_every else None,
           "prune": start + (schedule.prune_every or 0) if schedule.prune_every else None,
           "verify": start + (schedule.verify_every or 0) if schedule.verify_every else None}
    next_daily = _next_daily(jobs.now(), schedule.daily_at)
    failures = 0
    log({"event": "start", "schedule": schedule.describe()})
    while not stop.is_set():
        now = time.monotonic()
        if next_daily is not None and jobs.now() >= next_daily:
            failures += not _job("snapshot", lambda: _snapshot(jobs, ["daily"]), log)
            next_daily = _next_daily(jobs.now(), schedule.daily_at)
            continue
        ready = [name for name, when in due.items() if when is not None and when <= now]
        if ready:
            name = min(ready, key=lambda n: due[n] or 0)
            action = {"snapshot": lambda: _snapshot(jobs, []), "prune": lambda: _forget_and_prune(jobs),
                      "verify": lambda: _verify(jobs)}[name]
            failures += not _job(name, action, log)
            every = {"snapshot": schedule.snapshot_every, "prune": schedule.prune_every,
                     "verify": schedule.verify_every}[name] or 0
            due[name] = max((due[name] or now) + every, time.monotonic())  # no catch-up bursts
            continue
        waits = [when - now for when in due.values() if when is not None]
        if next_daily is not None:
            waits.append((next_daily - jobs.now()).total_seconds())
        stop.wait(min(max(0.05, min(waits)), 3600.0) if waits else 3600.0)
    log({"event": "stop", "failures": failures})
    return failures


def _job(name: str, action: Callable[[], dict[str, Any]], log: Log) -> bool:
    started = time.monotonic()
    try:
        result = action()
    except (EngineError, OSError, sqlite3.Error) as exc:  # the scheduler outlives any one job
        log({"event": name, "ok": False, "error": str(exc) or type(exc).__name__,
             "exit_code": exc.exit_code if isinstance(exc, EngineError) else 1,
             "duration_s": round(time.monotonic() - started, 3)})
        return False
    log({"event": name, "ok": True, "duration_s": round(time.monotonic() - started, 3), **result})
    return True


def _snapshot(jobs: Jobs, tags: list[str]) -> dict[str, Any]:
    result = create_snapshot(jobs.repo, jobs.snapshot(tags))
    return {"id": result.info.id.hex(), "snapshot_time": result.info.time.isoformat(), "partial": result.partial,
            "bytes_added": result.stats["bytes_added"], "files": result.stats["files"], "tags": tags,
            "errors": result.errors[:10]}


def _forget_and_prune(jobs: Jobs) -> dict[str, Any]:
    policy = jobs.retention or load_policy(jobs.repo)
    if policy is None:
        return {"skipped": "no retention policy (configuration file [retention], or 'clubsnap policy set')"}
    doomed = [snap for group in plan_forget(jobs.repo.snapshots(), policy) for snap in group.removed]
    remove_snapshots(jobs.repo, doomed)
    report = prune(jobs.repo, jobs.prune_options)
    return {"forgotten": len(doomed), "packs_deleted": report.packs_deleted, "freed_bytes": report.freed_bytes,
            "pending_packs": report.pending_packs}


def _verify(jobs: Jobs) -> dict[str, Any]:
    snap = jobs.repo.find_snapshot("latest")
    report = verify_snapshot(jobs.repo, snap, jobs.temp_dir, jobs.now())
    result = {"snapshot": snap.id.hex(), "consistent": report.ok, "missing": len(report.missing),
              "database": len(report.database)}
    if not report.ok:
        raise CheckFailed(f"snapshot {snap.id.short()} is not consistent: {len(report.missing)} missing or wrong "
                            f"blob(s), {len(report.database)} database problem(s)")
    return result


def _next_daily(now: datetime, at: clock_time | None) -> datetime | None:
    if at is None:
        return None
    candidate = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)
