"""`clubsnap run` for a minute with a seconds-scale schedule, against a data dir club
keeps writing: snapshots land, retention thins them, verify runs, a second run is
refused, SIGTERM stops it cleanly, and `status --max-age` notices when it has stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, time as clock_time, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator

import pytest

from benchmarks.clubgen import LiveWriter, generate
from engine import PruneOptions, Repository, create_snapshot, prune
from engine.errors import CheckFailed, RepositoryLocked, Unhealthy
from engine.forget import remove_snapshots
from engine.format import GARBAGE_PREFIX
from engine.scheduler import Outcome, RunState, Schedule, first_due, next_daily_at
from engine.snapshot import SnapshotOptions

from .conftest import ROOT, Clock

Cli = Callable[..., subprocess.CompletedProcess[str]]
Events = list[dict[str, Any]]
HANG_GUARD_S = 180  # turns a hang into a failure; no test waits on it when the code works
RUN_GUARD_S = 900  # the same for the minute-long schedule test, on a loaded 2-core machine


def test_run_schedules_snapshots_retention_and_verify(cli: Cli, tmp_path: Path) -> None:
    """Waits on the run's own log, never on the clock: a loaded machine only makes it slower."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=12)
    assert cli("init", repo=repo).returncode == 0
    env = _run_env(repo, tmp_path)
    command = _run_command(data, tmp_path, "--every", "2s", "--prune-every", "7s", "--verify-every", "9s",
                           "--keep-last", "3", "--wait", "2s")

    def enough(events: Events) -> bool:
        ok = [e for e in events if e.get("ok")]
        prunes = [e for e in ok if e["event"] == "prune"]
        return (sum(e["event"] == "snapshot" for e in ok) >= 15 and len(prunes) >= 5
                and sum(int(str(e["forgotten"])) for e in prunes) >= 10
                and sum(e["event"] == "verify" for e in ok) >= 4) or any(not e.get("ok", True) for e in events)

    with LiveWriter(data, interval=0.003, publish_every=25) as writer, _Running(command, env) as runner:
        runner.wait_for(lambda events: any(e["event"] == "start" for e in events))  # it holds the run lock
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert second.returncode == RepositoryLocked.exit_code, second.stderr
        assert "another 'clubsnap run'" in second.stderr
        runner.wait_for(enough, timeout=RUN_GUARD_S)
        code, err = runner.stop()
    assert code == 0, err
    assert writer.commits > 0 and writer.publishes > 0
    events = runner.events
    assert events[0]["event"] == "start" and events[-1] == {**events[-1], "event": "stop", "failures": 0}
    by_kind: dict[str, list[dict[str, object]]] = {}
    for event in events[1:-1]:
        assert event["ok"], event
        by_kind.setdefault(str(event["event"]), []).append(event)
    assert len(by_kind["snapshot"]) >= 15
    assert len(by_kind["prune"]) >= 5 and sum(int(str(e["forgotten"])) for e in by_kind["prune"]) >= 10
    assert len(by_kind["verify"]) >= 4 and all(e["consistent"] for e in by_kind["verify"])

    kept = json.loads(cli("snapshots", "--json", repo=repo).stdout)
    last_prune = max(i for i, e in enumerate(events) if e["event"] == "prune")
    since = sum(e["event"] == "snapshot" for e in events[last_prune:])
    assert len(kept) == 3 + since  # three after the last prune (jobs run one at a time), plus those since
    assert {s["id"] for s in kept} <= {str(e["id"]) for e in by_kind["snapshot"]}
    checked = json.loads(cli("check", "--read-data", "--json", repo=repo).stdout)
    assert checked["ok"] and not checked["warnings"]
    healthy = json.loads(cli("status", "--max-age", "1h", "--json", repo=repo).stdout)
    assert healthy["healthy"] and healthy["last_verify"]["ok"]
    # The schedule is stopped: the newest snapshot ages past a bound of 2 s. Waiting on the
    # snapshot's age, which only grows, is not synchronisation.
    newest = max(datetime.fromisoformat(s["time"]) for s in kept)
    _until(lambda: datetime.now(timezone.utc) - newest > timedelta(seconds=3))
    stale = cli("status", "--max-age", "2s", repo=repo)
    assert stale.returncode == Unhealthy.exit_code and "the newest snapshot is" in stale.stderr


