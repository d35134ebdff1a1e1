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
  checkpointed when the transaction began, the file alone holds the image: SQLite then
  either reads the file alone (read-mark 0, which no checkpoint may pass) or caps every
  checkpoint at the transaction's mark, which the file has already reached.
- **POSIX locks.** Closing any descriptor of ``club.db*`` drops every lock this process
  holds on it, the transaction's included (SQLITE_NOTES §1.2 trap). The raw descriptors
  are closed only after the connections.

Nothing is written to the database. The connection is read-only (SQLite may create the
``-wal``/``-shm`` files as any reader does); only the seal opens a read-write connection,
for its ``BEGIN IMMEDIATE``, which needs write access to the database's directory.

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
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import quote

from ..errors import SourceError
from ..format import digest

BUSY_TIMEOUT_S = 30
SEALED_BUSY_TIMEOUT_MS = 100   # while our seal holds club off, our reader must not wait long
OPTIMISTIC_TRIES = 20          # unlocked attempts to pin before sealing the WAL
BACKOFF_S = 0.0005             # between attempts, times the attempt number
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


class CaptureError(SourceError):
    """The database could not be captured; the message names the reason."""


@dataclass(frozen=True)
class _WalOverlay:
    """The WAL frames an image needs: page number -> offset of its newest frame's data."""

    fd: int
    salt: bytes
    frames: dict[int, int]


@dataclass(frozen=True)
class PinnedImage:
    """One database as of one commit: its pages, and a connection reading that same state."""

    connection: sqlite3.Connection
    page_size: int
    page_count: int
    info: dict[str, Any]
    _db_fd: int
    _wal: _WalOverlay | None
    # Equal fingerprints mean equal images: the database file's identity and times (taken
    # after pinning) and, in WAL mode, the WAL's salt, end mark and running checksum up to
    # it. Like the files cache, it trusts a file's times unless they are too recent.
    fingerprint: str
    file_ctime_ns: int

    @property
    def size(self) -> int:
        return self.page_size * self.page_count

    def pages(self) -> Iterator[bytes]:
        """Pages 1..page_count of the image, in order."""
        try:
            yield from self._pages()
        except OSError as exc:
            raise CaptureError(f"reading failed ({exc.strerror or exc})") from exc

    def _pages(self) -> Iterator[bytes]:
        size, frames = self.page_size, self._wal.frames if self._wal else {}
        for first in range(1, self.page_count + 1, READ_PAGES):
            count = min(READ_PAGES, self.page_count - first + 1)
            block = os.pread(self._db_fd, count * size, (first - 1) * size)
            for number in range(first, first + count):
                frame = frames.get(number)
                page = (self._wal_page(frame) if frame is not None
                        else block[(number - first) * size:(number - first + 1) * size])
                if len(page) != size:
                    raise CaptureError(f"page {number} is neither in the database file nor in its WAL")
                yield page
        if self._wal and os.pread(self._wal.fd, WAL_HEADER_SIZE, 0)[WAL_SALT] != self._wal.salt:
            raise CaptureError("the WAL restarted during the capture (impossible while pinned: not SQLite?)")

    def _wal_page(self, offset: int) -> bytes:
        assert self._wal is not None
        return os.pread(self._wal.fd, self.page_size, offset)


@contextmanager
def pinned_image(database: str) -> Iterator[PinnedImage]:
    """Open ``database`` and hold one read transaction on it for the ``with`` block."""
    with ExitStack() as stack:
        stopped = _stopped_state(database) if _stopped_on_read_only_mount(database) else None
        yield _pin_stopped(database, stack) if stopped else _pin(database, stack)
        if stopped and _stopped_state(database) != stopped:
            raise CaptureError("club started while its stopped database was read from the read-only mount: "
                               "snapshot again")


def _stopped_on_read_only_mount(database: str) -> bool:
    """A WAL database that club closed cleanly (no ``-shm``; the ``-wal`` gone or empty),
    in a directory this process cannot write. SQLite would have to create the ``-shm``
    to open it; yet the file alone then holds every committed page."""
    try:
        wal_size = os.path.getsize(database + "-wal")
    except FileNotFoundError:
        wal_size = 0
    return wal_size == 0 and _wal_without_index_read_only(database)


