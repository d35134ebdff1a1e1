"""create_snapshot(): data dir -> chunks -> packs -> index -> trees -> snapshot record, last.

Order matters for consistency (engine/consistency.py, docs/format.md §6.6): the blobs are
scanned and stored first, then the databases are pinned (the snapshot's time), then the
blobs the pinned club.db names but the scan missed get a second look on disk, the
databases are pinned again while club is deleting what a pin names, and only then are
the pinned pages read. That order holds whichever way a writer orders rows and blobs:
club's (row, then blobs; blobs, then row) and the reverse. A named blob still missing
that the live database still names is lost: carried forward from the parent snapshot
when it has a copy, and always reported. A database capture that looks wrong (not
SQLite, or failing quick_check) is kept and flagged, never silently.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from .catalog import CachedFile
from .chunker import CDC, chunk_stream
from .clubcheck import Expected, expected_blobs
from .consistency import CLUB_DB, MAX_LISTED, Cut, blob_path, consistent_cut, live_names, unmatched
from .errors import EngineError, IntegrityError, SourceError
from .format import ID_SIZE, BlobType, ChunkId, display
from .locks import Lock
from .repository import Repository, SnapshotInfo, WriteStats
from .backends.s3 import ObjectInfo, S3Backend
from .errors import ObjectNotFound
from .sources import bucket
from .sources import sqlite as sqlite_source
from .sources.files import Item, Scan, scan_tier, tiers_for
from .pagemap import changed_pages, load_page_ids, map_blobs, store_page_map
from .tree import Entry, lookup, store_tree

# A file whose ctime is this close to the scan start may still be changing within one
# tick of the kernel's coarse file clock; it is snapshotted but not trusted by the cache.
RACY_WINDOW_NS = 50_000_000
PAGE_BATCH = 256  # database pages per index lookup
# The second look (engine/consistency.py): a blob the pin names is looked for again for at
# most this long (club writes a publish's row first, its tarball just after), and the
# databases pinned again at most so many times while club deletes what a pin names.
SECOND_LOOK_S = 2.0
SECOND_LOOK_PAUSE_S = 0.02
MAX_PINS = 4
# The capture facts a tree entry keeps (the record's `databases` keeps them all).
ENTRY_SQLITE_FIELDS = ("method", "journal_mode", "page_size", "page_count", "user_version", "schema_version")


@dataclass(frozen=True)
class Progress:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


@dataclass
class SnapshotOptions:
    source: Path
    host: str
    now: Callable[[], datetime]
    tags: list[str] = field(default_factory=list)
    include_logs: bool = False
    workers: int = 3
    progress: Callable[[Progress], None] | None = None
    verify: bool = False  # check the blobs the database names against the snapshot (no reads)
    blob_store: S3Backend | None = None  # club's blobs live in this bucket, not in blobs/


@dataclass
class SourceStats:
    files: int = 0
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class SnapshotResult:
    info: SnapshotInfo
    stats: dict[str, Any]
    errors: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.errors)


def create_snapshot(repo: Repository, options: SnapshotOptions) -> SnapshotResult:
    """Take a snapshot under a snapshot lock, reading (and deduplicating against) live
    blobs only: a blob in a pack a prune condemned may be deleted before this snapshot
    is saved (docs/format.md §10)."""
    with repo.lock("snapshot") as lock:
        repo.read_condemned, repo.held_lock = False, lock
        try:
            repo.start_session()
            return _create(repo, options, lock)
        except BaseException:
            repo.discard_unwritten()
            raise
        finally:
            repo.read_condemned, repo.held_lock = True, None


def _create(repo: Repository, options: SnapshotOptions, lock: Lock) -> SnapshotResult:
    root = _check_source(options.source, bucket=options.blob_store is not None)
    written_before = replace(repo.stats)
    requests_before = repo.backend.snapshot()
    repo.sync_index()
    source_key = display(root)
    cache = repo.catalog.load_files(source_key)
    builder = _SnapshotBuilder(repo, options, cache)
    parent = _parent(repo, source_key, options.host)
    # The consistent cut (engine/consistency.py): every blob is scanned and stored before
    # the databases are pinned; the pin is the snapshot's time.
    scan = Scan()
    store = options.blob_store
    for tier in tiers_for(options.include_logs):
        if not (tier == "blobs" and store):
            scan_tier(root, tier, scan)
    listing = bucket.list_blob_store(store) if store else bucket.BucketListing()
    scan.errors += listing.errors
    builder.files_total = len(scan.files) + len(scan.databases) + len(listing.objects)
    builder.check_unsniffed(scan)
    entries = builder.read_files(scan)
    if store:
        entries.update(builder.read_bucket(store, listing))
    look = _Look(root, scan, listing, store, entries, parent)
    start, captured = _pin_and_look(builder, scan, parent, look)
    entries.update(captured)
    expected = builder.expected
    missing = unmatched(expected, entries) if expected is not None else []
    still_named = live_names(os.fsdecode(os.path.join(root, CLUB_DB)), missing) if missing else {}
    cut = consistent_cut(repo, expected, entries, still_named, parent, verify=options.verify)
    builder.report_lost(cut, parent)
    entries.update(cut.carried)
    tree = _build_trees(repo, scan.items, entries, cut.dirs | listing.dirs)
    repo.flush()  # every pack and index durable, and counted, before the record is written
    written = repo.stats.since(written_before)
    requests = _requests_since(repo, requests_before)
    record = _snapshot_record(options, source_key, start, tree, builder, scan, parent, written, cut,
                              {"requests": requests, **({"blobs_requests": store.request_counts()} if store else {})})
    lock.ensure_held()  # a prune that took this run for dead may have deleted what it uses
    info = repo.save_snapshot(record, start)
    repo.catalog.update_files(source_key, builder.cache_updates, set(cache) - builder.seen)
    if store:
        builder.bucket_cache.save(repo)
    return SnapshotResult(info, record["stats"], scan.errors + builder.errors, builder.warnings)


def _pin_and_look(builder: _SnapshotBuilder, scan: Scan, parent: SnapshotInfo | None,
                  look: _Look) -> tuple[datetime, dict[bytes, Entry]]:
    """Pin the databases, take the second look, and read the pinned pages; pin again
    (at most ``MAX_PINS`` times) while club is deleting a blob the pin still names. The
    pins are held for the second look and the page reads only: a held read transaction
    holds club's checkpoints back (SQLITE_NOTES §3.4)."""
    for attempt in range(1, MAX_PINS + 1):
        with ExitStack() as pins:
            mark = builder.mark()
            start = builder.options.now()
            captures = builder.pin_databases(scan, parent, pins)
            racing = builder.second_look(look) if builder.expected is not None else []
            if racing and attempt < MAX_PINS:
                builder.rewind(mark)
                continue  # leaving the block ends every read transaction
            builder.pins = attempt
            return start, builder.read_databases(captures)  # each read transaction ends once read
    raise AssertionError("unreachable")


