"""Frequent snapshots: many clubsnap snapshots back to back while club keeps writing.

"Frequent, low-cost snapshots" means three things that this measures: each snapshot
adds little beyond the data that really changed (overhead = repository growth minus the
stored bytes of new data chunks), its time does not grow with the number of snapshots
already taken, and listing them and restoring one from the middle by time stay quick.
One full snapshot is taken before the writer starts and is not counted.
"""

from __future__ import annotations

import json
import shutil
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.checks import CheckFailed
from benchmarks.clubgen import LiveWriter
from benchmarks.clubstate import db_dump
from benchmarks.measure import CommandFailed
from benchmarks.peers import Clubsnap

WRITER_INTERVAL_S = 0.005  # ~200 request transactions a second, like a busy club
PUBLISH_EVERY = 500  # a full publish (rows, then tarball and assets) every ~3 s


def run_frequent(template: Path, work: Path, count: int) -> dict[str, Any]:
    tool = Clubsnap(work / "frequent")
    data = tool.work / "data"
    shutil.copytree(template, data, symlinks=True)
    tool.init()
    tool.snapshot(data)
    with LiveWriter(data, interval=WRITER_INTERVAL_S, publish_every=PUBLISH_EVERY) as writer:
        rows = [_one(tool, data, n) for n in range(1, count + 1)]
    listing, snaps = tool.snapshots()
    middle = rows[count // 2]
    restore = _restore_middle(tool, middle, work / "frequent-restore")
    result = {"count": count, "writer": {"interval_s": WRITER_INTERVAL_S, "publish_every": PUBLISH_EVERY,
                                          "commits": writer.commits, "publishes": writer.publishes,
                                          "busy": writer.busy},
              "snapshots": rows, "listing": {**listing.figures, "snapshots_listed": len(snaps)},
              "restore_middle": restore, "summary": _summarise(rows)}
    shutil.rmtree(tool.work)
    return result


def _one(tool: Clubsnap, data: Path, number: int) -> dict[str, Any]:
    repo_before = tool.repo_bytes()
    step, ref = tool.snapshot(data)
    output = json.loads(step.stdout)
    repo_bytes = tool.repo_bytes()
    stats = output["stats"]
    return {"n": number, "id": ref, "time": output["time"], **step.figures, "repo_bytes": repo_bytes,
            "repo_bytes_added": repo_bytes - repo_before,
            "overhead_bytes": repo_bytes - repo_before - stats["data_bytes_stored"],
            **{k: stats[k] for k in ("bytes_added", "raw_bytes_added", "data_bytes_stored",
                                     "metadata_bytes_stored", "blobs_added", "bytes_read")}}


def _restore_middle(tool: Clubsnap, middle: dict[str, Any], target: Path) -> dict[str, Any]:
    """Restore by --at the middle snapshot's own time; it must be that snapshot, consistent."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    step = tool.restore_at(datetime.fromisoformat(middle["time"]), target)
    chosen = json.loads(step.stdout)["snapshot"]
    if chosen != middle["id"]:
        raise CheckFailed(f"restore --at {middle['time']} chose {chosen}, not snapshot {middle['id']}")
    try:
        tool.verify_data_dir(target)
    except CommandFailed as exc:
        raise CheckFailed(f"the middle snapshot restored inconsistent: {exc}") from exc
    integrity = db_dump(target / "db" / "club.db", live=False)["integrity_check"]
    if integrity != "ok":
        raise CheckFailed(f"the middle snapshot's club.db: integrity_check {integrity}")
    shutil.rmtree(target)
    return {**step.figures, "snapshot": chosen, "verified": True,
            "bytes_fetched": json.loads(step.stdout)["bytes_fetched"]}


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, and least-squares slopes of snapshot time against snapshot number.

    The writer inserts rows all along, so the database (read whole by every snapshot)
    grows during the run and snapshot time with it. ``wall_growth_over_run_s`` is the
    growth the snapshot *count* explains: the slope, against snapshot number, of what is
    left of each time after a fit on the bytes that snapshot read.
    """
    walls = [r["wall_s"] for r in rows]
    overheads = [r["overhead_bytes"] for r in rows]
    numbers = [r["n"] for r in rows]
    slope = residual_slope = 0.0
    if len(rows) > 2:
        slope = statistics.linear_regression(numbers, walls).slope
        read = [r["bytes_read"] for r in rows]
        by_size = statistics.linear_regression(read, walls) if len(set(read)) > 1 else None
        residuals = [w - (by_size.slope * b + by_size.intercept) for w, b in zip(walls, read)] if by_size else walls
        residual_slope = statistics.linear_regression(numbers, residuals).slope
    quarter = max(1, len(rows) // 4)
    return {"wall_s_median": statistics.median(walls), "wall_slope_s_per_snapshot": slope,
            "wall_growth_raw_over_run_s": slope * (len(rows) - 1),
            "wall_growth_over_run_s": residual_slope * (len(rows) - 1),
            "bytes_read_first": rows[0]["bytes_read"], "bytes_read_last": rows[-1]["bytes_read"],
            "wall_first_quarter_median": statistics.median(walls[:quarter]),
            "wall_last_quarter_median": statistics.median(walls[-quarter:]),
            "overhead_bytes_median": statistics.median(overheads), "overhead_bytes_max": max(overheads),
            "repo_bytes_added_median": statistics.median(r["repo_bytes_added"] for r in rows)}
