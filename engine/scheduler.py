"""``clubsnap run``: snapshots, retention and verification on a schedule, in one process.

For a container or a systemd service. Jobs run one at a time, so two never overlap
against the repository from this process, and a file lock in the local cache refuses a
second ``run`` on this host. A failed job is logged and tried again at its next time;
the scheduler itself keeps going. A stop request (SIGTERM) is honoured between jobs:
the job running finishes first (a snapshot killed outright is safe too, format §7), and
a prune waiting for other processes stops waiting and leaves its garbage to the next.

When each job last ran is kept in ``run-state.json`` beside the lock: prune and verify
are due one interval after their last run, so a service restarted more often than
they run still runs them (counting from each start, restarts postponed them forever),
and a daily snapshot whose time passed while it was down is taken at start.

The repository is opened once, so an encrypted one pays its key derivation once.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time as clock_time, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from .backends.fs import fsync_dir
from .errors import CheckFailed, EngineError, RepositoryLocked
from .forget import StoredPolicy, load_policy, plan_forget, remove_snapshots
from .health import DAMAGE, latest_verification, verify_snapshot
from .metrics import RunMetrics
from .prune import PruneOptions, prune
from .repository import Repository, SnapshotFilter
from .snapshot import SnapshotOptions, create_snapshot
from .timespec import recorded_time

Log = Callable[[dict[str, Any]], None]
STATE_FILE = "run-state.json"
JOBS = ("snapshot", "daily", "prune", "verify")  # "daily": the snapshot tagged daily
DAILY_RETRY_S = 600.0  # a failed daily snapshot is tried again this soon (or at --every)


@dataclass(frozen=True)
class Schedule:
    snapshot_every: float | None = 600.0   # seconds; None: no periodic snapshot
    daily_at: clock_time | None = None     # local time of a snapshot tagged "daily"
    prune_every: float | None = 86400.0    # forget by the retention policy, then prune
    verify_every: float | None = 86400.0   # verify the newest snapshot

    def every(self, job: str) -> float | None:
        return {"snapshot": self.snapshot_every, "prune": self.prune_every, "verify": self.verify_every}[job]

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
    # Whose snapshots verify and forget act on: this host's of this data dir, not those
    # of another registry sharing the repository.
    select: SnapshotFilter | None = None
    metrics_file: Path | None = None  # Prometheus text file, replaced after every job
    now: Callable[[], datetime] = field(default=lambda: datetime.now().astimezone())


@dataclass
class Outcome:
    """One run of a job: for the log, the state file and the metrics."""

    name: str
    started: datetime
    duration_s: float
    result: dict[str, Any] | None = None  # the job's figures, when it succeeded
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RunState:
    """When each job last ran, whether it succeeded and when one last did, in
    ``run-state.json`` beside the run lock (which makes this process its only writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jobs: dict[str, dict[str, Any]] = {}
        self.problem: str | None = None  # why an existing file could not be read

    @classmethod
    def load(cls, path: Path) -> "RunState":
        state = cls(path)
        try:
            document = json.loads(path.read_text())
            state.jobs = {name: dict(document["jobs"][name]) for name in JOBS if name in document["jobs"]}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            state.problem = f"{path} is unreadable ({exc}): prune and verify wait one interval"
        return state

    def last(self, name: str, what: str = "last_run") -> datetime | None:
        return recorded_time(self.jobs.get(name, {}).get(what))

    def last_daily(self) -> datetime | None:
        """When the last daily snapshot succeeded; one that ran but never succeeded is
        owed as much as one missed, so it counts from 1970; None if none ever ran."""
        if "daily" not in self.jobs:
            return None
        return self.last("daily", "last_success") or datetime.fromtimestamp(0, timezone.utc)

    def record(self, outcome: Outcome) -> None:
        entry = self.jobs.setdefault(outcome.name, {})
        entry.update(last_run=outcome.started.astimezone(timezone.utc).isoformat(), ok=outcome.ok,
                     duration_s=round(outcome.duration_s, 3))
        if outcome.ok:
            ended = outcome.started + timedelta(seconds=outcome.duration_s)
            entry["last_success"] = ended.astimezone(timezone.utc).isoformat()

    def save(self) -> None:
        _write_atomically(self.path, (json.dumps({"jobs": self.jobs}, indent=2) + "\n").encode())


def run(jobs: Jobs, schedule: Schedule, stop: threading.Event, log: Log, lock_dir: Path) -> int:
    """Run until ``stop`` is set; returns how many jobs failed."""
    lock = _exclusive(lock_dir / "run.lock")
    try:
        state = RunState.load(lock_dir / STATE_FILE)
        if state.problem:
            log({"event": "warning", "error": state.problem})
        return _loop(jobs, schedule, stop, log, state)
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


def _loop(jobs: Jobs, schedule: Schedule, stop: threading.Event, log: Log, state: RunState) -> int:
    due = first_due(schedule, state, jobs.now(), time.monotonic())
    next_daily = first_daily(schedule.daily_at, state.last_daily(), jobs.now())
    keeper = _Bookkeeper(jobs, state, log)
    failures = 0
    log({"event": "start", "schedule": schedule.describe()})
    while not stop.is_set():
        now = time.monotonic()
        if next_daily is not None and jobs.now() >= next_daily:
            ok = keeper.run("daily", lambda: _snapshot(jobs, ["daily"]))
            failures += not ok
            next_daily = _after_daily(schedule, ok, jobs.now())
            if ok and due["snapshot"] is not None:  # it was a snapshot too: the next periodic one waits
                due["snapshot"] = max(due["snapshot"], time.monotonic() + (schedule.snapshot_every or 0))
            continue
        ready = [name for name, when in due.items() if when is not None and when <= now]
        if ready:
            name = min(ready, key=lambda n: due[n] or 0)
            failures += not keeper.run(name, _action(jobs, name, stop))
            # From when it was due, not when it ran, but never in the past: no catch-up bursts.
            due[name] = max((due[name] or now) + (schedule.every(name) or 0), time.monotonic())
            continue
        waits = [when - now for when in due.values() if when is not None]
        if next_daily is not None:
            waits.append((next_daily - jobs.now()).total_seconds())
        stop.wait(min(max(0.05, min(waits)), 3600.0) if waits else 3600.0)
    log({"event": "stop", "failures": failures})
    return failures


def first_due(schedule: Schedule, state: RunState, now: datetime, start: float) -> dict[str, float | None]:
    """When each job is first due, on the monotonic clock of ``start``: a snapshot at
    once; prune and verify one interval after their last run (at once if that has
    passed), or one interval after ``start`` if they never ran. A last run dated ahead
    of ``now`` (the clock was set back) delays them by one interval at most."""
    due: dict[str, float | None] = {"snapshot": start if schedule.snapshot_every else None}
    for name in ("prune", "verify"):
        every, last = schedule.every(name), state.last(name)
        if not every:
            due[name] = None
        elif last is None:
            due[name] = start + every
        else:
            due[name] = start + min(max((last - now).total_seconds() + every, 0.0), every)
    return due


def first_daily(at: clock_time | None, last: datetime | None, now: datetime) -> datetime | None:
    """When the daily snapshot is first due: now, if its time passed since the last one
    that succeeded (``run`` was down across it, or stopped while it failed), else at its
    next time. Never at once when none was ever taken: a first start is no catch-up."""
    if at is None:
        return None
    today = now.astimezone().date()
    passed = _local(today, at)
    if passed > now:
        passed = _local(today - timedelta(days=1), at)
    return now if last is not None and last < passed else next_daily_at(now, at)


def _after_daily(schedule: Schedule, ok: bool, now: datetime) -> datetime | None:
    """The next daily snapshot: at its next time, or soon if this one failed (a day
    without one leaves a hole in a daily retention policy), but no later than that time."""
    upcoming = next_daily_at(now, schedule.daily_at)
    if ok or upcoming is None:
        return upcoming
    return min(upcoming, now + timedelta(seconds=schedule.snapshot_every or DAILY_RETRY_S))


def _action(jobs: Jobs, name: str, stop: threading.Event) -> Callable[[], dict[str, Any]]:
    actions: dict[str, Callable[[], dict[str, Any]]] = {
        "snapshot": lambda: _snapshot(jobs, []), "prune": lambda: _forget_and_prune(jobs, stop),
        "verify": lambda: _verify(jobs)}
    return actions[name]


def _job(name: str, action: Callable[[], dict[str, Any]], log: Log, now: Callable[[], datetime]) -> Outcome:
    started, clock = now(), time.monotonic()
    try:
        result = action()
    except (EngineError, OSError, sqlite3.Error) as exc:  # the scheduler outlives any one job
        outcome = Outcome(name, started, time.monotonic() - clock, error=exc)
        log({"event": name, "ok": False, "error": str(exc) or type(exc).__name__,
             "exit_code": exc.exit_code if isinstance(exc, EngineError) else 1,
             "duration_s": round(outcome.duration_s, 3)})
        return outcome
    outcome = Outcome(name, started, time.monotonic() - clock, result)
    log({"event": name, "ok": True, "duration_s": round(outcome.duration_s, 3), **result})
    return outcome


class _Bookkeeper:
    """After every job: the state file, and the metrics file when one is wanted. Failing
    to write either is logged; the scheduler goes on (a full disk must not stop backups)."""

    def __init__(self, jobs: Jobs, state: RunState, log: Log) -> None:
        self.jobs, self.state, self.log = jobs, state, log
        self.metrics = _metrics_from(state, jobs.repo.backend.location)
        if jobs.metrics_file is not None:
            _last_verdicts(jobs, self.metrics)

    def run(self, name: str, action: Callable[[], dict[str, Any]]) -> bool:
        outcome = _job(name, action, self.log, self.jobs.now)
        self.state.record(outcome)
        self._write(self.state.path, self.state.save)
        if self.jobs.metrics_file is not None:
            _count(self.metrics, outcome)
            _repository_figures(self.jobs.repo, self.metrics)
            path = self.jobs.metrics_file
            self._write(path, lambda: _write_atomically(path, self.metrics.render().encode()))
        return outcome.ok

    def _write(self, path: Path, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            self.log({"event": "warning", "error": f"{path}: {exc.strerror or exc}"})


def _metrics_from(state: RunState, repository: str) -> RunMetrics:
    """Metrics a restart does not reset: when each job last ran comes from the state."""
    metrics = RunMetrics.for_jobs(repository, JOBS)
    for name, values in metrics.jobs.items():
        last_run, last_success = state.last(name), state.last(name, "last_success")
        duration = state.jobs.get(name, {}).get("duration_s")
        values.last_run = last_run.timestamp() if last_run else None
        values.last_success = last_success.timestamp() if last_success else None
        values.last_duration = float(duration) if isinstance(duration, (int, float)) else None
    return metrics


def _last_verdicts(jobs: Jobs, metrics: RunMetrics) -> None:
    """Whether this registry's newest snapshot is partial and its last verify found it
    consistent, from the repository: a restart must not clear an alert on either until
    the next snapshot or verify."""
    try:
        own = jobs.repo.snapshots(jobs.select)
        record = latest_verification(jobs.repo, jobs.select, frozenset(snap.id.hex() for snap in own))
    except (EngineError, OSError, sqlite3.Error):
        return  # unknown, left out; the first job's failure, if it persists, is logged
    if own:
        metrics.snapshot_partial = bool(own[-1].record.get("partial"))
    if record is not None:
        metrics.verify_consistent = bool(record.get("ok"))


def _count(metrics: RunMetrics, outcome: Outcome) -> None:
    metrics.jobs[outcome.name].ran(outcome.started.timestamp(), outcome.duration_s, outcome.ok)
    result = outcome.result or {}
    if outcome.name in ("snapshot", "daily") and outcome.ok:
        metrics.snapshot_bytes_added, metrics.snapshot_files = result["bytes_added"], result["files"]
        metrics.snapshot_partial = result["partial"]
    if outcome.name == "verify" and (outcome.ok or isinstance(outcome.error, CheckFailed)):
        metrics.verify_consistent = outcome.ok  # another failure (unreachable storage) checked nothing


def _repository_figures(repo: Repository, metrics: RunMetrics) -> None:
    """The snapshot count, from one LIST, and the stored bytes from the local catalog (no
    request: it knows the packs as of this job's index sync and writes)."""
    try:
        metrics.repository_snapshots = len(repo.snapshot_keys())
        metrics.repository_stored_bytes = repo.catalog.counts()["pack_bytes"]
    except (EngineError, OSError, sqlite3.Error):
        pass  # the figures of the job before stand; the job's own failure is logged


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` whole: a temporary file in the same directory, synced, renamed
    over it, so a reader (node_exporter, the next start) never sees half a file, nor a
    crash an empty one. ``mode`` is set exactly, whatever the umask. The temporary name is
    unpredictable and created exclusively: the metrics directory may be shared."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"written, but its directory could not be synced ({exc.strerror or exc})") from exc


def _snapshot(jobs: Jobs, tags: list[str]) -> dict[str, Any]:
    result = create_snapshot(jobs.repo, jobs.snapshot(tags))
    return {"id": result.info.id.hex(), "snapshot_time": result.info.time.isoformat(), "partial": result.partial,
            "bytes_added": result.stats["bytes_added"], "files": result.stats["files"], "tags": tags,
            "errors": result.errors[:10],
            # what was passed over (damaged index objects, snapshot records) or found amiss
            "warnings": (result.warnings + list(jobs.repo.damaged_objects.values()))[:10]}


def _forget_and_prune(jobs: Jobs, stop: threading.Event) -> dict[str, Any]:
    policy = jobs.retention or load_policy(jobs.repo)
    if policy is None:
        return {"skipped": "no retention policy (configuration file [retention], or 'clubsnap policy set')"}
    # Only its own registry's snapshots: another host's are its own run's to thin, by its policy.
    own = jobs.repo.snapshots(jobs.select)
    doomed = [snap for group in plan_forget(own, policy) for snap in group.removed]
    remove_snapshots(jobs.repo, doomed)
    report = prune(jobs.repo, replace(jobs.prune_options, stop=stop))  # SIGTERM ends its wait
    return {"forgotten": len(doomed), "packs_deleted": report.packs_deleted, "freed_bytes": report.freed_bytes,
            "pending_packs": report.pending_packs}


def _verify(jobs: Jobs) -> dict[str, Any]:
    snap = jobs.repo.find_snapshot("latest", jobs.select)
    try:
        report = verify_snapshot(jobs.repo, snap, jobs.temp_dir, jobs.now())
    except DAMAGE as exc:  # recorded as a failed verify: the metrics must say so too
        raise CheckFailed(f"snapshot {snap.id.short()} does not restore: {exc}") from exc
    result = {"snapshot": snap.id.hex(), "consistent": report.ok, "missing": len(report.missing),
              "database": len(report.database)}
    if not report.ok:
        raise CheckFailed(f"snapshot {snap.id.short()} is not consistent: {len(report.missing)} missing or wrong "
                            f"blob(s), {len(report.database)} database problem(s)")
    return result


def next_daily_at(now: datetime, at: clock_time | None) -> datetime | None:
    """The next instant the local wall clock shows ``at``, by the system zone's rules for
    that day (a naive local time's ``astimezone()``), not by today's UTC offset, which is
    an hour off across a DST change."""
    if at is None:
        return None
    today = now.astimezone().date()
    candidate = _local(today, at)
    return candidate if candidate > now else _local(today + timedelta(days=1), at)


def _local(day: date, at: clock_time) -> datetime:
    """``at`` on ``day`` in the system zone. A time the clock skips (02:30 when it jumps
    from 02:00 to 03:00) is taken after the jump, at 03:30, so the daily snapshot still
    happens; a time it shows twice (when it falls back) is the first."""
    naive = datetime.combine(day, at)
    earlier, later = sorted((naive.astimezone(), naive.replace(fold=1).astimezone()))
    return earlier if earlier.replace(tzinfo=None) == naive else later
