"""`make demo`: the main job on a generated club data dir, through the real command.

Builds a sample club data dir, snapshots it, applies one day of club activity (leaving
a live WAL), snapshots again, lists the snapshots, restores the first one by date into
a new directory and shows that it matches the data dir as it was at that time; then
forgets the first snapshot and prunes what only it needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks.clubgen import generate, one_day
from benchmarks.clubstate import club_state


def _clubsnap(work: Path, *args: str) -> None:
    command = ["clubsnap", *args]
    print(f"\n$ {' '.join(command)}", flush=True)
    # The demo repository is encrypted (the default) with the password "demo".
    env = {**os.environ, "CLUBSNAP_REPO": str(work / "repo"), "CLUBSNAP_CACHE_DIR": str(work / "cache"),
           "CLUBSNAP_PASSWORD": os.environ.get("CLUBSNAP_PASSWORD", "demo")}
    result = subprocess.run([sys.executable, "-m", "engine", *args], env=env)
    if result.returncode != 0:
        sys.exit(f"demo: clubsnap {args[0]} failed with exit code {result.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--work", default="demo-work")
    args = parser.parse_args()
    work = Path(args.work).absolute()
    shutil.rmtree(work, ignore_errors=True)
    data = work / "club-data"

    print(f"== generating a {args.size} club data dir in {data}", flush=True)
    started = time.monotonic()
    summary = generate(data, args.size, seed=1)
    print(f"   {summary.get('packages', '?')} packages, {summary.get('versions', '?')} versions "
          f"in {time.monotonic() - started:.1f}s", flush=True)
    _clubsnap(work, "init")
    _clubsnap(work, "snapshot", str(data), "--tag", "day-0")
    first_state = club_state(data, live=True)
    first_done = datetime.now(timezone.utc)

    time.sleep(1.1)
    print("\n== one day of club activity (publishes, deletes, downloads, a live WAL left behind)", flush=True)
    one_day(data, seed=1, day=1)
    _clubsnap(work, "snapshot", str(data), "--tag", "day-1")
    _clubsnap(work, "snapshots")

    as_of = (first_done + timedelta(seconds=0.5)).astimezone().isoformat(timespec="milliseconds")
    target = work / "restored"
    _clubsnap(work, "restore", "--at", as_of, "--target", str(target), "--dry-run")
    _clubsnap(work, "restore", "--at", as_of, "--target", str(target))
    _clubsnap(work, "check", "--read-data")
    _clubsnap(work, "verify", "--data", str(target))

    restored = club_state(target, live=False)
    if restored != first_state:
        sys.exit("demo: the restored data dir does NOT match the first snapshot's state")
    db = restored["db"]
    print(f"\n== restored state as of {as_of} matches the data dir at snapshot 1: "
          f"{len(restored['blobs'])} blob files byte-identical, club.db integrity_check={db['integrity_check']}, "
          f"user_version={db['user_version']}, every table's rows equal.")

    print("\n== retention: keep the newest snapshot, prune what only the first one needed", flush=True)
    _clubsnap(work, "forget", "--keep-last", "1", "--dry-run")
    _clubsnap(work, "forget", "--keep-last", "1", "--prune")
    _clubsnap(work, "check", "--read-data")


if __name__ == "__main__":
    main()
