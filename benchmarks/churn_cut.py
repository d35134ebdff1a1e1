"""How often is a snapshot taken under heavy churn inconsistent or partial?

``python -m benchmarks.churn_cut --runs 15`` generates a tiny data dir, starts a
ChurnWriter (about 50 publishes and 15 deletes a second) in each write order, takes
``--runs`` ``create_snapshot(..., verify=True)`` per order and prints, per order, how many
were inconsistent (``verified.consistent`` false), partial, carried blobs forward or
found blobs lost. The test suite asserts 0 and 0 (tests/test_consistent_cut.py); this
prints the numbers, e.g. to compare against an older engine.

A tiny data dir is scanned in a few tens of milliseconds, so few changes would land
inside a scan by chance. ``in_step`` makes sure they do: every few files read, the
snapshot waits until the churn has published once more (waiting on the writer's state,
not on a clock), so each scan, second look and page read overlaps several publishes and
deletes, as a scan of a real registry's blobs does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks.clubgen import ChurnWriter, generate
from benchmarks.clubgen.churn import ORDERS
from engine import Repository, create_snapshot, open_backend
from engine.snapshot import Progress, SnapshotOptions

STEP_FILES = 10  # files read between two waits for the churn


def in_step(writer: ChurnWriter, every: int = STEP_FILES) -> Callable[[Progress], None]:
    """A progress callback that lets the churn publish once every ``every`` files."""
    def progress(done: Progress) -> None:
        if done.files_done % every == 0:
            seen = writer.published
            while writer.published == seen:
                time.sleep(0.0005)
    return progress



def measure(order: str, runs: int, work: Path) -> dict[str, Any]:
    data = work / f"data-{order}"
    generate(data, "tiny", seed=5)
    repo = Repository.init(open_backend(str(work / f"repo-{order}")), work / f"cache-{order}",
                           lambda: datetime.now(timezone.utc))
    counts: dict[str, Any] = {"runs": runs, "inconsistent": 0, "partial": 0, "carried_forward": 0, "lost": 0, "problems": []}
    try:
        create_snapshot(repo, SnapshotOptions(source=data, host="h", now=lambda: datetime.now(timezone.utc)))
        with ChurnWriter(data, order) as writer:
            for _ in range(runs):
                seen = writer.published
                while writer.published < seen + 5:  # churn is running: wait on it, not on a clock
                    pass
                result = create_snapshot(repo, SnapshotOptions(source=data, host="h", verify=True,
                                                               now=lambda: datetime.now(timezone.utc),
                                                               progress=in_step(writer)))
                record = result.info.record
                counts["inconsistent"] += not record["verified"]["consistent"]
                counts["partial"] += result.partial
                counts["carried_forward"] += bool(record.get("carried_forward"))
                counts["lost"] += bool(record.get("lost"))
                counts["problems"] += record["verified"]["problems"][:2] + result.errors[:2]
        counts["published"], counts["deleted"], counts["busy"] = writer.published, writer.deleted, writer.busy
    finally:
        repo.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="snapshots per write order")
    parser.add_argument("--order", choices=ORDERS, action="append", help="default: both")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="churn-cut-"))
    try:
        print(json.dumps({order: measure(order, args.runs, work) for order in args.order or ORDERS}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