def _wal_without_index_read_only(database: str) -> bool:
    """A WAL database without its ``-shm`` index, in a directory this process cannot
    write: SQLite cannot open it the usual way, for it would have to create the index."""
    return (not os.path.exists(database + "-shm") and not os.access(os.path.dirname(database) or ".", os.W_OK)
            and _wal_file(database))


def _stopped_state(database: str) -> tuple[Any, ...]:
    """What changes if club starts: the file's identity and times, the -wal and -shm."""
    st = os.stat(database)
    sidecars = tuple(os.path.exists(database + suffix) and os.path.getsize(database + suffix)
                     for suffix in ("-wal", "-shm"))
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sidecars


def _pin_stopped(database: str, stack: ExitStack) -> PinnedImage:
    """Read a stopped club's database on a read-only mount with ``immutable=1``, which
    skips the locking and the WAL index. Immutable is a promise that nobody writes the
    file: ``pinned_image`` checks it afterwards, against the state taken before."""
    raw = stack.enter_context(ExitStack())
    try:
        db_fd = _open_raw(raw, database)
        conn = sqlite3.connect(f"file:{quote(database)}?mode=ro&immutable=1", uri=True, isolation_level=None)
        stack.callback(conn.close)
        conn.execute("BEGIN")
        info = {"method": "page-read", "journal_mode": "wal", "read": "immutable: club stopped, read-only mount",
                **_describe(conn)}
    except sqlite3.Error as exc:
        raise CaptureError(str(exc)) from exc
    except OSError as exc:
        raise CaptureError(f"{exc.strerror or exc}") from exc
    st = os.fstat(db_fd)
    return PinnedImage(conn, info["page_size"], info["page_count"], info, db_fd, None,
                       _fingerprint(st, info, b"empty"), st.st_ctime_ns)


def _pin(database: str, stack: ExitStack) -> PinnedImage:
    raw = stack.enter_context(ExitStack())  # entered first, so closed after the connections
    uri = f"file:{quote(database)}"
    try:
        db_fd = _open_raw(raw, database)
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        stack.callback(conn.close)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # creates -wal/-shm if needed
        for _ in range(3):
            wal = _is_wal(db_fd)
            image = _pin_wal(database, uri, conn, db_fd, raw) if wal else _pin_rollback(conn, db_fd)
            if _is_wal(db_fd) == wal:
                return image
            conn.execute("ROLLBACK")  # the journal mode changed while pinning: again
        raise CaptureError("the journal mode keeps changing")
    except sqlite3.Error as exc:
        raise CaptureError(_explain(exc, database)) from exc
    except OSError as exc:
        raise CaptureError(f"{exc.strerror or exc}") from exc


def _explain(exc: sqlite3.Error, database: str) -> str:
    journal = database + "-journal"
    if "readonly" in str(exc) and os.path.exists(journal) and os.path.getsize(journal) > 0:
        return (f"{exc}: a hot journal ({os.path.basename(journal)}) needs recovery by a writer; "
                f"start club once so that it rolls the interrupted transaction back")
    if "readonly" in str(exc) and not os.access(database, os.W_OK):
        return (f"{exc}: commits kept landing while the read transaction was pinned, and sealing it (a "
                f"sub-millisecond write lock) needs write access, which a read-only mount does not give")
    if "unable to open" in str(exc) and _wal_without_index_read_only(database):
        # SQLite reads a WAL database only through its -shm index, which it cannot create
        # on a read-only mount. Without one, a non-empty -wal is a crashed club's.
        return (f"{exc}: its -wal holds transactions but there is no -shm index, and a read-only mount "
                f"cannot rebuild it (club crashed?): start club once, or mount the data dir read-write")
    return str(exc)


def _wal_file(database: str) -> bool:
    try:
        with open(database, "rb") as handle:
            return handle.read(100)[JOURNAL_MODE_BYTES] == b"\x02\x02"
    except OSError:
        return False


