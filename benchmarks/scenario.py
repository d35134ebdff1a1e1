"""The step sequence, the same for every tool, on the tool's own copy of the data dir.

init; snapshot 1 (full); snapshot 2 (nothing changed); day 1; snapshot 3; day 2;
snapshot 4; restore latest into an empty dir; restore snapshot 1 by its time into an
empty dir; restore snapshot 1 over the day-2 dir (rollback); restore only db/club.db.
The days run in place on the tool's data dir, so file-change detection (inode, mtime,
ctime) sees what it would see beside a real club. Cheap steps (snapshot 2 and the
restores) run ``repeat`` times and report medians; every restore run is checked.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks.checks import check_restore
from benchmarks.clubgen import one_day
from benchmarks.measure import FIGURES, Measured
from benchmarks.peers import Clubsnap, Tool
from benchmarks.reference import Reference

STEPS = ("init", "snapshot_1", "snapshot_2", "snapshot_3", "snapshot_4",
         "restore_latest", "restore_at", "rollback", "restore_db")
MEDIAN_KEYS = (*FIGURES, "repo_bytes_added", "repo_bytes_read")
DETAIL_KEYS = ("stats", "bytes_fetched", "bytes_read_total", "bytes_reused", "bytes_total", "files_written", "deleted", "snapshot")


def run_tool(tool: Tool, template: Path, ref: Reference, seed: int, repeat: int) -> dict[str, Any]:
    started = time.monotonic()
    data = tool.work / "data"
    shutil.copytree(template, data, symlinks=True)
    steps: dict[str, Any] = {"init": _measure(tool, tool.init)}
    refs: list[str] = []

    def snapshot() -> Measured:
        step, snap_ref = tool.snapshot(data)
        refs.append(snap_ref)
        return step

    steps["snapshot_1"] = _measure(tool, snapshot)
    first = refs[0]
    at = datetime.now(timezone.utc)
    time.sleep(1.1)  # snapshot 2 strictly after `at`, even with borg's whole-second times
    steps["snapshot_2"] = _summary([_measure(tool, snapshot) for _ in range(repeat)])
    for day, step in ((1, "snapshot_3"), (2, "snapshot_4")):
        one_day(data, seed=seed, day=day)
        steps[step] = _measure(tool, snapshot)
    state_0, _, state_2 = ref.states
    empty = tool.work / "target"
    steps["restore_latest"] = _restores(tool, repeat, lambda: _empty(empty),
                                        lambda t: tool.restore("latest", t), state_2)
    steps["restore_at"] = _restores(tool, repeat, lambda: _empty(empty), lambda t: tool.restore_at(at, t), state_0)
    steps["rollback"] = _restores(tool, repeat, lambda: _copy(data, empty),
                                  lambda t: tool.restore(first, t, rollback=True), state_0,
                                  allow_extra=not isinstance(tool, Clubsnap))
    steps["restore_db"] = _restores(tool, repeat, lambda: _empty(empty),
                                    lambda t: tool.restore("latest", t, only_db=True), state_2, only_db=True)
    result = {"steps": steps, "repo_bytes_total": tool.repo_bytes(), "tool_s": round(time.monotonic() - started, 1)}
    shutil.rmtree(tool.work)
    return result


def _measure(tool: Tool, action: Callable[[], Measured]) -> dict[str, Any]:
    """One run of a step: the command figures, repository growth, and bytes read from it.

    clubsnap reports the bytes it fetched from the repository; for a peer only rchar
    (every byte its processes read, caches and config included) is known: an upper bound.
    """
    before = tool.repo_bytes() if tool.repo.exists() else 0
    step = action()
    detail = _detail(step.stdout)
    exact = "bytes_read_total" in detail
    return {**step.figures, "repo_bytes_added": tool.repo_bytes() - before,
            "repo_bytes_read": detail["bytes_read_total"] if exact else step.figures["rchar"],
            "repo_bytes_read_exact": exact, "detail": detail}


def _detail(stdout: str) -> dict[str, Any]:
    try:
        output = json.loads(stdout)
    except ValueError:
        return {}
    return {k: output[k] for k in DETAIL_KEYS if k in output} if isinstance(output, dict) else {}


def _restores(tool: Tool, repeat: int, prepare: Callable[[], Path], action: Callable[[Path], Measured],
              expected: dict[str, Any], **check: bool) -> dict[str, Any]:
    runs = []
    for _ in range(repeat):
        target = prepare()
        run = _measure(tool, lambda: action(target))
        run.update(check_restore(target, expected, **check))
        shutil.rmtree(target)
        runs.append(run)
    return _summary(runs)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the runs' figures; the first run's details; verified only if all were."""
    out = {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in MEDIAN_KEYS}}
    if len(runs) > 1:
        out["runs"] = [{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")} for r in runs]
    if "verified" in runs[0]:
        out["verified"] = all(r["verified"] for r in runs)
    return out


def _empty(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _copy(source: Path, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(source, path, symlinks=True)
    return path
