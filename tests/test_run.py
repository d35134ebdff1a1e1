"""`clubsnap run` for a minute with a seconds-scale schedule, against a data dir club
keeps writing: snapshots land, retention thins them, verify runs, a second run is
refused, SIGTERM stops it cleanly, and `status --max-age` notices when it has stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.clubgen import LiveWriter, generate
from engine.errors import RepositoryLocked, Unhealthy

from .conftest import ROOT

Cli = Callable[..., subprocess.CompletedProcess[str]]
RUN_SECONDS = 60


def test_run_schedules_snapshots_retention_and_verify(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=12)
    assert cli("init", repo=repo).returncode == 0
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(tmp_path / "cli-cache"),
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "engine", "run", str(data), "--every", "2s", "--prune-every", "7s",
               "--verify-every", "9s", "--keep-last", "3", "--wait", "2s", "--log-json", "--temp-dir", str(tmp_path)]
    with LiveWriter(data, interval=0.003, publish_every=25) as writer:
        runner = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
        time.sleep(3)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == RepositoryLocked.exit_code, second.stderr
        assert "another 'clubsnap run'" in second.stderr
        time.sleep(RUN_SECONDS - 3)
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err
    assert writer.commits > 0 and writer.publishes > 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "start" and events[-1] == {**events[-1], "event": "stop", "failures": 0}
    by_kind: dict[str, list[dict[str, object]]] = {}
    for event in events[1:-1]:
        assert event["ok"], event
        by_kind.setdefault(str(event["event"]), []).append(event)
    assert len(by_kind["snapshot"]) >= 15
    assert len(by_kind["prune"]) >= 5 and sum(int(str(e["forgotten"])) for e in by_kind["prune"]) >= 10
    assert len(by_kind["verify"]) >= 4 and all(e["consistent"] for e in by_kind["verify"])

    kept = json.loads(cli("snapshots", "--json", repo=repo).stdout)
    assert 3 <= len(kept) <= 3 + 5  # three after the last prune, plus those taken since
    assert {s["id"] for s in kept} <= {str(e["id"]) for e in by_kind["snapshot"]}
    checked = json.loads(cli("check", "--read-data", "--json", repo=repo).stdout)
    assert checked["ok"] and not checked["warnings"]
    healthy = json.loads(cli("status", "--max-age", "15s", "--json", repo=repo).stdout)
    assert healthy["healthy"] and healthy["last_verify"]["ok"]
    time.sleep(16)  # the schedule is stopped: the newest snapshot ages past the bound
    stale = cli("status", "--max-age", "15s", repo=repo)
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
        assert scheduler._job("verify", action, logged.append) is False
    assert [e["ok"] for e in logged] == [False, False, False]
    assert [e["exit_code"] for e in logged] == [13, 1, 1] and "database is locked" in str(logged[2]["error"])
