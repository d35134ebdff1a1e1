"""Consistent page images of live SQLite databases, read straight from the files.

A snapshot reads each database page by page inside one read transaction, the way
Litestream does (SQLITE_NOTES §1.2c): the database file's pages, with the newest WAL
frame of each page (up to the transaction's end mark) laid over them. Nothing is copied
to a temporary file; pages stream into the chunker, and the image is byte-identical to
what SQLite itself would read. The pinned connection stays open while the pages are read,
so queries on it (the blob references a snapshot checks) see exactly the same image.

Why this is consistent:

- **Pinning without a write lock.** The wal-index header (first bytes of ``-shm``) is read
  before the read transaction starts and again after it started. Every commit rewrites
  that header, so two equal copies prove the transaction sees exactly the header read.
  Under a writer that commits back to back the two reads rarely agree; after a few tries
  the header is read while a ``BEGIN IMMEDIATE`` of our own holds the writer off for well
  under a millisecond (waiting for that lock costs club nothing).
- **Nothing moves under the copy.** While the transaction is open, a checkpoint copies
  only frames at or below its mark into the database file (and the copy lays exactly
  those frames over such pages), and the WAL cannot restart. If every frame was already
  checkpointed when the transaction began, SQLite reads the database file alone, and no
  checkpoint may touch the file until the transaction ends.
- **POSIX locks.** Closing any descriptor of ``club.db*`` drops every lock this process
  holds on it, the transaction's included (SQLITE_NOTES §1.2 trap). The raw descriptors
  are opened after the connection and closed only after it.

A database in rollback-journal mode is read under the transaction's SHARED lock, which
keeps every writer from changing the file until the read ends: consistent, but club's
writer waits (up to its busy_timeout) while the pages are read.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import quote

BUSY_TIMEOUT_S = 30
OPTIMISTIC_TRIES = 20          # unlocked attempts to pin before sealing the WAL
READ_PAGES = 256               # database pages per read call

# wal-index header (native byte order): iVersion, unused, iChange, isInit, bigEndCksum,
# szPage, mxFrame, nPage, aFrameCksum[2], aSalt (raw WAL-header bytes), aCksum[2]
WAL_INDEX_HEADER = struct.Struct("=IIIBBHII8s8s8s")
NBACKFILL_OFFSET = 96          # WalCkptInfo.nBackfill, after the two header copies
WAL_HEADER_SIZE = 32
WAL_SALT = slice(16, 24)
FRAME_HEADER_SIZE = 24
FRAME_SALT = slice(8, 16)
JOURNAL_MODE_BYTES = slice(18, 20)  # 2,2 = WAL; 1,1 = rollback journal


class CaptureError(Exception):
    """The database could not be captured; the message names the reason."""


@dataclass
class PinnedImage:
    """One database as of one commit: its pages, and a connection reading that same state."""

    connection: sqlite3.Connection
    page_size: int
    page_count: int
    info: dict[str, Any]
    _db_fd: int
    _wal_fd: int | None
    _wal_frames: dict[int, int] = field(default_factory=dict)  # page number -> data offset in -wal
    _wal_salt: bytes = b""

    @property
    def size(self) -> int:
        return self.page_size * self.page_count

    def pages(self) -> Iterator[bytes]:
        """Pages 1..page_count of the image, in order."""
        size = self.page_size
        for first in range(1, self.page_count + 1, READ_PAGES):
            count = min(READ_PAGES, self.page_count - first + 1)
            block = os.pread(self._db_fd, count * size, (first - 1) * size)
            for number in range(first, first + count):
                frame = self._wal_frames.get(number)
                if frame is not None:
                    yield self._wal_page(frame)
                    continue
                page = block[(number - first) * size:(number - first + 1) * size]
                if len(page) != size:
                    raise CaptureError(f"page {number} is neither in the database file nor in its WAL")
                yield page
        if self._wal_fd is not None and os.pread(self._wal_fd, WAL_HEADER_SIZE, 0)[WAL_SALT] != self._wal_salt:
            raise CaptureError("the WAL restarted during the capture (should be impossible while pinned)")

    def _wal_page(self, offset: int) -> bytes:
        page = os.pread(self._wal_fd or 0, self.page_size, offset)
        if len(page) != self.page_size:
            raise CaptureError("the WAL is shorter than its index says")
        return page


@contextmanager
def pinned_image(database: str) -> Iterator[PinnedImage]:
    """Open ``database`` and hold one read transaction on it for the ``with`` block."""
    with ExitStack() as stack:
        try:
            yield _pin(database, stack)
        except sqlite3.Error as exc:
            raise CaptureError(str(exc)) from exc


def _pin(database: str, stack: ExitStack) -> PinnedImage:
    uri = f"file:{quote(database)}"
    try:
        # Descriptors are closed last (ExitStack unwinds in reverse): see the module notes.
        db_fd = _open_raw(stack, database)
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        stack.callback(conn.close)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # creates -wal/-shm if needed
    except sqlite3.Error as exc:
        raise CaptureError(str(exc)) from exc
    except OSError as exc:
        raise CaptureError(exc.strerror or str(exc)) from exc
    header = os.pread(db_fd, 100, 0)
    if header[JOURNAL_MODE_BYTES] != b"\x02\x02":
        return _pin_rollback(conn, db_fd)
    return _pin_wal(database, uri, conn, db_fd, stack)


def _open_raw(stack: ExitStack, path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    stack.callback(os.close, fd)
    return fd


def _pin_rollback(conn: sqlite3.Connection, db_fd: int) -> PinnedImage:
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # SHARED lock from here on
    page_size, page_count = _geometry(conn)
    info = {"method": "page-read", "journal_mode": "rollback", **_versions(conn)}
    return PinnedImage(conn, page_size, page_count, info, db_fd, None)


def _pin_wal(database: str, uri: str, conn: sqlite3.Connection, db_fd: int, stack: ExitStack) -> PinnedImage:
    try:
        shm_fd = _open_raw(stack, database + "-shm")
        wal_fd = _open_raw(stack, database + "-wal")
    except OSError as exc:
        raise CaptureError(f"cannot read the WAL index ({exc.strerror})") from exc
    started = time.monotonic()
    pinned = None
    for _ in range(OPTIMISTIC_TRIES):
        pinned = _try_pin(conn, shm_fd)
        if pinned:
            sealed = False
            break
    else:
        seal = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            seal.execute("BEGIN IMMEDIATE")
            sealed_at = time.monotonic()
            pinned = _try_pin(conn, shm_fd)
            seal.execute("ROLLBACK")
            sealed = True
            seal_ms = round((time.monotonic() - sealed_at) * 1000, 3)
        finally:
            seal.close()  # while our reader is open, closing cannot checkpoint or remove the WAL
        if not pinned:
            raise CaptureError("the WAL index changed under a sealed read (another process is not SQLite?)")
    header, backfilled = pinned
    _, _, _, _, _, _, max_frame, _, _, salt, _ = header
    page_size, page_count = _geometry(conn)
    image = PinnedImage(conn, page_size, page_count, {}, db_fd, None)
    if backfilled < max_frame:
        # Frames above the checkpoint are needed; frames at or below it are in the file too.
        image._wal_fd, image._wal_salt = wal_fd, salt
        image._wal_frames = _wal_frames(wal_fd, max_frame, page_size, salt)
    image.info = {"method": "page-read", "journal_mode": "wal", "wal_frames": max_frame,
                  "wal_frames_checkpointed": min(backfilled, max_frame),
                  "wal_bytes": os.fstat(wal_fd).st_size,
                  "pin_ms": round((time.monotonic() - started) * 1000, 3), "sealed": sealed,
                  **({"seal_ms": seal_ms} if sealed else {}), **_versions(conn)}
    return image


def _try_pin(conn: sqlite3.Connection, shm_fd: int) -> tuple[tuple[Any, ...], int] | None:
    """Start a read transaction; return the wal-index header it sees and the checkpoint
    mark, or None (transaction ended) when a commit landed while it started."""
    before = _wal_index_header(shm_fd)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    # nBackfill is read before the second header: a WAL restart rewrites the header
    # before it resets nBackfill, so a reset seen here always shows as a header change.
    backfilled = struct.unpack("=I", os.pread(shm_fd, 4, NBACKFILL_OFFSET))[0]
    after = _wal_index_header(shm_fd)
    if before is not None and before == after:
        return before, backfilled
    conn.execute("ROLLBACK")
    return None


def _wal_index_header(shm_fd: int) -> tuple[Any, ...] | None:
    raw = os.pread(shm_fd, 2 * WAL_INDEX_HEADER.size, 0)
    if len(raw) < 2 * WAL_INDEX_HEADER.size or raw[:WAL_INDEX_HEADER.size] != raw[WAL_INDEX_HEADER.size:]:
        return None  # being written, or not initialised yet
    header = WAL_INDEX_HEADER.unpack(raw[:WAL_INDEX_HEADER.size])
    return header if header[3] == 1 else None


def _wal_frames(wal_fd: int, max_frame: int, page_size: int, salt: bytes) -> dict[int, int]:
    """Page number -> offset of its newest frame's data, over frames 1..max_frame."""
    frame_size = FRAME_HEADER_SIZE + page_size
    if os.pread(wal_fd, WAL_HEADER_SIZE, 0)[WAL_SALT] != salt:
        raise CaptureError("the WAL header does not match its index")
    frames: dict[int, int] = {}
    per_read = max(1, (4 << 20) // frame_size)
    for first in range(0, max_frame, per_read):
        count = min(per_read, max_frame - first)
        block = os.pread(wal_fd, count * frame_size, WAL_HEADER_SIZE + first * frame_size)
        if len(block) < count * frame_size:
            raise CaptureError("the WAL is shorter than its index says")
        for i in range(count):
            at = i * frame_size
            if block[at:at + FRAME_HEADER_SIZE][FRAME_SALT] != salt:
                raise CaptureError(f"WAL frame {first + i + 1} does not belong to the current WAL")
            page = int.from_bytes(block[at:at + 4], "big")
            frames[page] = WAL_HEADER_SIZE + (first + i) * frame_size + FRAME_HEADER_SIZE
    return frames


def _geometry(conn: sqlite3.Connection) -> tuple[int, int]:
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
    return page_size, page_count


def _versions(conn: sqlite3.Connection) -> dict[str, Any]:
    def pragma(name: str) -> int:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])

    return {"page_size": pragma("page_size"), "page_count": pragma("page_count"),
            "freelist_count": pragma("freelist_count"), "user_version": pragma("user_version"),
            "schema_version": pragma("schema_version"), "sqlite_version": sqlite3.sqlite_version}