def _open_raw(stack: ExitStack, path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    stack.callback(os.close, fd)
    return fd


def _is_wal(db_fd: int) -> bool:
    return os.pread(db_fd, 100, 0)[JOURNAL_MODE_BYTES] == b"\x02\x02"


def _pin_rollback(conn: sqlite3.Connection, db_fd: int) -> PinnedImage:
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # SHARED lock from here on
    info = {"method": "page-read", "journal_mode": "rollback", **_describe(conn)}
    st = os.fstat(db_fd)
    return PinnedImage(conn, info["page_size"], info["page_count"], info, db_fd, None,
                       _fingerprint(st, info, b"rollback"), st.st_ctime_ns)


def _pin_wal(database: str, uri: str, conn: sqlite3.Connection, db_fd: int, raw: ExitStack) -> PinnedImage:
    try:
        shm_fd = _open_raw(raw, database + "-shm")
        wal_fd = _open_raw(raw, database + "-wal")
    except OSError as exc:
        raise CaptureError(f"cannot read the WAL index ({exc.strerror})") from exc
    started = time.monotonic()
    pinned, seal_ms = None, None
    for attempt in range(OPTIMISTIC_TRIES):
        pinned = _try_pin(conn, shm_fd)
        if pinned:
            break
        time.sleep(BACKOFF_S * attempt)  # let a burst of commits pass
    if not pinned:
        pinned, seal_ms = _sealed_pin(uri, conn, shm_fd)
    header, backfilled = pinned
    max_frame, salt = header[6], header[9]
    info = {"method": "page-read", "journal_mode": "wal", **_describe(conn)}
    # Frames above the checkpoint mark are needed; frames at or below it are in the file.
    wal = (_WalOverlay(wal_fd, salt, _wal_frames(wal_fd, max_frame, info["page_size"], salt))
           if backfilled < max_frame else None)
    info |= {"wal_frames": max_frame, "wal_frames_checkpointed": min(backfilled, max_frame),
             "wal_bytes": os.fstat(wal_fd).st_size, "pin_ms": round((time.monotonic() - started) * 1000, 3),
             "sealed": seal_ms is not None, **({"seal_ms": seal_ms} if seal_ms is not None else {})}
    st = os.fstat(db_fd)
    # An empty WAL adds nothing to the image: then only the file counts (a WAL recreated
    # when club is stopped gets a new salt every time).
    wal_state = salt + struct.pack("<I", max_frame) + header[8] if max_frame else b"empty"
    return PinnedImage(conn, info["page_size"], info["page_count"], info, db_fd, wal,
                       _fingerprint(st, info, wal_state), st.st_ctime_ns)


def _sealed_pin(uri: str, conn: sqlite3.Connection, shm_fd: int) -> tuple[tuple[tuple[Any, ...], int], float]:
    """Pin while our own ``BEGIN IMMEDIATE`` keeps commits out, for well under a ms.
    Waiting for that lock costs club nothing; holding it, our reader waits at most
    ``SEALED_BUSY_TIMEOUT_MS``, far inside club's busy_timeout (5 s)."""
    try:
        seal = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise CaptureError(f"club committed between every attempt to pin, and the database cannot be "
                           f"opened for writing to seal it ({exc})") from exc
    try:
        seal.execute("BEGIN IMMEDIATE")
        held = time.monotonic()
        conn.execute(f"PRAGMA busy_timeout={SEALED_BUSY_TIMEOUT_MS}")
        try:
            pinned = _try_pin(conn, shm_fd)
        finally:
            seal.execute("ROLLBACK")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        seal_ms = round((time.monotonic() - held) * 1000, 3)
    finally:
        seal.close()  # while our reader is open, closing cannot checkpoint or remove the WAL
    if not pinned:
        raise CaptureError("the WAL index changed under a sealed read (is another program writing it?)")
    return pinned, seal_ms


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


def _fingerprint(st: os.stat_result, info: dict[str, Any], journal_state: bytes) -> str:
    facts = struct.pack("<QqqqII", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                        info["page_size"], info["page_count"]) + journal_state
    return digest(facts).hex()


def _describe(conn: sqlite3.Connection) -> dict[str, Any]:
    """What a snapshot records of the image, read on the pinned connection."""
    def pragma(name: str) -> int:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])

    return {"page_size": pragma("page_size"), "page_count": pragma("page_count"),
            "freelist_count": pragma("freelist_count"), "user_version": pragma("user_version"),
            "schema_version": pragma("schema_version"), "sqlite_version": sqlite3.sqlite_version}
