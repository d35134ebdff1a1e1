"""The local catalog: a SQLite cache of what the repository holds.

It mirrors index objects (where every blob lives), snapshot records, and keeps the files
cache (path, size, mtime, ctime, inode -> chunk ids) that lets a snapshot skip unchanged
files without reading them. Everything except the files cache can be rebuilt from the
repository at any time; losing the files cache only costs one full read of the data dir.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import EngineError, StorageFull
from .format import BlobType, ChunkId, PackId, pack_record, unpack_record
from .packs import BlobEntry

# 2: files.etag (bucket sources), the tree cache; 3: snapshots.sealed; 4: garbage records;
# 5: damage records
SCHEMA_VERSION = 5
LOOKUP_BATCH = 500  # ids per SELECT … IN (…)


# A blob's location counts as stored unless a damage record names it (format §6.14).
_INTACT = "NOT EXISTS (SELECT 1 FROM damaged d WHERE d.id = blobs.id AND d.pack = blobs.pack)"
# An index entry takes the place of one the catalog holds only where that one is damaged
# and the new one is not: a snapshot that stored a damaged blob again heals it for readers.
_REPLACE_DAMAGED = (
    "ON CONFLICT (id) DO UPDATE SET type = excluded.type, pack = excluded.pack, offset = excluded.offset, "
    "length = excluded.length, raw_length = excluded.raw_length WHERE " + _INTACT.replace("NOT EXISTS", "EXISTS")
    + " AND NOT EXISTS (SELECT 1 FROM damaged d WHERE d.id = excluded.id AND d.pack = excluded.pack)")


@dataclass(frozen=True)
class CachedFile:
    """What the files cache remembers of one file as it was last snapshotted."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    chunks: list[ChunkId]
    etag: str | None = None  # a bucket object's ETag (size and ETag decide "unchanged" there)


