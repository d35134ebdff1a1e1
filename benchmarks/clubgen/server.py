"""The pieces of a running club server that day activity and LiveWriter share.

club holds one SQLite connection and one blob store; each API action commits its own
``BEGIN IMMEDIATE`` transaction. ``Server`` bundles those with a clock: a simulated one
for one_day (deterministic timestamps) or the wall clock for LiveWriter.
"""

from __future__ import annotations

import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from .profiles import Meta
from .rows import audit, insert
from .store import BlobStore


class Clock(Protocol):
    """Where row timestamps and temp-file suffixes come from."""

    def now(self) -> int:
        """Epoch milliseconds for row timestamps."""

    def micros(self) -> int:
        """Strictly increasing epoch microseconds for ``.tmp.<µs>`` names."""

    def advance(self, ms: int) -> int:
        """Let ``ms`` of activity pass; returns the new now()."""


class SimClock:
    """Simulated time: one_day stays deterministic by never reading the real clock."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms
        self._last_us = start_ms * 1000

    def now(self) -> int:
        return self.ms

    def advance(self, ms: int) -> int:
        self.ms += ms
        return self.ms

    def micros(self) -> int:
        self._last_us = max(self._last_us + 1, self.ms * 1000)
        return self._last_us


class WallClock:
    """Real time, for LiveWriter, which imitates a server running right now."""

    def __init__(self) -> None:
        self._last_us = 0

    def now(self) -> int:
        return time.time_ns() // 1_000_000

    def micros(self) -> int:
        self._last_us = max(self._last_us + 1, time.time_ns() // 1000)
        return self._last_us

    def advance(self, ms: int) -> int:
        """Real time passes by itself; a live server never skips ahead."""
        return self.now()


@dataclass
class Server:
    """One club process: its DB connection, blob store, clock and RNG."""

    root: Path
    conn: sqlite3.Connection
    store: BlobStore
    clock: Clock
    meta: Meta
    rng: random.Random
    log_lines: list[str] = field(default_factory=list)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front like club's writer (BEGIN IMMEDIATE)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def audit(self, conn: sqlite3.Connection, kind: str, agent: str | None, summary: str, **kw: Any) -> None:
        """Insert an audit_log row stamped with the current (server) time."""
        insert(conn, "audit_log", [audit(self.rng, self.clock.now(), kind, agent, summary, **kw).row])

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        """Rows as sqlite3 returns them (values typed by the schema, hence Any)."""
        return self.conn.execute(sql, params).fetchall()


def make_server(root: Path, conn: sqlite3.Connection, clock: Clock, meta: Meta, rng: random.Random) -> Server:
    """A Server whose blob store names temp files from ``clock``."""
    return Server(root, conn, BlobStore(root, clock.micros), clock, meta, rng)