def test_a_job_failing_in_any_way_does_not_stop_the_scheduler() -> None:
    import sqlite3
    from engine import scheduler
    from engine.errors import BackendError
    logged: list[dict[str, object]] = []
    for failure in (BackendError("bucket unreachable"), OSError(2, "No such file or directory"),
                    sqlite3.OperationalError("database is locked")):
        def action(failure: Exception = failure) -> dict[str, object]:
            raise failure
        assert scheduler._job("verify", action, logged.append, datetime.now().astimezone).ok is False
    assert [e["ok"] for e in logged] == [False, False, False]
    assert [e["exit_code"] for e in logged] == [13, 1, 1] and "database is locked" in str(logged[2]["error"])


# ---- helpers: a `clubsnap run` read as it goes, another process holding a read lock -----------

def _run_env(repo: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(tmp_path / "cli-cache"),
            "PYTHONPATH": str(ROOT)}


def _run_command(data: Path, tmp_path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "engine", "run", str(data), "--log-json", "--temp-dir", str(tmp_path), *options]


class _Running:
    """A `clubsnap run --log-json` whose events are read as they come; killed on exit if
    a test failed before stopping it."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, stdin=subprocess.DEVNULL)
        self.events: Events = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.events.append(json.loads(line))
                self.changed.notify_all()

    def wait_for(self, done: Callable[[Events], bool], timeout: float = HANG_GUARD_S) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: done(self.events), timeout=timeout), self.events

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then its exit code and stderr."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=HANG_GUARD_S)
        self.reader.join()
        assert self.process.stderr is not None
        return self.process.returncode, self.process.stderr.read()

    def __enter__(self) -> "_Running":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _done(events: Events) -> set[str]:
    return {str(e["event"]) for e in events if e.get("ok")}


HOLD_READ_LOCK = """
import os, sys
from pathlib import Path
from engine import Repository, open_backend
repo = Repository.open(open_backend(sys.argv[1]), Path(sys.argv[2]), lambda: os.environ["CLUBSNAP_PASSWORD"].encode())
with repo.lock("read"):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def _read_lock_held(repo: Path, cache: Path) -> Iterator[None]:
    """Another live process holds a read lock (as a long restore would) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_READ_LOCK, str(repo), str(cache)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=HANG_GUARD_S)


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.1)


# ---- run state: prune and verify are due from their last run --------------------------------

def test_prune_and_verify_are_due_one_interval_after_their_last_run(tmp_path: Path) -> None:
    now = datetime(2026, 4, 9, 12, 0, tzinfo=timezone.utc)
    schedule = Schedule(snapshot_every=600.0, prune_every=3600.0, verify_every=86400.0)
    state = RunState(tmp_path / "run-state.json")
    # Never ran: one interval after this start; the snapshot at once.
    assert first_due(schedule, state, now, 1000.0) == {"snapshot": 1000.0, "prune": 4600.0, "verify": 87400.0}
    state.record(Outcome("prune", now - timedelta(minutes=20), 5.0, {}))  # 40 minutes left
    state.record(Outcome("verify", now - timedelta(days=3), 60.0, error=CheckFailed("inconsistent")))
    state.save()
    loaded = RunState.load(state.path)
    assert loaded.problem is None and loaded.jobs["verify"]["ok"] is False
    assert "last_success" not in loaded.jobs["verify"] and loaded.jobs["prune"]["ok"] is True
    # Restarted: prune keeps its time, verify (overdue; a failed run counts as a run) runs at once.
    assert first_due(schedule, loaded, now, 1000.0) == {"snapshot": 1000.0, "prune": 3400.0, "verify": 1000.0}
    assert first_due(replace(schedule, prune_every=None), loaded, now, 0.0)["prune"] is None
    # A last run dated ahead (the clock was set back) waits one interval, not longer.
    assert first_due(schedule, loaded, now - timedelta(days=30), 0.0)["prune"] == 3600.0
    state.path.write_text("{not json")
    broken = RunState.load(state.path)
    assert broken.problem and first_due(schedule, broken, now, 0.0)["verify"] == 86400.0


# ---- --daily-at across DST changes --------------------------------------------------------------

@pytest.fixture
def berlin() -> Iterator[None]:
    """The system zone is Europe/Berlin for the test (``astimezone()`` follows TZ)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.parametrize("now, at, expected", [
    ("2026-03-28T12:00+01:00", "03:30", "2026-03-29T03:30+02:00"),     # clocks spring forward that night
    ("2026-03-28T12:00+01:00", "02:30", "2026-03-29T03:30+02:00"),     # 02:30 does not exist: an hour later
    ("2026-03-29T03:30:05+02:00", "02:30", "2026-03-30T02:30+02:00"),  # after it: summer time
    ("2026-03-29T12:00+02:00", "01:15", "2026-03-30T01:15+02:00"),
    ("2026-10-24T12:00+02:00", "03:30", "2026-10-25T03:30+01:00"),     # clocks fall back that night
    ("2026-10-24T12:00+02:00", "02:30", "2026-10-25T02:30+02:00"),     # 02:30 happens twice: the first
    ("2026-10-25T02:30:05+02:00", "02:30", "2026-10-26T02:30+01:00"),  # and only once
    ("2026-10-25T01:00:00+00:00", "23:00", "2026-10-25T23:00+01:00"),  # a 25-hour day
])
def test_daily_at_follows_the_wall_clock_across_dst(berlin: None, now: str, at: str, expected: str) -> None:
    upcoming = next_daily_at(datetime.fromisoformat(now), clock_time.fromisoformat(at))
    assert upcoming == datetime.fromisoformat(expected), upcoming