class Catalog:
    """Thread-safe wrapper over one SQLite connection (snapshot workers share it)."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the catalog at ``path``, normally ``<cache root>/<repository
        id>/catalog.db``. It holds decrypted paths and package names, so the cache root and
        the catalog dir are made 0700 and the database 0600, or tightened to that when
        found looser. The database file is made before SQLite opens it: SQLite creates
        ``-wal`` and ``-shm`` with the database's mode, so they are 0600 too."""
        self.path = path
        self._lock = threading.RLock()
        if path in _OPENED:
            _OPENED.remove(path)
        _OPENED.append(path)  # for catalog_error(): a failure after open names this one
        try:
            _private_dir(path.parent.parent)
            _private_dir(path.parent)
            _private_files(path)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
            self._create_schema()
        except (OSError, sqlite3.Error) as exc:
            raise catalog_error(exc, path, opening=True) from exc

    def _create_schema(self) -> None:
        """Create or upgrade the tables, in one transaction (SQLite DDL is transactional)
        that re-reads the version under its write lock: a process stopped halfway leaves
        the old version whole, and two processes opening an old catalog at once (cron's
        snapshot and ``run``) upgrade it once, not twice."""
        with self._lock:
            if self._schema_version() == str(SCHEMA_VERSION):
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._schema_version()
                if version in ("1", "2", "3", "4"):  # keep the files cache: losing it costs a full read
                    self._upgrade(version)
                elif version != str(SCHEMA_VERSION):
                    self._create_tables()
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back by itself (I/O error)
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _upgrade(self, version: str) -> None:
        if version == "1":
            self._conn.execute("ALTER TABLE files ADD COLUMN etag TEXT")
            self._conn.execute("CREATE TABLE trees (id BLOB PRIMARY KEY, stored BLOB)")
        if version in ("1", "2"):
            self._conn.execute("ALTER TABLE snapshots ADD COLUMN sealed BLOB")
        self._create_garbage_tables()
        self._create_damage_tables()
        self.set_meta("schema", str(SCHEMA_VERSION))

    def _create_tables(self) -> None:
        # Imported here only: sqlite-utils takes ~0.15 s to import, which every run (and
        # frequent snapshots run every few minutes) would pay for a schema made once.
        # Version 4 or later: 3.x commits inside create(), ending our transaction.
        import sqlite_utils

        db = sqlite_utils.Database(self._conn)
        for table in db.table_names():
            db.table(table).drop()
        db.table("meta").create({"key": str, "value": str}, pk="key")
        db.table("index_objects").create({"name": str}, pk="name")
        db.table("packs").create({"id": bytes, "size": int}, pk="id")
        db.table("blobs").create({"id": bytes, "type": int, "pack": bytes, "offset": int,
                                  "length": int, "raw_length": int}, pk="id")
        db.table("snapshots").create({"key": str, "id": bytes, "time_us": int, "record": bytes, "sealed": bytes},
                                     pk="key")
        db.table("trees").create({"id": bytes, "stored": bytes}, pk="id")
        db.table("files").create({"source": str, "path": bytes, "size": int, "mtime_ns": int,
                                  "ctime_ns": int, "inode": int, "chunks": bytes, "etag": str},
                                 pk=("source", "path"))
        self._create_garbage_tables()
        self._create_damage_tables()
        self.set_meta("schema", str(SCHEMA_VERSION))

    def _create_garbage_tables(self) -> None:
        """Packs a prune condemned (docs/format.md §10): readers may still need their
        blobs, writers must not count on them. And the index by pack, which prune and tree
        reads query."""
        statements = """
            CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack);
            CREATE TABLE IF NOT EXISTS garbage_objects (name TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS condemned_packs (id BLOB, size INTEGER, garbage TEXT,
                                                        PRIMARY KEY (id, garbage));
            CREATE TABLE IF NOT EXISTS condemned_blobs (id BLOB, type INTEGER, pack BLOB, offset INTEGER,
                                                        length INTEGER, raw_length INTEGER, PRIMARY KEY (id, pack));
            CREATE INDEX IF NOT EXISTS condemned_by_pack ON condemned_blobs (pack);
            CREATE TABLE IF NOT EXISTS listing (name TEXT PRIMARY KEY);
        """
        for statement in statements.split(";"):  # not executescript: it would commit a migration's transaction
            if statement.strip():
                self._conn.execute(statement)

    def _create_damage_tables(self) -> None:
        """Blobs known damaged where they are (docs/format.md §6.14): a location listed
        here does not count as stored, so the next snapshot stores the blob again."""
        statements = """
            CREATE TABLE IF NOT EXISTS damage_objects (name TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS damaged_packs (pack BLOB, record TEXT, missing INTEGER,
                                                      PRIMARY KEY (pack, record));
            CREATE TABLE IF NOT EXISTS damaged (id BLOB, pack BLOB, record TEXT, PRIMARY KEY (id, pack, record));
        """
        for statement in statements.split(";"):
            if statement.strip():
                self._conn.execute(statement)

    def _schema_version(self) -> str | None:
        try:
            return self.meta("schema")
        except sqlite3.OperationalError:
            return None  # a new catalog: no meta table yet

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    # ---- index --------------------------------------------------------------------------

    def index_object_names(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT name FROM index_objects")}

    # A process that listed index/, then was slow to read an object, must not add it
    # after another process found it deleted (a prune replaced it): snapshots that synced
    # in between would then dedup against condemned packs. So the newest listing of any
    # process sharing the catalog is kept (``listing`` table, ``listing_seq``), and an
    # object listed by an older listing is added only if the newest one still has it.

    def record_listing(self, names: set[str]) -> tuple[int, bool]:
        """Record ``names`` as the newest listing of index/; returns its sequence number,
        and whether the index was cleared: index objects the catalog holds that the
        listing lacks were deleted (by a prune), so it starts again, in the same
        transaction."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            seq = self._next_listing(names)
            held = {row[0] for row in self._conn.execute("SELECT name FROM index_objects")}
            if held - names:
                self._clear_index()
            return seq, bool(held - names)

    def _next_listing(self, names: Iterable[str]) -> int:
        seq = int(self.meta("listing_seq") or 0) + 1
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('listing_seq', ?)", [str(seq)])
        self._conn.execute("DELETE FROM listing")
        self._conn.executemany("INSERT INTO listing VALUES (?)", [(n,) for n in names])
        return seq

    def add_index(self, name: str, packs: dict[PackId, int], entries: Iterable[BlobEntry],
                  listing: int | None = None) -> bool:
        """Record one index object's content; one transaction, so a crash leaves none of it.
        With ``listing`` (the sequence number of the listing that named it), nothing is
        added (False) if a newer listing lacks it: it has been deleted since."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            if listing is not None and int(self.meta("listing_seq") or 0) != listing and not self._conn.execute(
                    "SELECT 1 FROM listing WHERE name = ?", [name]).fetchone():
                return False
            self._conn.executemany("INSERT OR REPLACE INTO packs VALUES (?, ?)",
                                      [(bytes(p), s) for p, s in packs.items()])
            self._conn.executemany(
                f"INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?) {_REPLACE_DAMAGED}",
                [(bytes(e.id), int(e.type), bytes(e.pack), e.offset, e.length, e.raw_length) for e in entries])
            self._conn.execute("INSERT OR IGNORE INTO index_objects VALUES (?)", [name])
        return True

    def clear_index(self) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._clear_index()
            self._next_listing(())  # and no slow reader adds what it had read before

    def _clear_index(self) -> None:
        for table in ("index_objects", "packs", "blobs", "garbage_objects", "condemned_packs", "condemned_blobs",
                      "damage_objects", "damaged_packs", "damaged"):
            self._conn.execute(f"DELETE FROM {table}")

    def copy_index(self, blobs_table: str, packs_table: str) -> set[str]:
        """Copy the index (blobs, packs) into the given temporary tables in one read, and
        return the index objects it holds: prune works on this copy, which no other
        process sharing the catalog can clear or half-reload under it."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            for table, source in ((blobs_table, "blobs"), (packs_table, "packs")):
                self._conn.execute(f"DROP TABLE IF EXISTS {table}")
                self._conn.execute(f"CREATE TEMP TABLE {table.split('.')[-1]} AS SELECT * FROM {source}")
            return {row[0] for row in self._conn.execute("SELECT name FROM index_objects")}

    def replace_index(self, names: list[str], blobs_query: str, packs_query: str) -> None:
        """After a prune: the index becomes exactly what the queries give (rows of
        ``blobs`` and ``packs``), named by ``names``; one transaction, so another process
        sharing the catalog sees the old index or the new one; the new index objects become
        the newest listing, so that none adds what it read of the old ones."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for table in ("blobs", "packs", "index_objects"):
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute(f"INSERT OR IGNORE INTO blobs {blobs_query}")
            self._conn.execute(f"INSERT OR REPLACE INTO packs {packs_query}")
            self._conn.executemany("INSERT INTO index_objects VALUES (?)", [(n,) for n in names])
            self._conn.execute("DELETE FROM trees WHERE id NOT IN (SELECT id FROM blobs)")
            self._next_listing(names)

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """A query for prune's temporary tables (its working set lives on disk, not in memory)."""
        with self._lock:
            return self._conn.execute(sql, list(params)).fetchall()

    def executemany(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(sql, rows)

    def iterate(self, sql: str, params: Iterable[Any] = ()) -> Iterable[tuple[Any, ...]]:
        """Rows of a query, fetched in batches: for results too large to hold at once."""
        with self._lock:
            cursor = self._conn.execute(sql, list(params))
        while True:
            with self._lock:
                rows = cursor.fetchmany(10_000)
            if not rows:
                return
            yield from rows

    # ---- garbage records: condemned packs awaiting deletion (docs/format.md §10) ---------

    def garbage_names(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT name FROM garbage_objects")}

    def add_garbage(self, name: str, packs: dict[PackId, int], entries: Iterable[BlobEntry]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR IGNORE INTO condemned_packs VALUES (?, ?, ?)",
                                   [(bytes(p), s, name) for p, s in packs.items()])
            self._conn.executemany(
                "INSERT OR IGNORE INTO condemned_blobs VALUES (?, ?, ?, ?, ?, ?)",
                [(bytes(e.id), int(e.type), bytes(e.pack), e.offset, e.length, e.raw_length) for e in entries])
            self._conn.execute("INSERT OR IGNORE INTO garbage_objects VALUES (?)", [name])

    def remove_garbage(self, names: Iterable[str]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            for name in names:  # a pack two records name keeps its blobs until both are gone
                self._conn.execute("DELETE FROM condemned_packs WHERE garbage=?", [name])
                self._conn.execute("DELETE FROM garbage_objects WHERE name=?", [name])
            self._conn.execute("DELETE FROM condemned_blobs WHERE pack NOT IN (SELECT id FROM condemned_packs)")

    def condemned_packs(self) -> dict[PackId, int]:
        """Packs some garbage record condemns, with their sizes."""
        with self._lock:
            return {PackId(row[0]): row[1] for row in self._conn.execute("SELECT id, size FROM condemned_packs")}

    def lookup_condemned_many(self, ids: list[ChunkId]) -> dict[ChunkId, BlobEntry]:
        return self._lookup_many("condemned_blobs", ids)

    def lookup(self, blob_id: bytes) -> BlobEntry | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT type, pack, offset, length, raw_length FROM blobs WHERE id=?", [blob_id]).fetchone()
        if row is None:
            return None
        return BlobEntry(ChunkId(blob_id), BlobType(row[0]), PackId(row[1]), row[2], row[3], row[4])

    def lookup_many(self, ids: list[ChunkId]) -> dict[ChunkId, BlobEntry]:
        """``lookup`` for many ids, a query per ``LOOKUP_BATCH``; absent ids are left out."""
        return self._lookup_many("blobs", ids)

    def _lookup_many(self, table: str, ids: list[ChunkId]) -> dict[ChunkId, BlobEntry]:
        found: dict[ChunkId, BlobEntry] = {}
        with self._lock:
            for start in range(0, len(ids), LOOKUP_BATCH):
                batch = ids[start:start + LOOKUP_BATCH]
                for row in self._conn.execute(
                        f"SELECT id, type, pack, offset, length, raw_length FROM {table} "
                        f"WHERE id IN ({','.join('?' * len(batch))})", batch):
                    blob_id = ChunkId(row[0])
                    found[blob_id] = BlobEntry(blob_id, BlobType(row[1]), PackId(row[2]), row[3], row[4], row[5])
        return found

    def has_blob(self, blob_id: bytes) -> bool:
        """Whether the index places the blob somewhere not known damaged."""
        with self._lock:
            return self._conn.execute(f"SELECT 1 FROM blobs WHERE id=? AND {_INTACT}", [blob_id]).fetchone() is not None

    def which_exist(self, ids: list[ChunkId]) -> set[bytes]:
        """The ids among ``ids`` stored intact as far as is known (``has_blob`` for many)."""
        found: set[bytes] = set()
        with self._lock:
            for start in range(0, len(ids), LOOKUP_BATCH):
                batch = ids[start:start + LOOKUP_BATCH]
                found.update(row[0] for row in self._conn.execute(
                    f"SELECT id FROM blobs WHERE id IN ({','.join('?' * len(batch))}) AND {_INTACT}", batch))
        return found

    # ---- damage records (docs/format.md §6.14) -----------------------------------------

    def damage_names(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT name FROM damage_objects")}

    def add_damage(self, name: str, packs: dict[PackId, tuple[list[ChunkId], bool]]) -> bool:
        """Record one damage record: per pack, its damaged blobs and whether it is missing.
        The index keeps one place per blob: when it places one where this record says it
        is damaged, an intact copy elsewhere may have been passed over when the index was
        loaded, so the index is cleared, to be loaded again with the damage known (True)."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR IGNORE INTO damaged_packs VALUES (?, ?, ?)",
                                   [(bytes(p), name, int(missing)) for p, (_, missing) in packs.items()])
            self._conn.executemany("INSERT OR IGNORE INTO damaged VALUES (?, ?, ?)",
                                   [(bytes(b), bytes(p), name) for p, (blobs, _) in packs.items() for b in blobs])
            self._conn.execute("INSERT OR IGNORE INTO damage_objects VALUES (?)", [name])
            hit = self._conn.execute("SELECT 1 FROM blobs b JOIN damaged d ON d.id = b.id AND d.pack = b.pack "
                                     "WHERE d.record = ? LIMIT 1", [name]).fetchone()
            if hit:
                for table in ("index_objects", "packs", "blobs"):
                    self._conn.execute(f"DELETE FROM {table}")
            return hit is not None

    def remove_damage(self, names: Iterable[str]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            for name in names:
                for table, column in (("damaged", "record"), ("damaged_packs", "record"), ("damage_objects", "name")):
                    self._conn.execute(f"DELETE FROM {table} WHERE {column}=?", [name])

    def damaged_packs(self) -> dict[PackId, bool]:
        """Packs some damage record names, and whether one says the pack is missing."""
        with self._lock:
            return {PackId(row[0]): bool(row[1]) for row in self._conn.execute(
                "SELECT pack, MAX(missing) FROM damaged_packs GROUP BY pack")}

    def damage_by_record(self) -> dict[str, set[PackId]]:
        """The packs each damage record names."""
        found: dict[str, set[PackId]] = {name: set() for name in self.damage_names()}
        with self._lock:
            for pack, name in self._conn.execute("SELECT pack, record FROM damaged_packs"):
                found.setdefault(name, set()).add(PackId(pack))
        return found

    def damage_known(self, blob_id: bytes, pack: bytes) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM damaged WHERE id=? AND pack=?",
                                      [blob_id, pack]).fetchone() is not None

    def unhealed_blobs(self) -> int:
        """Damaged blobs the index still places only where they are damaged."""
        with self._lock:
            row = self._conn.execute("SELECT COUNT(DISTINCT b.id) FROM blobs b JOIN damaged d "
                                     "ON d.id = b.id AND d.pack = b.pack").fetchone()
        return int(row[0])

    def packs(self) -> dict[PackId, int]:
        with self._lock:
            return {PackId(row[0]): row[1] for row in self._conn.execute("SELECT id, size FROM packs")}

    def blobs_in_pack(self, pack: PackId) -> list[BlobEntry]:
        """The blobs the index (or a garbage record, for a condemned pack) places in ``pack``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, type, offset, length, raw_length FROM blobs WHERE pack=? UNION "
                "SELECT id, type, offset, length, raw_length FROM condemned_blobs WHERE pack=?",
                [bytes(pack), bytes(pack)]).fetchall()
        return [BlobEntry(ChunkId(r[0]), BlobType(r[1]), pack, r[2], r[3], r[4]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length),0), COALESCE(SUM(raw_length),0) FROM blobs").fetchone()
            packs = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(size),0) FROM packs").fetchone()
        return {"blobs": row[0], "stored_bytes": row[1], "raw_bytes": row[2],
                "packs": packs[0], "pack_bytes": packs[1]}

    # ---- tree cache: tree and page-map blobs as stored, so walking a snapshot costs no
    # request (each tree is a ranged GET otherwise, thousands per restore on S3)

    def cached_tree(self, blob_id: bytes) -> bytes | None:
        with self._lock:
            row = self._conn.execute("SELECT stored FROM trees WHERE id=?", [blob_id]).fetchone()
        return None if row is None else bytes(row[0])

    def cache_trees(self, blobs: Iterable[tuple[bytes, bytes]]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO trees VALUES (?, ?)", blobs)

    # ---- snapshots ---------------------------------------------------------------------

    def snapshot_keys(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT key FROM snapshots")}

    def add_snapshot(self, key: str, snap_id: bytes, time_us: int, record: dict[str, Any], sealed: bytes) -> None:
        """``sealed`` is the record as stored (a summary copies it byte for byte)."""
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)",
                                  [key, snap_id, time_us, pack_record(record), sealed])

    def snapshot_sealed(self, key: str) -> bytes | None:
        with self._lock:
            row = self._conn.execute("SELECT sealed FROM snapshots WHERE key=?", [key]).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def remove_snapshots(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._conn.executemany("DELETE FROM snapshots WHERE key=?", [(k,) for k in keys])

    def snapshot_record(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT record FROM snapshots WHERE key=?", [key]).fetchone()
        return None if row is None else dict(unpack_record(row[0], f"catalog record {key}"))

    # ---- files cache -------------------------------------------------------------------

    def load_files(self, source: str) -> dict[bytes, CachedFile]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, chunks, etag FROM files WHERE source=?", [source])
            return {row[0]: CachedFile(row[1], row[2], row[3], row[4],
                                       [ChunkId(c) for c in unpack_record(row[5], "files cache")], row[6])
                    for row in rows}

    def update_files(self, source: str, changed: dict[bytes, CachedFile], gone: Iterable[bytes]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM files WHERE source=? AND path=?",
                                      [(source, path) for path in gone])
            self._conn.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(source, path, f.size, f.mtime_ns, f.ctime_ns, f.inode,
                  pack_record([bytes(c) for c in f.chunks]), f.etag) for path, f in changed.items()])


# ---- failures and file modes of the catalog (used by __init__ and by the CLI) ------------------

_OPENED: list[Path] = []  # catalogs this process opened, newest last
NEARLY_FULL_BYTES = 1 << 20  # less free than this under a catalog: its I/O error is no space
SQLITE_IOERR, SQLITE_FULL = 10, 13  # primary result codes (an extended code's low byte)


def catalog_error(exc: sqlite3.Error | OSError, path: Path | None = None, *, opening: bool = False) -> EngineError:
    """The one engine error for a failure of the local catalog, at open or at any later
    read or write (the CLI passes the ``sqlite3.Error`` that reached it; ``path`` None
    means the catalogs this process opened). No space is ``StorageFull`` (exit 17), like
    any full disk: SQLite says "database or disk is full", or only "disk I/O error" (a
    failed ``-shm`` resize, fsync or journal write), which is taken for no space when the
    catalog's file system has (almost) nothing left. Anything else is exit 1, pointing
    at ``--cache-dir``: the catalog is a cache, one elsewhere is rebuilt."""
    candidates = [path] if path is not None else list(reversed(_OPENED))
    full = next((p for p in candidates if _out_of_space(p)), None)
    if _says_full(exc) or (_says_io_error(exc) and full is not None):
        where = full or (candidates[0] if candidates else None)
        shown = f"local catalog {where}" if where is not None else "local catalog"
        return StorageFull(f"{shown}: no space left on device (free space or use --cache-dir elsewhere)")
    if opening:
        return EngineError(f"local catalog {path} is unusable ({exc}); "
                           f"choose another with --cache-dir or CLUBSNAP_CACHE_DIR")
    shown = f"local catalog {candidates[0]}" if candidates else "local catalog"
    return EngineError(f"{shown}: {exc} (it is a cache: --cache-dir elsewhere works)")


def _says_full(exc: sqlite3.Error | OSError) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == SQLITE_FULL) or "database or disk is full" in str(exc)


def _says_io_error(exc: sqlite3.Error | OSError) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.EIO
    code = getattr(exc, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == SQLITE_IOERR) or "disk I/O error" in str(exc)


def _out_of_space(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has less
    than NEARLY_FULL_BYTES, or no inode, left for this user (root may use the reserve)."""
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        fs = os.statvfs(where)
    except OSError:
        return False
    blocks, inodes = (fs.f_bfree, fs.f_ffree) if os.geteuid() == 0 else (fs.f_bavail, fs.f_favail)
    return blocks * fs.f_frsize < NEARLY_FULL_BYTES or (fs.f_files > 0 and inodes == 0)


def _private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or take group and other bits off an existing one that is
    ours. A shared sticky directory (``--cache-dir /tmp``) is left as it is."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = directory.stat()
    if status.st_uid == os.geteuid() and not status.st_mode & stat.S_ISVTX:
        _tighten(directory, status, 0o700)


def _private_files(path: Path) -> None:
    """The database created empty 0600 if absent (SQLite takes an empty file for a new
    database), and it, its ``-wal`` and its ``-shm`` made 0600 if looser."""
    if not path.exists():  # not opened for writing otherwise: a read-only mount may hold it
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # another process made it meanwhile; tightened below
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            status = name.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid():
            _tighten(name, status, 0o600)


def _tighten(path: Path, status: os.stat_result, mode: int) -> None:
    """Best effort: a catalog whose mode cannot change (a read-only mount) still works."""
    current = stat.S_IMODE(status.st_mode)
    if current & ~mode:
        try:
            os.chmod(path, current & mode)
        except OSError:
            pass