def _check_source(source: Path, bucket: bool) -> bytes:
    root = os.fsencode(source.absolute())
    if not os.path.isdir(root):
        raise SourceError(f"data directory {source} does not exist or is not a directory")
    if bucket and not os.path.isdir(os.path.join(root, b"db")):
        raise SourceError(f"{source} has no db/ directory (with --blobs, the data dir holds the database)")
    if not any(os.path.isdir(os.path.join(root, t.encode())) for t in ("db", "blobs")):
        raise SourceError(f"{source} does not look like a club data directory (no db/ or blobs/)")
    return root


class _SnapshotBuilder:
    """Turns scanned items into tree entries, storing new chunks on the way."""

    def __init__(self, repo: Repository, options: SnapshotOptions, cache: dict[bytes, CachedFile]) -> None:
        self.repo = repo
        self.options = options
        self.cache = cache
        # The racy-file guard compares with the file system's clock, not the snapshot's.
        self.scan_start_ns = time.time_ns()
        self.began = options.now()  # the run's start; the snapshot's time is the later pin
        self.stats = SourceStats()
        self.errors: list[str] = []    # what the snapshot lacks: it is partial
        self.warnings: list[str] = []  # worth saying, but the snapshot is complete
        self.vanished: list[bytes] = []  # listed, then deleted before it was read
        self.databases: list[dict[str, Any]] = []
        self.suspect: list[bytes] = []  # databases whose capture looks wrong
        self.expected: list[Expected] | None = None  # blobs the captured club.db names
        self.pins = 0           # times the databases were pinned (more: club deleted what a pin named)
        self.looked_again = 0   # named blobs the scan missed (or had at another size), read after it
        self.cache_updates: dict[bytes, CachedFile] = {}
        self.seen: set[bytes] = set()
        self.bucket_cache = _BucketCache("", {})
        self._bytes_done = 0
        self._files_done = 0
        self._count_lock = threading.Lock()
        self.files_total = 0

    def mark(self) -> tuple[int, int]:
        return len(self.errors), len(self.warnings)

    def rewind(self, mark: tuple[int, int]) -> None:
        """Forget what a released pin said: the next pin says it again, as of its commit."""
        del self.errors[mark[0]:], self.warnings[mark[1]:]
        self.expected = None

    def check_unsniffed(self, scan: Scan) -> None:
        """A ``db/club.db`` without SQLite's header is kept (as a plain file: it is all
        there is) but never silently: zeroed or foreign bytes there mean club's database
        is damaged or replaced, and a backup of it restores nothing club can open."""
        for item in scan.items:
            if item.rel == CLUB_DB and item.kind == "file":
                reason = _header_problem(item.path)
                self.suspect.append(item.rel)
                self.warnings.append(f"{display(item.rel)}: suspect: {reason}; stored as a plain file")

    def second_look(self, look: _Look) -> list[Expected]:
        """Read the named blobs the scan missed or found at another size than the pinned
        rows say (published or republished during the scan), trying again for at most
        ``SECOND_LOOK_S`` while the live database still names them unchanged. Returns the
        ones the live database no longer names as pinned: club is deleting (or
        republishing) them now, and the caller pins again."""
        assert self.expected is not None
        pending = unmatched(self.expected, look.entries)
        known_lost = set(look.parent.record.get("lost", [])) if look.parent else set()
        deadline = time.monotonic() + SECOND_LOOK_S
        database = os.fsdecode(os.path.join(look.root, CLUB_DB))
        while pending:
            pending = [item for item in pending if not self._look_again(look, item)]
            live = live_names(database, pending) if pending else {}
            racing = [item for item in pending if live.get(item.key) != item]
            # Lost already at the parent: no publish takes that long; do not wait for it.
            waiting = [item for item in pending if display(blob_path(item)) not in known_lost]
            if racing or not waiting or time.monotonic() >= deadline:
                return racing
            time.sleep(SECOND_LOOK_PAUSE_S)
        return []

    def _look_again(self, look: _Look, item: Expected) -> bool:
        """Whether the blob is on disk (or in the bucket) now as the row says; if so, read."""
        rel = blob_path(item)
        try:
            entry = self._read_again(look, rel, item.size)
        except (OSError, EngineError):
            return False  # not there (yet), or gone again
        if entry is None:
            return False
        self.looked_again += 1
        look.entries[rel] = entry
        return item.size is None or entry["size"] == item.size

    def _read_again(self, look: _Look, rel: bytes, size: int | None) -> Entry | None:
        if look.store is not None:
            key = display(rel)[len(bucket.TIER) + 1:]
            found = look.store.stat(key)
            if size is not None and found != size:
                return None
            entry = self._read_object(look.store, rel, ObjectInfo(key, found, "", 0))
            bucket.imply_dirs(look.listing, rel)
            return entry
        path = os.path.join(look.root, rel)
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
            return None  # a rename puts the whole new file in place: wait for it
        entry = self._read_file(Item(rel, path, st, "file"))
        look.add_dirs(rel)
        return entry

    def report_lost(self, cut: Cut, parent: SnapshotInfo | None) -> None:
        """One warning per lost blob, with or without --verify: the snapshot may restore
        whole (the parent's copy carried forward), but the data dir is damaged."""
        for rel in sorted(cut.lost):
            where = (f"carried forward from snapshot {parent.id.short()}" if parent and rel in cut.carried
                     else "no earlier copy")
            self.warnings.append(f"{display(rel)}: lost: club.db names it but the data dir lacks it; {where}")

    def pin_databases(self, scan: Scan, parent: SnapshotInfo | None, stack: ExitStack) -> list[_Capture]:
        """Start one read transaction per database, all before any is read: the
        snapshot's consistency point, one for every database. (Reading the pages on a
        thread beside the blob scan was measured: no faster, both hold the GIL.)"""
        captures = []
        for item in scan.databases:
            parent_entry = _entry_at(self.repo, parent, item.rel)
            pin = stack.enter_context(ExitStack())
            try:
                image = pin.enter_context(sqlite_source.pinned_image(os.fsdecode(item.path)))
                if item.rel == CLUB_DB:
                    self.expected = self._club_expectations(image.connection)
            except sqlite_source.CaptureError as exc:
                self.errors.append(f"{display(item.rel)}: cannot capture SQLite database ({exc})")
                continue
            parent_record = next((d for d in parent.record.get("databases", []) if d.get("path") == item.rel),
                                 None) if parent else None
            captures.append(_Capture(item, image, pin, parent_entry, parent_record))
        return captures

    def read_databases(self, captures: list[_Capture]) -> dict[bytes, Entry]:
        """Read the pinned images into page chunks and page maps. The caller ends the
        read transactions right after: held longer, they would hold club's WAL
        checkpoints back."""
        entries: dict[bytes, Entry] = {}
        for capture in captures:
            with capture.pin:
                try:
                    entries[capture.item.rel] = self._read_database(capture)
                except sqlite_source.CaptureError as exc:
                    self.errors.append(f"{display(capture.item.rel)}: cannot capture SQLite database ({exc})")
        return entries

    def _read_database(self, capture: _Capture) -> Entry:
        item, image = capture.item, capture.image
        parent_map, parent_ids = self._parent_map(capture)
        # A file system with whole-second times (FAT, some NFS) needs a wider window.
        racy = RACY_WINDOW_NS if image.file_ctime_ns % 1_000_000_000 else 2_000_000_000
        trusted = image.file_ctime_ns < self.scan_start_ns - racy
        same_shape = (len(parent_ids) == image.page_count * ID_SIZE and capture.parent_entry is not None
                      and capture.parent_entry.get("sqlite", {}).get("page_size") == image.page_size)
        if parent_map and trusted and same_shape and self._unchanged_since_parent(capture, parent_ids):
            ids, page_map, read = parent_ids, parent_map, 0
            pages_stored = page_bytes = map_bytes = 0
            # The parent checked these very pages; its verdict stands, for free.
            suspect = (capture.parent_record or {}).get("suspect")
        else:
            suspect = _quick_check(image.connection)
            ids, pages_stored, page_bytes, read = bytearray(), 0, 0, image.size
            for batch in _batches(image.pages(), PAGE_BATCH):
                batch_ids, stored, stored_bytes = self._store_pages(batch)
                ids += batch_ids
                pages_stored, page_bytes = pages_stored + stored, page_bytes + stored_bytes
            map_blobs = _TreeBatch(self.repo)
            page_map = store_page_map(map_blobs, bytes(ids), image.page_size, parent_map)
            _, map_bytes = self.repo.add_blobs(BlobType.TREE, map_blobs.blobs)
        changed = changed_pages(parent_ids, ids)
        self.databases.append({"path": item.rel, **image.info, "pages_changed": changed, "bytes_read": read,
                               "pages_stored": pages_stored, "page_bytes_stored": page_bytes,
                               "map_bytes_stored": map_bytes, **({"fingerprint": image.fingerprint} if trusted else {}),
                               **({"suspect": suspect} if suspect else {})})
        if suspect:
            self.suspect.append(item.rel)
            self.warnings.append(f"{display(item.rel)}: suspect: {suspect}")
        self.stats.bytes_total += image.size
        self._count(item.rel, image.size, read=read, unchanged=changed == 0 and len(ids) == len(parent_ids),
                    changed=capture.parent_entry is not None)
        self.seen.add(item.rel)
        # Only what describes the content goes into the tree: timings and WAL state vary
        # with every run and would rewrite db/'s tree each time; the record keeps them.
        stable = {k: image.info[k] for k in ENTRY_SQLITE_FIELDS}
        return {**_meta(item), "type": "file", "size": image.size, "sqlite": stable, "page_map": bytes(page_map)}

    def _unchanged_since_parent(self, capture: _Capture, parent_ids: bytearray) -> bool:
        """The database file and its WAL are exactly as the parent snapshot found them (same
        fingerprint), and every page chunk is still indexed: the parent's map is this
        image's, without reading a page."""
        recorded = (capture.parent_record or {}).get("fingerprint")
        if recorded != capture.image.fingerprint:
            return False
        unique = list({ChunkId(bytes(parent_ids[at:at + ID_SIZE])) for at in range(0, len(parent_ids), ID_SIZE)})
        return len(self.repo.which_exist(unique)) == len(unique)

    def _parent_map(self, capture: _Capture) -> tuple[ChunkId | None, bytearray]:
        """The parent snapshot's map of this database and its page ids, or none: a parent
        map that cannot be read costs this snapshot a new base, never the snapshot. So
        does one whose records are not all stored intact (readable only from the local
        tree cache, recorded as damaged, condemned by a prune): this snapshot refers to
        its map by id, or builds a delta on it, and must not refer to what is lost."""
        entry = capture.parent_entry
        if entry is None or "page_map" not in entry:
            return None, bytearray()
        map_id = ChunkId(entry["page_map"])
        try:
            ids = load_page_ids(self.repo, map_id)
            records = set(map_blobs(self.repo, map_id))
        except EngineError as exc:
            self.warnings.append(f"{display(capture.item.rel)}: parent page map unreadable ({exc}); "
                                 f"stored as a new base")
            return None, bytearray()
        if len(self.repo.which_exist(list(records))) < len(records):
            self.warnings.append(f"{display(capture.item.rel)}: parent page map {map_id.short()} is not stored "
                                 f"intact (damaged or pruned); stored as a new base")
            return None, bytearray()
        return map_id, ids

    def _club_expectations(self, conn: sqlite3.Connection) -> list[Expected] | None:
        try:
            expected, problems = expected_blobs(conn)
        except sqlite3.Error:
            return None  # not club's schema (or not yet): nothing to hold blobs to
        self.warnings += [f"db/club.db: {p}" for p in problems]
        return expected

    def _store_pages(self, pages: list[bytes]) -> tuple[bytes, int, int]:
        """Hash a batch of pages and store the new ones with one index lookup; returns
        their ids in page order, and how many were stored in how many bytes."""
        ids = [self.repo.chunk_id(page) for page in pages]
        stored, stored_bytes = self.repo.add_blobs(BlobType.DATA, dict(zip(ids, pages)))
        return b"".join(ids), stored, stored_bytes

    def read_files(self, scan: Scan) -> dict[bytes, Entry]:
        files = scan.files
        self.stats.bytes_total += sum(i.st.st_size for i in files)
        hits = self._cache_hits(files)
        entries: dict[bytes, Entry] = {}
        with ThreadPoolExecutor(max_workers=self.options.workers) as pool:
            futures: list[tuple[Item, Future[Entry]]] = []
            for item in files:
                hit = hits.get(item.rel)
                if hit is None:
                    futures.append((item, pool.submit(self._read_file, item)))
                    continue
                entries[item.rel] = _file_entry(item, item.st.st_size, hit.chunks, CDC)
                self._count(item.rel, item.st.st_size, read=0, unchanged=True)
            for item, future in futures:
                try:
                    entries[item.rel] = future.result()
                except FileNotFoundError:
                    # Deleted after the listing (club deleting a version): as if deleted
                    # before it. consistent_cut carries it forward if the database names it.
                    self.vanished.append(item.rel)
                except OSError as exc:
                    self.errors.append(f"{display(item.rel)}: unreadable ({exc.strerror})")
        return entries

    def _cache_hits(self, files: list[Item]) -> dict[bytes, CachedFile]:
        """Files whose size, times and inode match the files cache and whose chunks are all
        still stored (checked with one batched lookup): these are not read again."""
        candidates = {}
        for item in files:
            cached, st = self.cache.get(item.rel), item.st
            if cached is not None and (cached.size, cached.mtime_ns, cached.ctime_ns, cached.inode) == (
                    st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
                candidates[item.rel] = cached
        stored = self.repo.which_exist([c for cached in candidates.values() for c in cached.chunks])
        hits = {rel: cached for rel, cached in candidates.items() if all(c in stored for c in cached.chunks)}
        self.seen.update(hits)
        return hits

    def _read_file(self, item: Item) -> Entry:
        with open(item.path, "rb") as handle:
            st = os.fstat(handle.fileno())
            chunks = [self.repo.add_blob(BlobType.DATA, c)
                      for c in chunk_stream(handle, CDC, self.repo.config.chunker)]
            size = handle.tell()
        fresh = Item(item.rel, item.path, st, item.kind)
        self._remember(fresh, size, chunks)
        self._count(item.rel, size, read=size, changed=item.rel in self.cache)
        return _file_entry(fresh, size, chunks, CDC)

    def read_bucket(self, store: S3Backend, listing: bucket.BucketListing) -> dict[bytes, Entry]:
        """The bucket's objects as file entries: unchanged ones (same size and ETag as the
        files cache remembers, chunks still stored) without a request, the rest streamed."""
        self.bucket_cache = _BucketCache(store.url, self.repo.catalog.load_files(store.url))
        objects = listing.objects
        self.stats.bytes_total += sum(info.size for info in objects.values())
        hits = self.bucket_cache.hits(self.repo, objects)
        entries: dict[bytes, Entry] = {}
        with ThreadPoolExecutor(max_workers=max(self.options.workers, store.concurrency)) as pool:
            futures: list[tuple[bytes, Future[Entry]]] = []
            for rel, info in objects.items():
                hit = hits.get(rel)
                if hit is None:
                    futures.append((rel, pool.submit(self._read_object, store, rel, info)))
                    continue
                entries[rel] = bucket.object_entry(rel, info.size, info.mtime_ns, info.etag,
                                                   [bytes(c) for c in hit.chunks], CDC)
                self._count(rel, info.size, read=0, unchanged=True)
            for rel, future in futures:
                try:
                    entries[rel] = future.result()
                except ObjectNotFound:
                    self.vanished.append(rel)  # deleted after the listing, as for files
                except EngineError as exc:
                    self.errors.append(f"{display(rel)}: unreadable ({exc})")
        return entries

    def _read_object(self, store: S3Backend, rel: bytes, info: ObjectInfo) -> Entry:
        with store.open_object(display(rel)[len(bucket.TIER) + 1:]) as reader:
            chunks = [self.repo.add_blob(BlobType.DATA, c) for c in chunk_stream(reader, CDC, self.repo.config.chunker)]
            size, etag = reader.size or 0, reader.etag or ""
        if etag and etag == info.etag:  # the object read is the one listed: remember it
            self.bucket_cache.remember(rel, CachedFile(size, info.mtime_ns, 0, 0, chunks, etag))
        self._count(rel, size, read=size, changed=rel in self.bucket_cache.cached)
        return bucket.object_entry(rel, size, info.mtime_ns, etag, [bytes(c) for c in chunks], CDC)

    def _remember(self, item: Item, size: int, chunks: list[ChunkId]) -> None:
        st = item.st
        self.seen.add(item.rel)
        if size == st.st_size and st.st_ctime_ns < self.scan_start_ns - RACY_WINDOW_NS:
            self.cache_updates[item.rel] = CachedFile(size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, chunks)

    def _count(self, rel: bytes, size: int, read: int, unchanged: bool = False, changed: bool = False) -> None:
        with self._count_lock:  # reader threads report concurrently
            self._count_locked(rel, size, read, unchanged, changed)

    def _count_locked(self, rel: bytes, size: int, read: int, unchanged: bool, changed: bool) -> None:
        tier = rel.split(b"/", 1)[0].decode()
        stats = self.stats
        stats.files += 1
        stats.bytes_read += read
        tier_stats = stats.tiers.setdefault(tier, {"files": 0, "bytes": 0})
        tier_stats["files"] += 1
        tier_stats["bytes"] += size
        if unchanged:
            stats.files_unmodified += 1
        elif changed:
            stats.files_changed += 1
        else:
            stats.files_new += 1
        self._files_done += 1
        self._bytes_done += size
        if self.options.progress:
            self.options.progress(Progress(self._files_done, self.files_total,
                                           self._bytes_done, self.stats.bytes_total))


def _file_entry(item: Item, size: int, chunks: list[ChunkId], chunker: str) -> Entry:
    return {**_meta(item), "type": "file", "size": size, "chunker": chunker,
            "chunks": [bytes(c) for c in chunks]}


def _meta(item: Item) -> Entry:
    st = item.st
    return {"name": os.path.basename(item.rel), "mode": stat.S_IMODE(st.st_mode),
            "mtime": st.st_mtime_ns, "uid": st.st_uid, "gid": st.st_gid}


def _build_trees(repo: Repository, items: list[Item], files: dict[bytes, Entry],
                 extra_dirs: dict[bytes, Entry]) -> ChunkId:
    """Store directory trees bottom-up; returns the root tree id.

    ``files`` holds every file entry by path (carried-forward ones included);
    ``extra_dirs`` the directories only carried-forward files still need.
    """
    trees = _TreeBatch(repo)
    children: dict[bytes, list[Entry]] = defaultdict(list)
    for rel, entry in files.items():
        children[os.path.dirname(rel)].append(entry)
    dirs = extra_dirs | {i.rel: _meta(i) for i in items if i.kind == "dir"}
    for item in items:
        if item.kind == "symlink":
            children[os.path.dirname(item.rel)].append(
                {**_meta(item), "type": "symlink", "target": os.readlink(item.path)})
    for rel in sorted(dirs, key=lambda d: d.count(b"/"), reverse=True):
        entries = sorted(children.pop(rel, []), key=lambda e: e["name"])
        tree = store_tree(trees, entries)
        children[os.path.dirname(rel)].append({**dirs[rel], "type": "dir", "tree": bytes(tree)})
    root = store_tree(trees, sorted(children.pop(b"", []), key=lambda e: e["name"]))
    repo.add_blobs(BlobType.TREE, trees.blobs)
    return root


class _TreeBatch:
    """Collects tree blobs (their ids are their hashes, known at once: every blob added
    here is stored as a TREE blob) so that the repository looks them all up in one batch
    instead of one query per blob. Reads go to the repository, never to the batch."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.blobs: dict[ChunkId, bytes] = {}

    def add_blob(self, blob_type: BlobType, raw: bytes, blob_id: ChunkId | None = None) -> ChunkId:
        blob_id = blob_id or self.repo.chunk_id(raw)
        self.blobs[blob_id] = raw
        return blob_id

    def read_blob(self, blob_id: ChunkId) -> bytes:
        return self.repo.read_blob(blob_id)


class _BucketCache:
    """The files cache of a bucket source, keyed by the bucket's URL: an object is
    unchanged when its size and ETag are (object times say nothing a new ETag does not)."""

    def __init__(self, source: str, cached: dict[bytes, CachedFile]) -> None:
        self.source, self.cached = source, cached
        self.updates: dict[bytes, CachedFile] = {}
        self.seen: set[bytes] = set()
        self._lock = threading.Lock()

    def hits(self, repo: Repository, objects: dict[bytes, ObjectInfo]) -> dict[bytes, CachedFile]:
        candidates = {rel: cached for rel, info in objects.items()
                      if (cached := self.cached.get(rel)) is not None and info.etag
                      and (cached.size, cached.etag) == (info.size, info.etag)}
        stored = repo.which_exist([c for cached in candidates.values() for c in cached.chunks])
        hits = {rel: cached for rel, cached in candidates.items() if all(c in stored for c in cached.chunks)}
        self.seen.update(hits)
        return hits

    def remember(self, rel: bytes, cached: CachedFile) -> None:
        with self._lock:
            self.seen.add(rel)
            self.updates[rel] = cached

    def save(self, repo: Repository) -> None:
        repo.catalog.update_files(self.source, self.updates, set(self.cached) - self.seen)


@dataclass
class _Look:
    """What the second look needs: where blobs are, and what the scan made of them."""

    root: bytes
    scan: Scan
    listing: bucket.BucketListing
    store: S3Backend | None
    entries: dict[bytes, Entry]
    parent: SnapshotInfo | None = None
    _dirs: set[bytes] | None = None

    def add_dirs(self, rel: bytes) -> None:
        """Directory items for a file found after the scan, as the scan would have made."""
        if self._dirs is None:
            self._dirs = {i.rel for i in self.scan.items if i.kind == "dir"}
        parts = rel.split(b"/")
        for depth in range(1, len(parts)):
            directory = b"/".join(parts[:depth])
            if directory not in self._dirs:
                self.scan.items.append(Item(directory, os.path.join(self.root, directory),
                                            os.stat(os.path.join(self.root, directory)), "dir"))
                self._dirs.add(directory)


def _header_problem(path: bytes) -> str:
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not header:
        return "empty, not a SQLite database"
    if header.count(0) == len(header):
        return "its header is zeroed: not a SQLite database"
    return "its header is not SQLite's: not a SQLite database"


def _quick_check(conn: sqlite3.Connection) -> str | None:
    """``PRAGMA quick_check`` on the pinned image (SQLITE_NOTES §5: about 1.5-2 s/GB);
    the first problems it names, or None when it says ok."""
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        return f"quick_check at capture failed: {exc}"
    return None if rows == ["ok"] else f"quick_check at capture failed: {'; '.join(rows)}"


@dataclass
class _Capture:
    """A database pinned at the snapshot's consistency point, waiting to be read."""

    item: Item
    image: sqlite_source.PinnedImage
    pin: ExitStack  # ends the read transaction
    parent_entry: Entry | None            # the parent snapshot's tree entry for the file
    parent_record: dict[str, Any] | None  # and its `databases` record


def _snapshot_record(options: SnapshotOptions, source: str, start: datetime, tree: ChunkId,
                     builder: _SnapshotBuilder, scan: Scan, parent: SnapshotInfo | None,
                     written: WriteStats, cut: Cut, requests: dict[str, dict[str, int]]) -> dict[str, Any]:
    stats = builder.stats
    return {
        "time": start.isoformat(),
        "host": options.host,
        "source": source,
        "tags": sorted(set(options.tags)),
        **({"blobs_source": options.blob_store.url} if options.blob_store else {}),
        "parent": bytes(parent.id) if parent else None,
        "tree": bytes(tree),
        "tiers": stats.tiers,
        "databases": builder.databases,
        **({"suspect_databases": sorted(display(rel) for rel in builder.suspect)[:MAX_LISTED]}
           if builder.suspect else {}),
        **cut.to_record(),
        "partial": bool(scan.errors or builder.errors),
        "errors": (scan.errors + builder.errors)[:100],
        "stats": {**{k: v for k, v in asdict(stats).items() if k != "tiers"},
                  "blobs_added": written.blobs_added, "raw_bytes_added": written.raw_bytes_added,
                  "data_bytes_stored": written.stored_bytes_added - written.tree_bytes_added,
                  "metadata_bytes_stored": written.tree_bytes_added,
                  "bytes_added": written.pack_bytes_written, "packs_written": written.packs_written,
                  "index_objects_written": written.index_objects_written,
                  "files_vanished": len(builder.vanished) + len(scan.vanished),
                  "pins": builder.pins, "blobs_looked_again": builder.looked_again,
                  **requests,
                  "duration_s": round((options.now() - builder.began).total_seconds(), 3)},
        "program": "clubsnap 0.1.0",
    }


def _requests_since(repo: Repository, before: dict[str, int]) -> dict[str, int]:
    """Backend requests this snapshot made, by class, up to (not including) its record."""
    return {k: v - before.get(k, 0) for k, v in repo.backend.snapshot().items() if not k.startswith("bytes")}


def _parent(repo: Repository, source: str, host: str) -> SnapshotInfo | None:
    """The newest snapshot of the same source and host: records are read newest first
    and only until one matches, so the cost does not grow with the number of snapshots."""
    for _, _, key in reversed(repo.snapshot_keys()):
        snap = repo.snapshot_if_readable(key)  # forgotten since the listing, or damaged: passed over
        if snap is not None and snap.record.get("source") == source and snap.record.get("host") == host:
            return snap
    return None


def _entry_at(repo: Repository, snapshot: SnapshotInfo | None, rel: bytes) -> Entry | None:
    """The parent's entry for ``rel``, or None: also when a tree on the way is no longer
    live (a prune condemned it after the parent was forgotten), since a snapshot builds
    only on what is live."""
    try:
        found = lookup(repo, snapshot.tree, rel) if snapshot else None
    except IntegrityError:
        return None
    return found[-1] if found else None


def _batches(items: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
