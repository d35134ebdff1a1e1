"""LiveWriter: a separate process that writes to club.db like a busy club server.

It opens the DB exactly as club does (WAL, foreign_keys, busy_timeout 5000, default
synchronous=FULL) and commits one small ``BEGIN IMMEDIATE`` transaction per request:
download-count UPSERTs, token last-use updates and audit inserts. Optionally every N
transactions it runs a full publish (DB first, then blobs via ``.tmp.<µs>`` + rename).
Snapshot tests run the engine against it to prove captures are consistent and never
block the server for longer than its busy timeout.
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Callable

from .child import ChildWriter, run_child
from .profiles import load_meta
from .publish import publish
from .successor import spec_from
from .rand import date_utc, uuid4
from .rows import audit, insert
from .schema import open_club
from .semver import next_stable
from .server import Server, WallClock, make_server
from .traffic import UPSERT


class LiveWriter(ChildWriter):
    """Context manager running the writer process from ``__enter__`` to ``__exit__``.

    After exit: ``commits`` (request transactions committed), ``publishes`` (full
    publishes done) and ``busy`` (requests that failed with "database is locked", i.e.
    something held the write lock past busy_timeout; a healthy snapshot keeps this 0).
    """

    name = "live writer"

    def __init__(self, root: Path, interval: float = 0.005, publish_every: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root)
        self.interval = interval
        self.publish_every = publish_every
        self.seed = seed
        self.commits = 0
        self.publishes = 0
        self.busy = 0
        self._counter: Synchronized[int] = self._ctx.Value("q", 0)

    def target(self) -> Callable[..., None]:
        return _writer_main

    def args(self) -> tuple[Any, ...]:
        return str(self.root), self.interval, self.publish_every, self.seed, self._counter

    def finished(self, payload: Any) -> None:
        self.commits, self.publishes, self.busy = payload

    @property
    def live_commits(self) -> int:
        """Commits so far, readable while the writer runs."""
        return int(self._counter.value)


def _writer_main(root: str, interval: float, publish_every: int | None, seed: int, counter: Synchronized[int],
                 stop: Event, ready: Event, sender: Connection) -> None:
    """Child entry point: serve "requests" until told to stop, then close cleanly."""
    def serve() -> tuple[int, int, int]:
        server = make_server(Path(root), open_club(Path(root) / "db" / "club.db"), WallClock(), load_meta(Path(root)),
                             random.Random(seed))
        result = _serve(server, interval, publish_every, stop, ready, counter)
        server.conn.close()
        return result

    run_child(serve, ready, sender)


def _serve(server: Server, interval: float, publish_every: int | None, stop: Event, ready: Event,
           counter: Synchronized[int]) -> tuple[int, int, int]:
    pairs = [tuple(r) for r in server.query("SELECT name, latest_version FROM packages WHERE latest_version "
                                            "IS NOT NULL ORDER BY name")]
    tokens = [r[0] for r in server.query("SELECT token_id FROM api_tokens WHERE revoked_at IS NULL ORDER BY token_id")]
    commits = publishes = busy = 0
    ready.set()
    while not stop.is_set():
        try:
            _request(server, commits % 3, pairs, tokens)
            commits += 1
            counter.value = commits
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            busy += 1
        if publish_every and commits and commits % publish_every == 0 and _live_publish(server, publishes):
            publishes += 1
        time.sleep(interval)
    return commits, publishes, busy


def _request(server: Server, kind: int, pairs: list[tuple[Any, ...]], tokens: list[str]) -> None:
    """One request's transaction: a download, an authenticated call, or an audited action."""
    now = server.clock.now()
    with server.tx() as conn:
        if kind == 0 and pairs:
            conn.execute(UPSERT, (*server.rng.choice(pairs), date_utc(now)))
        elif kind == 1 and tokens:
            conn.execute("UPDATE api_tokens SET last_used_at = ? WHERE token_id = ?", (now, server.rng.choice(tokens)))
        else:
            package = server.rng.choice(pairs)[0] if pairs else None
            insert(conn, "audit_log", [audit(server.rng, now, "package.options_updated", None,
                                             f"Options updated ({uuid4(server.rng)[:8]})", package=package).row])


def _live_publish(server: Server, number: int) -> bool:
    """A full publish of the next version of some package; False if it could not run."""
    names = [r[0] for r in server.query("SELECT name FROM packages WHERE latest_version IS NOT NULL ORDER BY name")]
    if not names:
        return False
    package = server.rng.choice(names)
    versions = [r[0] for r in server.query("SELECT version FROM package_versions WHERE package_name = ?", (package,))]
    version = next_stable(server.rng, versions)
    uploaders = [r[0] for r in server.query("SELECT user_id FROM package_uploaders WHERE package_name = ? "
                                            "ORDER BY user_id", (package,))]
    if version in versions or not uploaders:
        return False
    spec = replace(spec_from(server, package, version, ("live", number)), heavy_bytes=0)
    publish(server, spec, server.rng.choice(uploaders))
    return True
