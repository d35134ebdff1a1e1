"""one_day(): apply CLUB_DATA §6.4 "one day of activity" to an existing data dir.

The day runs in a spawned child process that ends with ``os._exit`` while its connection
is still open, the way a crashed (or still running) club server leaves ``club.db-wal``
and ``-shm`` behind; SQLite recovers them on the next open. The report travels back over
a pipe before the child exits.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import accounts, events, housekeeping, traffic
from .events import DayState
from .extras import append_log
from .profiles import load_meta
from .rand import DAY_MS, HOUR_MS, date_utc, rng_for
from .schema import open_club
from .server import SimClock, make_server


def one_day(root: Path, seed: int, day: int = 1) -> dict[str, Any]:
    """Apply one day of activity to ``root``; deterministic given (seed, day, prior state).

    Leaves a non-empty ``db/club.db-wal``. Returns what happened: publishes, deletes,
    settings, traffic counts, and the blob keys (relative to ``blobs/``) added, replaced
    and removed. Do not open the DB in this process while relying on the -wal being there:
    closing the last connection checkpoints and deletes it.
    """
    root = Path(root)
    if not (root / "db" / "club.db").is_file():
        raise FileNotFoundError(f"{root} has no db/club.db; run generate first")
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(str(root), seed, day, sender), name=f"clubgen-day-{day}")
    child.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        raise RuntimeError(f"one_day child exited without a report (exit code {child.exitcode})") from None
    finally:
        child.join()
        receiver.close()
    if status != "ok":
        raise RuntimeError(f"one_day failed in its child process:\n{payload}")
    report: dict[str, Any] = payload
    return report


def _child(root: str, seed: int, day: int, sender: Connection) -> None:
    """Child entry point: run the day, report, then die without closing the DB."""
    code = 0
    try:
        sender.send(("ok", run_day(Path(root), seed, day)))
    except BaseException:
        sender.send(("error", traceback.format_exc()))
        code = 1
    os._exit(code)


def run_day(root: Path, seed: int, day: int) -> dict[str, Any]:
    """All events of the day in order; must run in a process that will not close the DB."""
    meta = load_meta(root)
    clock = SimClock(day_start(meta.profile.history_end_ms, day))
    server = make_server(root, open_club(root / "db" / "club.db"), clock, meta, rng_for(seed, "day", day))
    server.conn.execute("PRAGMA synchronous = NORMAL")  # speed; durability is irrelevant to a generator
    state = DayState((seed, day), report={"day": day, "seed": seed, "size": meta.size, "date": date_utc(clock.now())})
    volumes = meta.profile.day
    housekeeping.restart_cleanup(server)
    accounts.logins(server, state, volumes.logins)
    accounts.pats(server, state, volumes.pats_created, volumes.pats_revoked)
    published = events.publishes(server, state)
    pr_version = events.pr_build(server, state)
    if meta.scoring_enabled:
        events.score_all(server, state, published + ([pr_version] if pr_version else []))
        events.rescore(server, state)
    for event in (events.retract, events.delete_version, events.delete_package, events.visibility_flip,
                  accounts.settings_update, housekeeping.leave_inflight):
        event(server, state)
    accounts.likes(server, state, volumes.likes)
    append_log(root, server.log_lines)
    state.report["blobs"] = server.store.changes()
    traffic.hold_wal(server)
    traffic.run_traffic(server, state)
    state.report |= {"wal_frames": traffic.wal_frames(server),
                     "wal_bytes": (root / "db" / "club.db-wal").stat().st_size}
    return state.report


def day_start(history_end_ms: int, day: int) -> int:
    """Day N's activity starts at 06:00 UTC of the N-th day after generated history."""
    return history_end_ms + (day - 1) * DAY_MS + 6 * HOUR_MS