# ---- metrics, state and restarts of a real `clubsnap run` ---------------------------------------

SAMPLE = re.compile(r'^(clubsnap_[a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)+)\} (-?[0-9.e+]+)$')
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def _parse_metrics(text: str, repository: str) -> dict[str, float]:
    """Samples by name and ``job`` label; every line is a HELP, a TYPE before its
    samples, or a sample labelled with ``repository`` (and a job of ``run``'s)."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4 and line.split(" ")[2].startswith("clubsnap_"), line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter") and name.endswith("_total") == (kind == "counter"), line
            typed.add(name)
        else:
            match = SAMPLE.match(line)
            assert match and match.group(1) in typed, line
            labels = dict(LABEL.findall(match.group(2)))
            assert labels.pop("repository") == repository and set(labels) <= {"job"}, line
            assert labels.get("job") in (None, "snapshot", "daily", "prune", "verify"), line
            job = f'{{job="{labels["job"]}"}}' if labels else ""
            samples[match.group(1) + job] = float(match.group(3))
    return samples


def test_run_writes_metrics_and_state_and_runs_overdue_jobs_after_a_restart(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=13)
    assert cli("init", repo=repo).returncode == 0
    metrics = tmp_path / "textfile" / "clubsnap.prom"
    metrics.parent.mkdir()
    started = time.time()
    with _Running(_run_command(data, tmp_path, "--every", "1s", "--prune-every", "2s", "--verify-every", "2s",
                               "--keep-last", "2", "--wait", "0s", "--metrics-file", str(metrics)),
                  _run_env(repo, tmp_path)) as running:
        running.wait_for(lambda events: {"snapshot", "prune", "verify"} <= _done(events))
        code, err = running.stop()
    finished = time.time()
    assert code == 0, err
    values = _parse_metrics(metrics.read_text(), str(repo))
    for job in ("snapshot", "prune", "verify"):
        label = f'{{job="{job}"}}'
        assert started <= values[f"clubsnap_job_last_run_timestamp_seconds{label}"] <= finished
        assert values[f"clubsnap_job_last_run_timestamp_seconds{label}"] <= \
            values[f"clubsnap_job_last_success_timestamp_seconds{label}"] <= finished
        assert 0 <= values[f"clubsnap_job_last_duration_seconds{label}"] <= finished - started
        assert values[f"clubsnap_job_failures_total{label}"] == 0
    on_disk = sum(1 for f in data.rglob("*") if f.is_file())
    assert 0 < values["clubsnap_snapshot_last_files"] <= on_disk and values["clubsnap_snapshot_last_bytes_added"] >= 0
    assert values["clubsnap_snapshot_last_partial"] == 0
    assert values["clubsnap_verify_last_consistent"] == 1
    assert values["clubsnap_repository_snapshots"] == len(json.loads(cli("snapshots", "--json", repo=repo).stdout))
    assert values["clubsnap_repository_stored_bytes"] == sum(
        f.stat().st_size for f in (repo / "data").rglob("*") if f.is_file())
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o644 and os.listdir(metrics.parent) == ["clubsnap.prom"]

    state_file, = (tmp_path / "cli-cache").glob("*/run-state.json")
    state = json.loads(state_file.read_text())["jobs"]
    assert all(state[job]["ok"] for job in ("snapshot", "prune", "verify"))
    assert started <= datetime.fromisoformat(state["verify"]["last_run"]).timestamp() <= finished
    # Stopped for two hours, then restarted: prune and verify, due hourly, are overdue and
    # run at once (counted from the start, they would wait an hour after every restart).
    overdue = datetime.now(timezone.utc) - timedelta(hours=2)
    for job in ("prune", "verify"):
        state[job]["last_run"] = overdue.isoformat()
    state_file.write_text(json.dumps({"jobs": state}))
    with _Running(_run_command(data, tmp_path, "--every", "1h", "--prune-every", "1h", "--verify-every", "1h",
                               "--keep-last", "2", "--wait", "0s"), _run_env(repo, tmp_path)) as running:
        running.wait_for(lambda events: {"snapshot", "prune", "verify"} <= _done(events))
        code, err = running.stop()
    assert code == 0, err
    again = json.loads(state_file.read_text())["jobs"]
    assert all(datetime.fromisoformat(again[job]["last_run"]) > overdue + timedelta(hours=1)
               for job in ("prune", "verify"))


def test_run_verifies_the_newest_snapshot_of_its_own_registry(cli: Cli, tmp_path: Path) -> None:
    ours, theirs, repo = tmp_path / "ours", tmp_path / "theirs", tmp_path / "repo"
    generate(ours, "tiny", seed=16)
    generate(theirs, "tiny", seed=17)
    next((theirs / "blobs").rglob("package.tar.gz")).unlink()
    assert cli("init", repo=repo).returncode == 0
    ours_id = json.loads(cli("snapshot", str(ours), "--host", "reg-a", "--json", repo=repo).stdout)["id"]
    # Newer, and inconsistent: of this host but another data dir, then of this dir but another host.
    assert cli("snapshot", str(theirs), "--host", "reg-a", repo=repo).returncode == 0
    next((ours / "blobs").rglob("package.tar.gz")).unlink()
    assert cli("snapshot", str(ours), "--host", "reg-b", repo=repo).returncode == 0
    with _Running(_run_command(ours, tmp_path, "--host", "reg-a", "--every", "off", "--prune-every", "off",
                               "--verify-every", "1s"), _run_env(repo, tmp_path)) as running:
        running.wait_for(lambda events: any(e["event"] == "verify" for e in events))
        code, err = running.stop()
    assert code == 0, err
    verify = next(e for e in running.events if e["event"] == "verify")
    assert verify["ok"] and verify["snapshot"] == ours_id and verify["consistent"]


# ---- SIGTERM ends a prune's wait -----------------------------------------------------------------

def test_a_prune_asked_to_stop_hands_its_garbage_on(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    generate(tmp_path / "data", "tiny", seed=18)
    first = create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host="h", now=clock))
    remove_snapshots(repo, [first.info])  # every pack is garbage now
    stop, waiting = threading.Event(), threading.Event()
    reports = []

    def progress(text: str) -> None:
        if text.startswith("waiting for"):
            waiting.set()

    options = PruneOptions(wait_s=3600.0, stop=stop, progress=progress)
    with _read_lock_held(Path(repo.backend.location), tmp_path / "holder-cache"):
        pruner = threading.Thread(target=lambda: reports.append(prune(repo, options)), daemon=True)
        pruner.start()
        assert waiting.wait(HANG_GUARD_S), "the prune never waited for the reader"
        stop.set()  # as SIGTERM does in `clubsnap run`
        pruner.join(HANG_GUARD_S)
        assert not pruner.is_alive(), "the prune sat out its wait"
    report = reports[0]
    assert report.pending_packs > 0 and report.packs_deleted == 0 and len(report.waited_for) == 1
    assert list(repo.backend.list(GARBAGE_PREFIX))
    swept = prune(repo, PruneOptions(wait_s=0))  # the reader is gone: the next prune deletes them
    assert swept.swept_earlier_packs == report.pending_packs and not list(repo.backend.list(GARBAGE_PREFIX))


def test_sigterm_ends_a_prune_waiting_inside_run(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=14)
    assert cli("init", repo=repo).returncode == 0
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    shutil.rmtree(data)
    generate(data, "tiny", seed=15)  # another registry's content: the first snapshot's packs become garbage
    with _read_lock_held(repo, tmp_path / "holder-cache"), \
            _Running(_run_command(data, tmp_path, "--every", "1h", "--prune-every", "1s", "--verify-every", "off",
                                  "--keep-last", "1", "--wait", "1h"), _run_env(repo, tmp_path)) as running:
        _until(lambda: bool(list(repo.glob("garbage/*"))))  # condemned: the prune waits for the reader
        code, err = running.stop()
    assert code == 0, err
    pruned = [e for e in running.events if e["event"] == "prune"]
    assert len(pruned) == 1 and pruned[0]["ok"] and int(pruned[0]["pending_packs"]) > 0
    assert running.events[-1]["event"] == "stop"
    swept = json.loads(cli("prune", "--json", repo=repo).stdout)
    assert swept["swept_earlier_packs"] == pruned[0]["pending_packs"] and not list(repo.glob("garbage/*"))
    assert json.loads(cli("check", "--json", repo=repo).stdout)["ok"]


# ---- the daily snapshot after downtime -----------------------------------------------------------

@pytest.mark.parametrize("now, last, expected", [
    ("2026-04-09T09:00+02:00", "2026-04-08T02:30+02:00", "now"),      # down across today's 02:30
    ("2026-04-09T09:00+02:00", "2026-04-09T02:30:01+02:00", "2026-04-10T02:30+02:00"),  # taken today
    ("2026-04-09T01:00+02:00", "2026-04-08T02:30:01+02:00", "2026-04-09T02:30+02:00"),  # not due yet
    ("2026-04-09T01:00+02:00", "2026-04-06T02:30+02:00", "now"),      # yesterday's was missed
    ("2026-04-09T09:00+02:00", None, "2026-04-10T02:30+02:00"),       # never taken: no catch-up
    ("2026-03-29T09:00+02:00", "2026-03-28T02:30+01:00", "now"),      # 02:30 was skipped: 03:30 passed
])
def test_a_daily_snapshot_missed_while_down_is_taken_at_start(berlin: None, now: str, last: str | None,
                                                              expected: str) -> None:
    from engine.scheduler import first_daily
    moment = datetime.fromisoformat(now)
    due = first_daily(clock_time(2, 30), datetime.fromisoformat(last) if last else None, moment)
    assert due == (moment if expected == "now" else datetime.fromisoformat(expected)), due


def test_a_failed_daily_snapshot_is_tried_again_soon(berlin: None) -> None:
    from engine.scheduler import DAILY_RETRY_S, _after_daily
    daily = Schedule(snapshot_every=None, daily_at=clock_time(2, 30))
    ran = datetime.fromisoformat("2026-04-09T02:30:04+02:00")
    assert _after_daily(daily, True, ran) == datetime.fromisoformat("2026-04-10T02:30+02:00")
    assert _after_daily(daily, False, ran) == ran + timedelta(seconds=DAILY_RETRY_S)
    assert _after_daily(replace(daily, snapshot_every=120.0), False, ran) == ran + timedelta(minutes=2)
    late = datetime.fromisoformat("2026-04-10T02:29+02:00")  # never past the next day's time
    assert _after_daily(daily, False, late) == datetime.fromisoformat("2026-04-10T02:30+02:00")


# ---- forget and verify act on this registry; the metrics tell a verify that cannot restore -------

def test_run_forgets_only_its_own_registrys_snapshots(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    from engine import scheduler
    from engine.forget import StoredPolicy
    from engine.repository import SnapshotFilter
    from engine.retention import Policy
    generate(tmp_path / "data", "tiny", seed=19)
    for host in ("reg-a", "reg-b") * 3:
        clock.advance(minutes=10)
        create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host=host, now=clock))
    source = repo.snapshots()[0].record["source"]
    jobs = scheduler.Jobs(repo, lambda tags: SnapshotOptions(source=tmp_path / "data"),
                          StoredPolicy(Policy(last=1)), PruneOptions(wait_s=0.0),
                          select=SnapshotFilter("reg-a", source))
    assert scheduler._forget_and_prune(jobs, threading.Event())["forgotten"] == 2
    assert sorted(s.record["host"] for s in repo.snapshots()) == ["reg-a", "reg-b", "reg-b", "reg-b"]


def test_the_verify_metric_falls_when_the_snapshot_does_not_restore(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    from engine import scheduler
    from engine.errors import BackendError
    from engine.format import VERIFICATION_PREFIX
    generate(tmp_path / "data", "tiny", seed=20)
    create_snapshot(repo, SnapshotOptions(source=tmp_path / "data", host="h", now=clock))
    metrics = tmp_path / "clubsnap.prom"
    jobs = scheduler.Jobs(repo, lambda tags: SnapshotOptions(source=tmp_path / "data"), None,
                          PruneOptions(), str(tmp_path), metrics_file=metrics)
    logged: Events = []
    keeper = scheduler._Bookkeeper(jobs, RunState(tmp_path / "run-state.json"), logged.append)

    def consistent() -> float:
        return _parse_metrics(metrics.read_text(), repo.backend.location)["clubsnap_verify_last_consistent"]

    assert keeper.run("verify", lambda: scheduler._verify(jobs)) and consistent() == 1
    records = len(list(repo.backend.list(VERIFICATION_PREFIX)))
    get = repo.backend.get

    def unreachable(key: str, *window: int) -> bytes:
        if key.startswith("data/"):
            raise BackendError("bucket unreachable")
        return get(key, *window)

    repo.backend.get = unreachable  # type: ignore[method-assign]
    assert not keeper.run("verify", lambda: scheduler._verify(jobs))
    assert consistent() == 1 and logged[-1]["exit_code"] == BackendError.exit_code  # nothing was checked
    assert len(list(repo.backend.list(VERIFICATION_PREFIX))) == records  # and nothing recorded
    repo.backend.get = get  # type: ignore[method-assign]

    for pack in (Path(repo.backend.location) / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()  # the backup itself is gone: a verdict, recorded and shown
    assert not keeper.run("verify", lambda: scheduler._verify(jobs))
    assert consistent() == 0 and logged[-1]["exit_code"] == CheckFailed.exit_code
    assert "does not restore" in str(logged[-1]["error"])
    assert len(list(repo.backend.list(VERIFICATION_PREFIX))) == records + 1
    restarted = scheduler._Bookkeeper(jobs, RunState(tmp_path / "run-state.json"), logged.append)
    assert restarted.metrics.verify_consistent is False  # the alert stays up across a restart
    assert restarted.metrics.snapshot_partial is False


def test_metric_label_values_are_escaped() -> None:
    from engine.metrics import RunMetrics
    location = 's3://bucket/a "quoted"\\path\nnext'
    metrics = RunMetrics.for_jobs(location, ("snapshot",))
    metrics.jobs["snapshot"].ran(1.5, 2.0, ok=False)
    metrics.snapshot_partial = True
    text = metrics.render()
    assert text.count("\n") == len(text.splitlines())  # no raw newline inside a sample
    values = _parse_metrics(text, location.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
    assert values['clubsnap_job_failures_total{job="snapshot"}'] == 1 and values["clubsnap_snapshot_last_partial"] == 1


# ---- stopping while it starts, and a log nobody reads any more -----------------------------------

def test_sigterm_at_the_password_prompt_stops_run(cli: Cli, tmp_path: Path) -> None:
    import fcntl
    import pty
    import select
    import termios
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=21)
    assert cli("init", repo=repo).returncode == 0  # encrypted
    env = {k: v for k, v in _run_env(repo, tmp_path).items() if k != "CLUBSNAP_PASSWORD"}
    master, terminal = pty.openpty()

    def controlling_terminal() -> None:  # after setsid: the pty becomes /dev/tty, as an operator's
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)

    runner = subprocess.Popen(_run_command(data, tmp_path), env=env, stdin=terminal, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=controlling_terminal)
    os.close(terminal)
    try:
        prompt, deadline = b"", time.monotonic() + HANG_GUARD_S
        while b"password for" not in prompt:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no password prompt: {prompt!r}"
            prompt += os.read(master, 1024)
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=HANG_GUARD_S)
    finally:
        if runner.poll() is None:
            runner.kill()
        os.close(master)
    assert runner.returncode == 0 and err == "clubsnap: stopped by SIGTERM while starting\n", err
    assert out == "" and not list((tmp_path / "cli-cache").glob("*/run-state.json"))


def test_run_outlives_a_closed_or_full_log_and_a_listing_cut_short_exits_141(cli: Cli, tmp_path: Path) -> None:
    from engine.errors import EXIT_BROKEN_PIPE
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=22)
    assert cli("init", repo=repo).returncode == 0
    runner = subprocess.Popen(_run_command(data, tmp_path, "--every", "1s", "--prune-every", "off",
                                           "--verify-every", "off"), env=_run_env(repo, tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert runner.stdout is not None
    runner.stdout.readline()  # started; then nobody reads the log any more
    runner.stdout.close()
    _until(lambda: len(list(repo.glob("snapshots/*"))) >= 3)  # it kept taking snapshots
    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=HANG_GUARD_S)
    assert runner.returncode == 0 and "Traceback" not in err, err

    taken = len(list(repo.glob("snapshots/*")))
    buffered = {k: v for k, v in _run_env(repo, tmp_path).items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:  # a log on a full disk: lines are lost, nothing else
        runner = subprocess.Popen(_run_command(data, tmp_path, "--every", "1s", "--prune-every", "off",
                                               "--verify-every", "off"), env=buffered, stdout=full,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        _until(lambda: len(list(repo.glob("snapshots/*"))) >= taken + 2)
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=HANG_GUARD_S)
    assert runner.returncode == 0 and err == "", err

    reader, writer = os.pipe()
    os.close(reader)  # `| head` that has already quit
    listing = subprocess.run([sys.executable, "-m", "engine", "snapshots"], env=buffered,
                             stdout=writer, stderr=subprocess.PIPE, text=True, timeout=HANG_GUARD_S)
    os.close(writer)
    assert listing.returncode == EXIT_BROKEN_PIPE and "Traceback" not in listing.stderr, listing.stderr


def test_sigterm_while_a_bucket_does_not_answer_stops_run(tmp_path: Path) -> None:
    """A stop request during start-up's first S3 request must not be taken for a failed
    request and retried (it would be lost, and ``run`` would start after all)."""
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    env = {**_run_env(tmp_path / "unused", tmp_path), "CLUBSNAP_REPO": "s3://bucket/registry",
           "CLUBSNAP_S3_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    (tmp_path / "data").mkdir()
    runner = subprocess.Popen(_run_command(tmp_path / "data", tmp_path), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        silent.settimeout(HANG_GUARD_S)
        connection, _ = silent.accept()  # its request is on the way; no answer comes
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=HANG_GUARD_S)
        connection.close()
    finally:
        if runner.poll() is None:
            runner.kill()
        silent.close()
    assert runner.returncode == 0 and err == "clubsnap: stopped by SIGTERM while starting\n", err


STOPPER_CHILD = """
import signal, sys
from engine.cli import _Stopper
stopper = _Stopper()
stopper.starting = False
signal.signal(signal.SIGTERM, stopper)
print("ready", flush=True)
while not stopper.stop.wait(0):  # the scheduler's wait, its window made as wide as can be
    pass
"""


def test_a_stop_request_never_deadlocks_on_the_wait_it_interrupts() -> None:
    """The handler runs in the main thread, perhaps while it holds the stop event's lock
    inside ``wait()``: setting the event right there would hang ``run`` for good."""
    hung = 0
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", STOPPER_CHILD], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            hung += 1
            child.kill()
            child.wait()
        child.stdout.close()
    assert hung == 0, f"{hung} of 12 hung after one SIGTERM"


def test_a_daily_snapshot_that_never_succeeded_is_owed(tmp_path: Path) -> None:
    state = RunState(tmp_path / "run-state.json")
    assert state.last_daily() is None  # never ran: a first start is no catch-up
    now = datetime.now().astimezone()
    state.record(Outcome("daily", now, 1.0, error=CheckFailed("storage not mounted yet")))
    owed = state.last_daily()
    assert owed is not None and owed < now - timedelta(days=365)
    state.record(Outcome("daily", now, 1.0, {}))
    assert state.last_daily() == now + timedelta(seconds=1)
