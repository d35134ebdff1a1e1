"""ChurnWriter: a separate process that publishes and deletes versions at a high rate.

It is the writer a consistent cut must survive: about 50 publishes and 15 deletes a
second (``rates``), each a real change of club.db and blobs/, in one of two orders:

- ``"club"``, club's own (CLUB_DATA §2.2): publish = the version row commits, then the
  tarball and a screenshot are written; delete = the version's blob directory is removed,
  then its row.
- ``"reverse"``: publish = blobs first, then the row; delete = the row first, then the
  blobs. Other writers (and the issue that found the bugs) work this way; a snapshot must
  be consistent under both.

Blobs are written as club's filesystem store writes them (``<final>.tmp.<µs>`` then a
rename, via BlobStore), and a delete removes the whole ``<pkg>/<ver>/`` directory. Only
versions the churn published are deleted, so the generated data set stays whole. The
tarballs are small random bytes whose size and SHA-256 the row records: a restored
snapshot passes ``check_club`` only if every row's blobs came with it.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Callable

from .child import ChildWriter, run_child
from .rand import sha256_hex
from .schema import open_club
from .server import WallClock
from .store import BlobStore

ORDERS = ("club", "reverse")


class ChurnWriter(ChildWriter):
    """Context manager running the churn process from ``__enter__`` to ``__exit__``.

    ``published`` and ``deleted`` count while it runs (shared counters); after exit,
    ``busy`` counts operations that failed with "database is locked" (0 when nothing
    held club's write lock past its busy_timeout).
    """

    name = "churn"

    def __init__(self, root: Path, order: str = "club", publishes_per_s: float = 50.0,
                 deletes_per_s: float = 15.0, seed: int = 0) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        super().__init__()
        self.root, self.order, self.seed = Path(root), order, seed
        self.rates = (publishes_per_s, deletes_per_s)
        self.busy = 0
        self._published: Synchronized[int] = self._ctx.Value("q", 0)
        self._deleted: Synchronized[int] = self._ctx.Value("q", 0)

    @property
    def published(self) -> int:
        return int(self._published.value)

    @property
    def deleted(self) -> int:
        return int(self._deleted.value)

    def target(self) -> Callable[..., None]:
        return _churn_main

    def args(self) -> tuple[Any, ...]:
        return str(self.root), self.order, self.rates, self.seed, self._published, self._deleted

    def finished(self, payload: Any) -> None:
        self.busy = int(payload)


def _churn_main(root: str, order: str, rates: tuple[float, float], seed: int, published: Synchronized[int],
                deleted: Synchronized[int], stop: Event, ready: Event, sender: Connection) -> None:
    def churn() -> int:
        conn = open_club(Path(root) / "db" / "club.db")
        busy = _Churn(conn, BlobStore(Path(root), WallClock().micros), order, random.Random(seed), seed).run(
            rates, stop, ready, published, deleted)
        conn.close()
        return busy

    run_child(churn, ready, sender)


class _Churn:
    """The churn's state: the packages it publishes into and the versions it may delete."""

    def __init__(self, conn: sqlite3.Connection, store: BlobStore, order: str, rng: random.Random,
                 seed: int) -> None:
        self.conn, self.store, self.order, self.rng, self.seed = conn, store, order, rng, seed
        self.packages = [r[0] for r in conn.execute("SELECT name FROM packages ORDER BY name")]
        self.live: list[tuple[str, str]] = []  # versions this churn published, not yet deleted
        self.number = 0
        self.busy = 0

    def run(self, rates: tuple[float, float], stop: Event, ready: Event, published: Synchronized[int],
            deleted: Synchronized[int]) -> int:
        """Publish and delete on a fixed schedule (not as fast as possible) until stopped."""
        start = time.monotonic()
        done_publishes = done_deletes = 0
        ready.set()
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if done_publishes < elapsed * rates[0]:
                done_publishes += 1
                if self._guarded(self.publish):
                    published.value += 1
            elif done_deletes < elapsed * rates[1] and self.live:
                done_deletes += 1
                if self._guarded(self.delete):
                    deleted.value += 1
            else:
                time.sleep(0.002)
        return self.busy

    def _guarded(self, action: Any) -> bool:
        try:
            action()
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            self.busy += 1
            return False

    def publish(self) -> None:
        package = self.rng.choice(self.packages)
        self.number += 1
        version = f"0.{self.seed}.{self.number}-churn"
        tarball = self.rng.randbytes(self.rng.randint(200, 6000))
        shots = [self.rng.randbytes(self.rng.randint(100, 2000))] if self.number % 3 == 0 else []
        if self.order == "reverse":
            self._write_blobs(package, version, tarball, shots)
            self._insert_row(package, version, tarball, shots)
        else:
            self._insert_row(package, version, tarball, shots)
            self._write_blobs(package, version, tarball, shots)
        self.live.append((package, version))

    def delete(self) -> None:
        package, version = self.live.pop(self.rng.randrange(len(self.live)))
        if self.order == "reverse":
            self._delete_row(package, version)
            self.store.delete_version(package, version)
        else:
            self.store.delete_version(package, version)
            self._delete_row(package, version)

    def _write_blobs(self, package: str, version: str, tarball: bytes, shots: list[bytes]) -> None:
        self.store.put(f"{package}/{version}/artifacts/package.tar.gz", tarball)
        for index, shot in enumerate(shots):
            self.store.put(f"{package}/{version}/screenshots/{index}", shot)

    def _insert_row(self, package: str, version: str, tarball: bytes, shots: list[bytes]) -> None:
        screenshots = json.dumps([{"path": f"shot{i}.png", "description": None, "sizeBytes": len(s),
                                   "sha256": sha256_hex(s), "mimeType": "image/png"} for i, s in enumerate(shots)])
        now = time.time_ns() // 1_000_000
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "INSERT INTO package_versions (package_name, version, pubspec_json, screenshots, "
                "archive_size_bytes, archive_sha256, is_prerelease, published_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                (package, version, json.dumps({"name": package, "version": version}), screenshots, len(tarball),
                 sha256_hex(tarball), now))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _delete_row(self, package: str, version: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM package_versions WHERE package_name = ? AND version = ?",
                              (package, version))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
