"""Snapshots and prunes in parallel processes, for a while, with club writing all along:
afterwards the repository checks clean and every kept snapshot restores and verifies.

Three kinds of process run in loops: a club-like writer (commits and publishes), snapshots
(one host's catalog), and `forget --prune` with a tight policy and --max-unused 0%, so
each prune condemns packs that running snapshots may have just deduplicated against,
through another catalog (as from another host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.clubgen import LiveWriter, generate

from .conftest import ROOT

GUARD_S = 1200  # turns a hang into a failure; the test ends as soon as enough has happened
CHANGED = threading.Condition()


@dataclass
class Run:
    command: str
    started: float
    ended: float
    code: int
    stdout: str
    stderr: str


def _loop(name: str, args: list[str], cache: Path, repo: Path, stop: threading.Event, runs: list[Run],
          pause: float) -> None:
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    while not stop.is_set():
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        with CHANGED:
            runs.append(Run(name, started, time.monotonic(), done.returncode, done.stdout, done.stderr))
            CHANGED.notify_all()
        stop.wait(pause)


def _enough(runs: list[Run]) -> bool:
    """Twelve snapshots, five prunes, three of them beside a snapshot, packs deleted; or a
    failure. (What 45 s gave on an idle machine, without depending on the machine.)"""
    if any(r.code != 0 for r in runs):
        return True
    snapshots = [r for r in runs if r.command == "snapshot"]
    prunes = [r for r in runs if r.command == "prune"]
    return (len(snapshots) >= 12 and len(prunes) >= 5
            and sum(any(s.started < p.ended and p.started < s.ended for s in snapshots) for p in prunes) >= 3
            and sum(json.loads(p.stdout)["prune"]["packs_deleted"] for p in prunes) > 0)


def test_snapshots_and_prunes_in_parallel_lose_nothing(tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=41)
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(tmp_path / "setup"),
           "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "engine", "init"], env=env, check=True, capture_output=True)
    runs: list[Run] = []
    stop = threading.Event()
    loops = [
        threading.Thread(target=_loop, args=("snapshot", ["snapshot", str(data)], tmp_path / "host-a", repo, stop,
                                             runs, 0.0)),
        threading.Thread(target=_loop, args=("snapshot", ["snapshot", str(data), "--host", "b"],
                                             tmp_path / "host-b", repo, stop, runs, 0.5)),
        threading.Thread(target=_loop, args=("prune", ["forget", "--keep-last", "2", "--prune", "--json",
                                                       "--max-unused", "0%", "--wait", "2s"],
                                             tmp_path / "host-c", repo, stop, runs, 0.5)),
    ]
    with LiveWriter(data, interval=0.003, publish_every=20) as writer:
        for loop in loops:
            loop.start()
        with CHANGED:  # wait on what ran, not on the clock: a loaded machine only takes longer
            finished = CHANGED.wait_for(lambda: _enough(runs), timeout=GUARD_S)
        stop.set()
        for loop in loops:
            loop.join()
    assert finished, f"not enough ran in {GUARD_S} s: {[(r.command, r.code) for r in runs]}"
    assert writer.commits > 0 and writer.publishes > 0

    failed = [r for r in runs if r.code != 0]
    assert not failed, "\n".join(f"{r.command}: exit {r.code}: {r.stderr}" for r in failed)
    snapshots = [r for r in runs if r.command == "snapshot"]
    prunes = [r for r in runs if r.command == "prune"]
    assert len(snapshots) >= 6 and len(prunes) >= 3, (len(snapshots), len(prunes))
    overlapping = [p for p in prunes if any(s.started < p.ended and p.started < s.ended for s in snapshots)]
    assert overlapping, "no prune ran beside a snapshot"
    reports = [json.loads(p.stdout)["prune"] for p in prunes]
    assert sum(r["packs_deleted"] for r in reports) > 0, reports

    # A final prune with nothing running, then everything is checked from a cold catalog.
    final_env = {**env, "CLUBSNAP_CACHE_DIR": str(tmp_path / "final")}

    def clubsnap(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine", *args], env=final_env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)

    assert clubsnap("prune", "--max-unused", "0%").returncode == 0
    checked = clubsnap("check", "--read-data", "--json")
    assert checked.returncode == 0 and not json.loads(checked.stdout)["warnings"], checked.stdout + checked.stderr
    kept = json.loads(clubsnap("snapshots", "--json").stdout)
    assert len(kept) >= 4  # two per host, plus those taken after the last forget
    for snap in kept:
        verified = clubsnap("verify", snap["id"], "--json", "--temp-dir", str(tmp_path))
        assert verified.returncode == 0, f"{snap['id'][:8]}: {verified.stdout}{verified.stderr}"
