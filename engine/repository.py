"""The repository: config, the chunk store over packs, index objects and snapshot records.

Write ordering (docs/format.md, "Write ordering"): packs are durable before the index
objects naming them, and index objects before the snapshot record that needs them. So a
reader that sees a snapshot can find every blob it references, and a run killed at any
point leaves only unreferenced packs or index entries, never a dangling reference.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from .backend import Backend
from .backends.metered import MeteredBackend
from . import damage, keys
from .catalog import Catalog
from .crypto import PLAIN, SCHEME, Cipher
from .keys import KeySlot
from .locks import Lock
from .chunker import ChunkerParams
from .errors import BackendError, EngineError, IntegrityError, ObjectNotFound, RepositoryExists, UsageError, RepositoryNotFound, SnapshotNotFound, UnsupportedFormat
from .format import (
    CONFIG_KEY, DATA_PREFIX, FORMAT_VERSION, GARBAGE_PREFIX, INDEX_PREFIX, SNAPSHOT_PREFIX, SUMMARY_PREFIX, BlobType,
    KEYS_PREFIX, ChunkId, Flag, Kind, PackId, SnapshotId, decode_blob, digest, encode_blob, index_key,
    object_flags, open_object, pack_key, parse_snapshot_key, seal_object, snapshot_key, summary_key,
)
from .packs import TARGET_PACK_SIZE, BlobEntry, PackBuilder, read_trailer

# Write an index object after this many packs, so a killed run loses little: the next
# run finds those chunks indexed and does not upload them again.
PACKS_PER_INDEX = 4
# A snapshot whose number (in the listing) is a multiple of this writes a summary of every
# snapshot record, so that a host with an empty catalog lists them with a few GETs
# instead of one per snapshot. A summary is below 50 new snapshots out of date at most.
SUMMARY_EVERY = 50
SUMMARY_WORTH_READING = 4  # records missing from the catalog before a summary is read
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class RepoConfig:
    repo_id: str
    created: str
    chunker: ChunkerParams
    pack_size: int = TARGET_PACK_SIZE
    encryption: str = "none"

    def to_record(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "id": self.repo_id, "created": self.created,
                "chunker": self.chunker.to_record(), "pack_size": self.pack_size,
                "encryption": self.encryption}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "RepoConfig":
        return cls(str(record["id"]), str(record["created"]), ChunkerParams.from_record(record["chunker"]),
                   int(record["pack_size"]), str(record.get("encryption", "none")))


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot record with its id and key; ``record`` is the stored dict."""

    id: SnapshotId
    key: str
    time: datetime
    record: dict[str, Any] = field(repr=False)

    @property
    def tree(self) -> ChunkId:
        return ChunkId(self.record["tree"])

    @property
    def tags(self) -> list[str]:
        return list(self.record.get("tags", []))


@dataclass(frozen=True)
class SnapshotFilter:
    """Which snapshots ``latest`` and ``--at`` may pick: those of one host, one source
    (the data dir's absolute path, as recorded) and carrying every tag given. A
    repository shared by several hosts or data dirs then answers per registry."""

    host: str | None = None
    source: str | None = None
    tags: tuple[str, ...] = ()

    def matches(self, snap: SnapshotInfo) -> bool:
        return self.admits(snap.record.get("host"), snap.record.get("source"), snap.tags)

    def admits(self, host: Any, source: Any, tags: Iterable[str]) -> bool:
        """Whether a snapshot of this host, source and tags matches (also as another
        record, a verification's, names them)."""
        return ((self.host is None or host == self.host) and (self.source is None or source == self.source)
                and set(self.tags) <= set(tags))

    def describe(self) -> str:
        parts = ([f"of host {self.host}"] if self.host else []) + ([f"of {self.source}"] if self.source else []) \
            + ([f"tagged {','.join(self.tags)}"] if self.tags else [])
        return " ".join(parts)


@dataclass
class WriteStats:
    """What this session added to the repository."""

    blobs_added: int = 0
    raw_bytes_added: int = 0
    stored_bytes_added: int = 0  # blob bytes as stored (compressed), before pack overhead
    tree_bytes_added: int = 0    # the part of those that is metadata (trees, page maps)
    packs_written: int = 0
    pack_bytes_written: int = 0
    index_objects_written: int = 0

    def since(self, earlier: "WriteStats") -> "WriteStats":
        return WriteStats(*(now - then for now, then in zip(astuple(self), astuple(earlier))))


class Repository:
    def __init__(self, backend: Backend, config: RepoConfig, catalog: Catalog, cipher: Cipher = PLAIN,
                 key_slot: KeySlot | None = None) -> None:
        self.backend = backend if isinstance(backend, MeteredBackend) else MeteredBackend(backend)
        self.config = config
        self.catalog = catalog
        self.cipher = cipher
        self.key_slot = key_slot  # the slot the password opened (encrypted repositories)
        self.stats = WriteStats()
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._session_ids: set[ChunkId] = set()
        self._uploaded: dict[ChunkId, BlobEntry] = {}
        self._session_packs: dict[PackId, int] = {}
        self._unindexed: list[tuple[PackId, int, list[BlobEntry]]] = []
        self._builders = {t: PackBuilder(t, self.cipher) for t in BlobType}
        # Uploads run in the background when the backend serves parallel requests well;
        # at most `concurrency` packs are in flight, which bounds memory.
        self._upload_slots = threading.BoundedSemaphore(self.backend.concurrency)
        self._upload_pool: ThreadPoolExecutor | None = None
        self._pending_uploads: list[Future[None]] = []
        self._upload_error: BaseException | None = None
        self.summary_every = SUMMARY_EVERY
        self._listed_snapshots: int | None = None  # how many the last LIST of snapshots/ found
        # Readers may take a blob from a pack a prune condemned (a snapshot that finished
        # while the prune ran may need it until the next prune re-indexes it). A snapshot
        # turns this off: it must never come to depend on a condemned pack (format §10).
        self.read_condemned = True
        self.garbage_warnings: list[str] = []  # garbage records the last sync could not read
        # Index objects and snapshot records met damaged (key -> reason): passed over, so
        # that one bad object blocks nothing that does not need it; said once each, and
        # prune refuses to run beside them (their blobs would look unused).
        self.damaged_objects: dict[str, str] = {}
        self.damage_warnings: list[str] = []  # damage records the last sync could not read
        self._unindexed_blobs: dict[ChunkId, BlobEntry] | None = None
        self.index_objects_written: list[str] = []  # by this object, oldest first
        # The lock this object writes under (a snapshot's, a prune's): an index object
        # names packs a prune could have deleted if the lock had lapsed, so it is checked
        # before each one is written.
        self.held_lock: Lock | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, cache_root: Path, now: Callable[[], datetime],
             chunker: ChunkerParams | None = None, password: bytes | None = None,
             kdf_log2_n: int | None = None, host: str = "") -> "Repository":
        """A new repository; encrypted under a new random master key when ``password`` is
        given (one key slot wraps it), else plain."""
        cipher = Cipher(keys.new_master_key()) if password is not None else PLAIN
        config = RepoConfig(secrets.token_hex(16), now().astimezone(timezone.utc).isoformat(),
                            chunker or ChunkerParams(), encryption=SCHEME if cipher.encrypted else "none")
        catalog = Catalog(cache_root / config.repo_id / "catalog.db")  # fail before writing anything
        slot = None
        try:
            backend.prepare_for_init()
            try:
                backend.stat(CONFIG_KEY)
                raise RepositoryExists(f"{backend.location}/{CONFIG_KEY} already exists: "
                                       f"a clubsnap repository is there")
            except ObjectNotFound:
                pass  # the exclusive put below still settles a race with another init
            if password is not None and cipher.master_key is not None:
                # The slot first: a config without a slot would be a repository nobody opens.
                slot = keys.add_slot(backend, cipher.master_key, password,
                                     kdf_log2_n if kdf_log2_n is not None else keys.calibrate(), host)
            backend.put(CONFIG_KEY, seal_object(Kind.CONFIG, config.to_record(), cipher), exclusive=True)
        except BaseException:
            if slot is not None:
                try:
                    backend.delete(KEYS_PREFIX + slot.slot_id)
                except EngineError:
                    pass  # a stray slot is harmless: unlock keeps only a key that opens the config
            catalog.close()
            raise
        if cipher.encrypted:
            _remember_encrypted(cache_root, backend.location)
        return cls(backend, config, catalog, cipher, slot)

    @classmethod
    def open(cls, backend: Backend, cache_root: Path, password: Callable[[], bytes] | None = None) -> "Repository":
        """Open a repository; ``password`` is asked for only if it is encrypted."""
        try:
            data = backend.get(CONFIG_KEY)
        except ObjectNotFound as exc:
            raise RepositoryNotFound(
                f"no clubsnap repository at {backend.location} (run 'clubsnap init' first)") from exc
        what = f"{backend.location}/{CONFIG_KEY}"
        cipher, slot = PLAIN, None
        if object_flags(data) & Flag.ENCRYPTED:
            if password is None:
                raise UsageError(f"{backend.location} is encrypted: a password is needed")

            def opens_config(master: bytes) -> bool:
                try:
                    open_object(Kind.CONFIG, data, what, Cipher(master))
                    return True
                except IntegrityError:
                    return False  # a slot left by a failed init of another repository here

            master, slot = keys.unlock(backend, password, opens_config, what)
            cipher = Cipher(master)
            _remember_encrypted(cache_root, backend.location)
        elif any(True for _ in backend.list(KEYS_PREFIX)):
            # A plain config beside key slots: it was replaced, and writing on would store
            # the next snapshots in the clear.
            raise IntegrityError(f"{what}: not encrypted, but the repository has key slots (the config was "
                                 f"replaced?); refusing to read or write it")
        elif _was_encrypted(cache_root, backend.location):
            raise IntegrityError(f"{what}: not encrypted, but this host knew an encrypted repository here (the "
                                 f"config was replaced?); if it was recreated unencrypted on purpose, remove "
                                 f"{cache_root / ENCRYPTED_LOCATIONS}")
        record = open_object(Kind.CONFIG, data, what, cipher)
        if record.get("encryption", "none") not in ("none", SCHEME) or (
                (record.get("encryption", "none") == SCHEME) != cipher.encrypted):
            raise UnsupportedFormat(f"{backend.location}: encryption {record.get('encryption')!r} "
                                    f"is not supported by this clubsnap")
        config = RepoConfig.from_record(record)
        return cls(backend, config, Catalog(cache_root / config.repo_id / "catalog.db"), cipher, slot)

    def chunk_id(self, raw: bytes | bytearray | memoryview) -> ChunkId:
        """A chunk's id: blake3 of its bytes, keyed in an encrypted repository."""
        return ChunkId(self.cipher.chunk_id(raw))

    def close(self) -> None:
        self._wait_for_uploads(raise_errors=False)
        if self._upload_pool is not None:
            self._upload_pool.shutdown()
        self.catalog.close()

    # ---- index synchronisation -------------------------------------------------------------

    def sync_index(self, attempts_left: int = 10) -> set[str]:
        """Bring the catalog's blob index up to date with the index objects in the repo,
        and its list of condemned packs with the garbage records (docs/format.md §10).

        Reads only index objects the catalog has not seen. If one it had seen is gone
        (a prune consolidated it), the catalog's index is rebuilt from scratch. Returns
        the index objects listed.
        """
        # Garbage records the catalog knows are read before listing: one another process
        # records meanwhile is then in the listing too, never taken for a swept one.
        known_garbage = self.catalog.garbage_names()
        present = {key[len(INDEX_PREFIX):] for key, _ in self.backend.list(INDEX_PREFIX)}
        # A snapshot never reads condemned packs: it spares itself the LIST.
        garbage = ({key[len(GARBAGE_PREFIX):] for key, _ in self.backend.list(GARBAGE_PREFIX)}
                   if self.read_condemned else known_garbage)
        listing, cleared = self.catalog.record_listing(present)  # clears if an object it held is gone
        # Damage first: an index entry replaces a cataloged one only where that is damaged.
        self.damage_warnings = damage.sync_damage(self.backend, self.cipher, self.catalog)
        known = self.catalog.index_object_names()
        if cleared:
            known_garbage = set()
        try:
            for name in sorted(present - known):
                try:
                    loaded = self._load_index_object(name, listing)
                except (IntegrityError, UnsupportedFormat) as exc:
                    self._pass_over(INDEX_PREFIX + name, exc, "repair index")
                    present.discard(name)
                    continue
                if not loaded:
                    raise ObjectNotFound(name)  # a newer listing lacks it: deleted meanwhile
        except ObjectNotFound as exc:
            # Listed, then deleted: a prune replaced the index meanwhile. Its new index
            # objects were written before the old ones went, so a new listing has them.
            if attempts_left == 0:
                raise BackendError(f"the index of {self.backend.location} kept changing while it was read "
                                   f"(prunes running?); run the command again") from exc
            return self.sync_index(attempts_left - 1)
        self.catalog.remove_garbage(known_garbage - garbage)
        self.garbage_warnings = []
        for name in sorted(garbage - known_garbage):
            try:
                self.read_garbage(name, catalog=True)
            except ObjectNotFound:
                continue  # swept by a prune meanwhile
            except (IntegrityError, UnsupportedFormat) as exc:
                # Only readers racing a prune need a garbage record; a damaged one must
                # not stop a snapshot (check reports it, prune condemns its packs anew).
                self.garbage_warnings.append(str(exc))
        return present

    def _pass_over(self, key: str, exc: EngineError, repair: str) -> None:
        """Note a damaged index object or snapshot record that is being passed over."""
        self.damaged_objects[key] = f"{exc}; passed over (run 'clubsnap {repair}')"

    def note_damage(self, findings: dict[PackId, damage.Finding], found_by: str) -> str | None:
        """Record damage a read found (``engine/damage.py``), so that the next snapshot
        stores those blobs again; returns the record's key, None if nothing new."""
        key, cleared = damage.record_damage(self.backend, self.cipher, self.catalog, findings, found_by,
                                            datetime.now(timezone.utc))
        if cleared:
            self.sync_index()  # the index again, now choosing intact copies over damaged ones
        return key

    def read_garbage(self, name: str, catalog: bool = False) -> dict[str, Any]:
        """One garbage record (docs/format.md §10); with ``catalog``, its condemned packs
        are recorded in the catalog too."""
        record = self.read_named(GARBAGE_PREFIX, Kind.GARBAGE, name)
        if catalog:
            self.catalog.add_garbage(name, *_packs_and_entries(record))
        return record

    def _load_index_object(self, name: str, listing: int) -> bool:
        record = self.read_named(INDEX_PREFIX, Kind.INDEX, name)
        return self.catalog.add_index(name, *_packs_and_entries(record), listing=listing)

    def read_named(self, prefix: str, kind: Kind, name: str) -> dict[str, Any]:
        """An object named by the hash of its bytes, authenticated (when encrypted) and checked."""
        key = f"{prefix}{name}"
        data = self.backend.get(key)
        record = open_object(kind, data, key, self.cipher)
        if digest(data).hex() != name:
            raise IntegrityError(f"{key}: content does not match its name (corrupted)")
        return dict(record)

    def rebuild_index_from_packs(self) -> int:
        """Recreate index objects from pack trailers (after index loss); returns packs indexed."""
        self.sync_index()
        indexed = set(self.catalog.packs()) | set(self.catalog.condemned_packs())  # condemned: prune's to delete
        found = 0
        for key, size in self.backend.list(DATA_PREFIX):
            pack_id = PackId.from_hex(key.rsplit("/", 1)[-1])
            if pack_id not in indexed:
                self._write_index([(pack_id, size, read_trailer(self.backend, pack_id, size, self.cipher))])
                found += 1
        return found

    # ---- writing blobs ----------------------------------------------------------------------

    def which_exist(self, blob_ids: list[ChunkId]) -> set[bytes]:
        """The ids among ``blob_ids`` the repository holds (or this session added)."""
        with self._lock:
            found: set[bytes] = {b for b in blob_ids if b in self._session_ids}
        return found | self.catalog.which_exist([b for b in blob_ids if b not in found])

    def add_blob(self, blob_type: BlobType, raw: bytes, blob_id: ChunkId | None = None) -> ChunkId:
        """Store a blob unless the repository has it; safe to call from many threads."""
        blob_id = blob_id or self.chunk_id(raw)
        with self._lock:
            if blob_id in self._session_ids:
                return blob_id
            self._session_ids.add(blob_id)
        if not self.catalog.has_blob(blob_id):
            self._store(blob_type, blob_id, raw)
        return blob_id

    def add_blobs(self, blob_type: BlobType, blobs: dict[ChunkId, bytes]) -> tuple[int, int]:
        """``add_blob`` for many blobs (by id) with one index lookup: a database's pages
        come by the thousand, and a lookup per page would cost more than hashing it.
        Returns how many were new and their stored bytes (the caller's own share of the
        session's writes, which other threads add to meanwhile)."""
        with self._lock:
            fresh = [blob_id for blob_id in blobs if blob_id not in self._session_ids]
            self._session_ids.update(fresh)
        stored = self.catalog.which_exist(fresh)
        new = [blob_id for blob_id in fresh if blob_id not in stored]
        return len(new), sum(self._store(blob_type, blob_id, blobs[blob_id]) for blob_id in new)

    def _store(self, blob_type: BlobType, blob_id: ChunkId, raw: bytes) -> int:
        encoded = encode_blob(raw, blob_id, self.cipher)  # outside the lock: lz4 releases the GIL
        self._append(blob_type, blob_id, encoded, len(raw))
        return len(encoded)

    def copy_blob(self, entry: BlobEntry, stored: bytes | memoryview) -> None:
        """Put a blob, as stored in another pack, into a new pack: prune's repack. The
        stored bytes depend only on the blob (an encrypted one is bound to its id, not to
        its pack), so they are copied, not decoded and encoded again."""
        with self._lock:
            self._session_ids.add(entry.id)
        self._append(entry.type, entry.id, bytes(stored), entry.raw_length)

    def _append(self, blob_type: BlobType, blob_id: ChunkId, encoded: bytes, raw_length: int) -> None:
        with self._lock:
            builder = self._builders[blob_type]
            builder.add(blob_id, encoded, raw_length)
            self.stats.blobs_added += 1
            self.stats.raw_bytes_added += raw_length
            self.stats.stored_bytes_added += len(encoded)
            if blob_type == BlobType.TREE:
                self.stats.tree_bytes_added += len(encoded)
            full = builder.size >= self.config.pack_size
            if full:
                self._builders[blob_type] = PackBuilder(blob_type, self.cipher)
        if full:
            self._upload(builder)

    def _upload(self, builder: PackBuilder) -> None:
        if self.backend.concurrency == 1:
            # One upload at a time: a reader thread that fills a pack meanwhile waits here,
            # which bounds memory to a few packs however fast the files are read.
            with self._upload_lock:
                self._put_pack(*builder.finish())
            return
        self._upload_slots.acquire()  # waits while `concurrency` packs are in flight
        try:
            self._raise_failed_upload()
            pack = builder.finish()
            with self._lock:
                if self._upload_pool is None:
                    self._upload_pool = ThreadPoolExecutor(self.backend.concurrency, thread_name_prefix="upload")
                future = self._upload_pool.submit(self._put_pack, *pack)
                self._pending_uploads.append(future)
        except BaseException:
            self._upload_slots.release()
            raise
        future.add_done_callback(lambda _: self._upload_slots.release())

    def _put_pack(self, pack_id: PackId, data: bytes | bytearray, entries: list[BlobEntry]) -> None:
        try:
            self.backend.put(pack_key(pack_id), data)
            with self._lock:
                self.stats.packs_written += 1
                self.stats.pack_bytes_written += len(data)
                self._uploaded.update((e.id, e) for e in entries)
                self._session_packs[pack_id] = len(data)
                self._unindexed.append((pack_id, len(data), entries))
                batch = self._unindexed if len(self._unindexed) >= PACKS_PER_INDEX else []
                if batch:
                    self._unindexed = []
            if batch:
                self._write_index(batch)
        except BaseException as exc:
            # Sticky: the pack's blobs count as stored for this session (dedup), so no
            # snapshot may be saved after this, whichever thread met (or swallowed) it.
            with self._lock:
                self._upload_error = self._upload_error or exc
            raise
        if entries and entries[0].type == BlobType.TREE:  # a pack holds one blob type
            self._cache_trees((bytes(e.id), bytes(data[e.offset:e.offset + e.length])) for e in entries)

    def _cache_trees(self, blobs: Iterable[tuple[bytes, bytes]]) -> None:
        try:
            self.catalog.cache_trees(blobs)
        except sqlite3.Error:
            pass  # only a cache: the trees are read from their packs instead

    def _raise_failed_upload(self) -> None:
        """Fail early, at the next pack, once any upload has failed."""
        with self._lock:
            self._pending_uploads = [f for f in self._pending_uploads if not f.done()]
            error = self._upload_error
        if error is not None:
            raise error

    def _wait_for_uploads(self, raise_errors: bool = True) -> None:
        with self._lock:
            pending, self._pending_uploads = self._pending_uploads, []
        for future in pending:
            future.exception()  # waits; the error itself is kept in _upload_error
        if raise_errors:
            self._raise_failed_upload()

    def _write_index(self, batch: list[tuple[PackId, int, list[BlobEntry]]]) -> None:
        record = {"packs": [{"id": bytes(p), "size": size, "blobs": [e.to_row() for e in entries]}
                            for p, size, entries in batch]}
        data = seal_object(Kind.INDEX, record, self.cipher)
        name = digest(data)
        with self._index_lock:
            try:
                if self.held_lock is not None:
                    self.held_lock.ensure_held()
                self.backend.put(index_key(name), data)
            except BaseException:
                with self._lock:  # stored but unindexed for good: a retry must store them again
                    for _, _, entries in batch:
                        for entry in entries:
                            self._uploaded.pop(entry.id, None)
                raise
            self.catalog.add_index(name.hex(), {p: s for p, s, _ in batch},
                                   [e for _, _, entries in batch for e in entries])
            self.index_objects_written.append(name.hex())
            self.stats.index_objects_written += 1

    def flush(self) -> None:
        """Upload every open pack and index everything uploaded: all blobs become durable."""
        with self._lock:
            builders = [b for b in self._builders.values() if len(b)]
            self._builders = {t: PackBuilder(t, self.cipher) for t in BlobType}
        for builder in builders:
            self._upload(builder)
        self._wait_for_uploads()
        with self._lock:
            batch, self._unindexed = self._unindexed, []
        if batch:
            self._write_index(batch)

    def session_entries(self) -> list[BlobEntry]:
        """Where the blobs this session stored went (their packs are durable)."""
        with self._lock:
            return list(self._uploaded.values())

    def session_packs(self) -> dict[PackId, int]:
        """The packs this session stored, with their sizes."""
        with self._lock:
            return dict(self._session_packs)

    # ---- reading blobs ----------------------------------------------------------------------

    def locate(self, blob_id: ChunkId) -> BlobEntry:
        return self.locate_many([blob_id])[blob_id]

    def locate_many(self, blob_ids: Iterable[ChunkId]) -> dict[ChunkId, BlobEntry]:
        """Where each blob is, in batched index queries; raises for the first one missing.
        A reader also looks in condemned packs, and then in the trailers of packs no index
        names: a damaged index object must not stop a restore of what its packs hold."""
        wanted = list(dict.fromkeys(blob_ids))
        found = {b: self._uploaded[b] for b in wanted if b in self._uploaded}
        found |= self.catalog.lookup_many([b for b in wanted if b not in found])
        if self.read_condemned and len(found) < len(wanted):
            found |= self.catalog.lookup_condemned_many([b for b in wanted if b not in found])
        if self.read_condemned and len(found) < len(wanted):
            found |= {b: e for b in wanted if b not in found and (e := self._in_unindexed_packs().get(b)) is not None}
        for blob_id in wanted:
            if blob_id not in found:
                raise IntegrityError(f"chunk {blob_id.short()} is missing from the repository index")
        return found

    def _in_unindexed_packs(self) -> dict[ChunkId, BlobEntry]:
        """The blobs of packs that neither the index nor a garbage record names, from their
        trailers (two ranged reads a pack, once per object): the last resort of a reader."""
        if self._unindexed_blobs is None:
            known = set(self.catalog.packs()) | set(self.catalog.condemned_packs())
            self._unindexed_blobs = {}
            for key, size in self.backend.list(DATA_PREFIX):
                pack = PackId.from_hex(key.rsplit("/", 1)[-1])
                if pack in known:
                    continue
                try:
                    entries = read_trailer(self.backend, pack, size, self.cipher)
                except EngineError:
                    continue  # damaged too: check reports it
                for entry in entries:
                    self._unindexed_blobs.setdefault(entry.id, entry)
        return self._unindexed_blobs

    def read_blob(self, blob_id: ChunkId) -> bytes:
        entry = self.locate(blob_id)
        if entry.type == BlobType.TREE:
            stored = self.catalog.cached_tree(blob_id)
            if stored is not None:
                try:
                    return decode_blob(stored, blob_id, "the local tree cache", self.cipher)
                except IntegrityError:
                    pass  # a damaged cache entry: the pack has the real one

        if self.catalog.damage_known(blob_id, entry.pack):
            raise IntegrityError(f"{pack_key(entry.pack)}: {'tree' if entry.type == BlobType.TREE else 'chunk'} "
                                 f"{blob_id.short()} is recorded as damaged there (run 'clubsnap repair packs')")
        if entry.type == BlobType.TREE:
            return self._read_tree_pack(entry)
        return self.decode_or_note(self._get_blobs(entry.pack, entry.offset, entry.length, [entry]), entry,
                                   pack_key(entry.pack))

    def _get_blobs(self, pack: PackId, start: int, length: int, entries: list[BlobEntry]) -> bytes:
        """A range of a pack holding ``entries``; a pack missing, or too short for the
        range (truncated), is damage: recorded, and an IntegrityError naming it."""
        key = pack_key(pack)
        try:
            return self.backend.get(key, start, length)
        except ObjectNotFound as exc:
            raise IntegrityError(f"{key}: pack missing (needed for blob {entries[0].id.short()})") from exc
        except BackendError as exc:
            try:
                size = self.backend.stat(key)
            except EngineError:
                raise exc from None
            if size >= start + length:
                raise
            self.note_damage({pack: damage.Finding({e.id for e in entries if e.offset + e.length > size})}, "read")
            raise IntegrityError(f"{key}: pack truncated to {size} bytes (needed for blob {entries[0].id.short()}; "
                                 f"recorded as damaged)") from exc

    def decode_or_note(self, stored: bytes | memoryview, entry: BlobEntry, key: str) -> bytes:
        """Decode a blob read from its pack; one that fails is read once more (a read
        garbled on its way is no damage), then recorded as damaged before the error goes
        up: what a read learns must change the next snapshot."""
        try:
            return decode_blob(stored, entry.id, key, self.cipher)
        except IntegrityError as exc:
            try:
                return decode_blob(self.backend.get(key, entry.offset, entry.length), entry.id, key, self.cipher)
            except IntegrityError:
                pass  # damaged twice: damage
            except EngineError:
                raise exc from None  # the second read failed to arrive: nothing is known
            self.note_damage({entry.pack: damage.Finding({entry.id})}, "read")
            raise IntegrityError(f"{exc} (recorded as damaged: the next snapshot stores it again from the source; "
                                 f"then run 'clubsnap repair packs')") from exc

    def _read_tree_pack(self, wanted: BlobEntry) -> bytes:
        """Fetch every tree blob of ``wanted``'s pack in one ranged GET and cache them all:
        a walk through a snapshot needs its neighbours next (a pack holds one snapshot's
        trees, written together), and a tree pack holds nothing else."""
        key = pack_key(wanted.pack)
        blobs = self.catalog.blobs_in_pack(wanted.pack) or [wanted]
        start, end = min(b.offset for b in blobs), max(b.offset + b.length for b in blobs)
        try:
            data = self._get_blobs(wanted.pack, start, end - start, blobs)
        except IntegrityError:
            if blobs == [wanted]:
                raise
            blobs, start = [wanted], wanted.offset  # a truncated pack may still hold this one
            data = self._get_blobs(wanted.pack, start, wanted.length, blobs)
        view = memoryview(data)
        raw = self.decode_or_note(view[wanted.offset - start:wanted.offset - start + wanted.length], wanted, key)
        # Cached as stored and checked again on every read, like a GET from the pack.
        self._cache_trees((bytes(b.id), bytes(view[b.offset - start:b.offset - start + b.length]))
                          for b in blobs if b.type == BlobType.TREE)
        return raw

    # ---- locks -----------------------------------------------------------------------------

    def lock(self, kind: str) -> Lock:
        """Take a lock of ``kind`` (see engine/locks.py); use as a context manager."""
        return Lock(self.backend, self.cipher, kind).acquire()

    def read_lock(self) -> Lock | None:
        """A read lock, when the credentials allow writing one: it makes a prune wait
        before deleting packs this reader may be about to read. Read-only access gets
        none, and a restore racing a prune that moves its blobs may then have to be rerun."""
        try:
            return self.lock("read")
        except EngineError:
            return None

    # ---- snapshots ----------------------------------------------------------------------------

    def save_snapshot(self, record: dict[str, Any], time: datetime) -> SnapshotInfo:
        """Make a snapshot visible: last, after every blob it needs is durable and indexed."""
        self.flush()
        data = seal_object(Kind.SNAPSHOT, record, self.cipher)
        snap_id = SnapshotId(digest(data))
        key = snapshot_key(time, snap_id)
        self.backend.put(key, data)
        self.catalog.add_snapshot(key, bytes(snap_id), _time_us(time), record, data)
        if self._listed_snapshots is not None and (self._listed_snapshots + 1) % self.summary_every == 0:
            try:
                self.write_summary()
            except (EngineError, sqlite3.Error):
                pass  # the snapshot is saved; the next summary will cover it (check reports damage)

        return SnapshotInfo(snap_id, key, time, record)

    def snapshot_keys(self) -> list[tuple[datetime, SnapshotId, str]]:
        """Every snapshot's time, id and key, oldest first, from one LIST: no record read."""
        keys = [(*parse_snapshot_key(key), key) for key, _ in self.backend.list(SNAPSHOT_PREFIX)]
        self._listed_snapshots = len(keys)
        return sorted(keys, key=lambda k: (k[0], k[2]))

    def load_snapshot(self, key: str) -> SnapshotInfo:
        """One snapshot record: from the catalog, or one GET checked against its id."""
        time, snap_id = parse_snapshot_key(key)
        record = self.catalog.snapshot_record(key)
        if record is None:
            data = self.backend.get(key)
            record = open_object(Kind.SNAPSHOT, data, key, self.cipher)
            if SnapshotId(digest(data)) != snap_id:
                raise IntegrityError(f"{key}: snapshot record does not match its id (corrupted)")
            check_snapshot_time(key, record)
            self.catalog.add_snapshot(key, bytes(snap_id), _time_us(time), record, data)
        return SnapshotInfo(snap_id, key, time, record)

    def snapshots(self, select: SnapshotFilter | None = None) -> list[SnapshotInfo]:
        """All snapshots (those ``select`` matches), oldest first: one LIST, and for
        records not cached, the newest summary, then a GET for each record it lacks (in
        parallel)."""
        keys = self.snapshot_keys()
        cached = self.catalog.snapshot_keys()
        self.catalog.remove_snapshots(cached - {key for _, _, key in keys})
        missing = {key for _, _, key in keys if key not in cached}
        if len(missing) >= SUMMARY_WORTH_READING:
            missing -= self._load_from_summary(missing)
        if len(missing) > 1 and self.backend.concurrency > 1:
            with ThreadPoolExecutor(self.backend.concurrency, thread_name_prefix="records") as pool:
                list(pool.map(self.snapshot_if_readable, sorted(missing)))
        return [snap for snap in map(self.snapshot_if_readable, (key for _, _, key in keys))
                if snap is not None and (select is None or select.matches(snap))]

    def snapshot_if_readable(self, key: str) -> SnapshotInfo | None:
        """A listed record, or None if it was deleted since the listing (forgotten), or is
        damaged: passed over with a warning, it blocks nothing that does not need it."""
        try:
            return self.load_snapshot(key)
        except ObjectNotFound:
            return None
        except (IntegrityError, UnsupportedFormat) as exc:
            self._pass_over(key, exc, "repair snapshots")
            return None

    def unreadable_snapshots(self) -> list[SnapshotInfo]:
        """The snapshot records passed over as damaged, by key only (no record): so that
        ``forget ID`` can remove one."""
        found = []
        for key in sorted(k for k in self.damaged_objects if k.startswith(SNAPSHOT_PREFIX)):
            time, snap_id = parse_snapshot_key(key)
            found.append(SnapshotInfo(snap_id, key, time, {"tree": bytes(32)}))
        return found

    def write_summary(self) -> str | None:
        """Write one object holding every snapshot record (as stored), then delete older
        summaries; returns its key (None: no snapshots, nothing written). Only an
        optimisation: a reader checks each record against its id and falls back to the
        record objects, so a stale, missing or damaged summary costs GETs, never
        correctness."""
        snaps = self.snapshots()
        if not snaps:
            return None
        entries = []
        for snap in snaps:
            sealed = self.catalog.snapshot_sealed(snap.key)  # the record as stored
            if sealed is None or SnapshotId(digest(sealed)) != snap.id:
                sealed = self.backend.get(snap.key)
            entries.append([snap.key, sealed])
        data = seal_object(Kind.SNAPSHOT_SUMMARY, {"snapshots": entries}, self.cipher)
        key = summary_key(snaps[-1].time, digest(data))
        # Older summaries go, and one of the same time (written before a forget): the new
        # one holds a subset of its records. A newer one, by a concurrent writer, stays.
        stamp = key.rsplit("_", 1)[0]
        older = [k for k, _ in self.backend.list(SUMMARY_PREFIX) if k.rsplit("_", 1)[0] <= stamp and k != key]
        self.backend.put(key, data)
        for stale in older:
            self.backend.delete(stale)
        return key

    def _load_from_summary(self, wanted: set[str]) -> set[str]:
        """Catalog the wanted records the newest summary holds; returns their keys."""
        summaries = sorted(k for k, _ in self.backend.list(SUMMARY_PREFIX))
        if not summaries:
            return set()
        try:
            record = open_object(Kind.SNAPSHOT_SUMMARY, self.backend.get(summaries[-1]), summaries[-1], self.cipher)
        except (ObjectNotFound, IntegrityError, UnsupportedFormat):
            return set()  # deleted by a newer summary meanwhile, or damaged: read the records
        found = set()
        for key, sealed in record.get("snapshots", []):
            if key not in wanted:
                continue
            time, snap_id = parse_snapshot_key(key)
            if SnapshotId(digest(sealed)) != snap_id:
                continue
            snapshot = open_object(Kind.SNAPSHOT, sealed, key, self.cipher)
            check_snapshot_time(key, snapshot)
            self.catalog.add_snapshot(key, bytes(snap_id), _time_us(time), snapshot, sealed)
            found.add(key)
        return found

    def find_snapshot(self, ref: str, select: SnapshotFilter | None = None) -> SnapshotInfo:
        """A snapshot by full or unique-prefix hex id, or ``latest`` (the newest that
        ``select`` matches: records are read newest first, until one matches)."""
        keys = self.snapshot_keys()
        if not keys:
            raise SnapshotNotFound(f"the repository at {self.backend.location} has no snapshots")
        if ref == "latest":
            return self._newest(keys, select, "")
        matches = [key for _, snap_id, key in keys if snap_id.hex().startswith(ref.lower())]
        if len(matches) != 1:
            what = "matches no snapshot" if not matches else "is ambiguous"
            raise SnapshotNotFound(f"snapshot id {ref!r} {what}")
        return self.load_snapshot(matches[0])

    def snapshot_at(self, when: datetime, select: SnapshotFilter | None = None) -> SnapshotInfo:
        """The newest snapshot taken at or before ``when`` that ``select`` matches."""
        keys = self.snapshot_keys()
        eligible = [k for k in keys if k[0] <= when]
        if not eligible:
            oldest = keys[0][0].isoformat() if keys else "none"
            raise SnapshotNotFound(f"no snapshot at or before {when.isoformat()} (oldest: {oldest})")
        return self._newest(eligible, select, f" at or before {when.isoformat()}")

    def _newest(self, keys: list[tuple[datetime, SnapshotId, str]], select: SnapshotFilter | None,
                when: str) -> SnapshotInfo:
        for _, _, key in reversed(keys):
            snap = self.snapshot_if_readable(key)  # forgotten since the listing, or damaged: the one before
            if snap is not None and (select is None or select.matches(snap)):
                return snap
        raise SnapshotNotFound(f"no snapshot{when} {select.describe() if select else ''}".rstrip())

    # ---- failure -------------------------------------------------------------------------

    def start_session(self) -> None:
        """Begin a write session (one snapshot): blobs of earlier sessions are found in
        the catalog from now on, not in this object's memory. A long-lived process takes
        many snapshots, and a prune may condemn what an earlier one stored."""
        self.flush()
        with self._lock:
            self._session_ids = set()
            self._uploaded = {}
            self._session_packs = {}

    def discard_unwritten(self) -> None:
        """Forget blobs of this session that never reached storage (after a failed run),
        so a retry with this object uploads them instead of trusting they exist."""
        self._wait_for_uploads(raise_errors=False)
        with self._lock:
            # Packs stored but not indexed are left for prune: indexing them later, under
            # another lock, could name packs a prune deleted in between.
            for _, _, entries in self._unindexed:
                for entry in entries:
                    self._uploaded.pop(entry.id, None)
            self._unindexed = []
            self._upload_error = None
            self._session_ids = set(self._uploaded)
            self._builders = {t: PackBuilder(t, self.cipher) for t in BlobType}


def _packs_and_entries(record: dict[str, Any]) -> tuple[dict[PackId, int], list[BlobEntry]]:
    """The packs (with sizes) and blob entries of an index object or a garbage record."""
    packs: dict[PackId, int] = {}
    entries: list[BlobEntry] = []
    for pack in record["packs"]:
        pack_id = PackId(pack["id"])
        packs[pack_id] = int(pack["size"])
        entries.extend(BlobEntry.from_row(pack_id, row) for row in pack["blobs"])
    return packs, entries


def check_snapshot_time(key: str, record: dict[str, Any]) -> None:
    """The time in a snapshot's key is not covered by its id (the id hashes the record),
    so it is held to the record's own, authenticated, time: a copy under another time
    must not pass for a newer snapshot."""
    try:
        recorded = datetime.fromisoformat(str(record["time"]))
    except (KeyError, ValueError) as exc:
        raise IntegrityError(f"{key}: snapshot record has no valid time") from exc
    if recorded != parse_snapshot_key(key)[0]:
        raise IntegrityError(f"{key}: the time in the name differs from the record's ({recorded.isoformat()})")


ENCRYPTED_LOCATIONS = "encrypted-locations"  # in the cache root: locations known to be encrypted


def _location_mark(location: str) -> str:
    return digest(location.encode()).hex()


def _remember_encrypted(cache_root: Path, location: str) -> None:
    """Note that ``location`` holds an encrypted repository, in a file 0600 in a cache
    root 0700 (docs/security.md, "File permissions"): it tells which locations this host
    backs up."""
    import os  # the one user of os in this module

    try:
        path = cache_root / ENCRYPTED_LOCATIONS
        if not _was_encrypted(cache_root, location):
            cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as handle:
                handle.write(_location_mark(location) + "\n")
    except OSError:
        pass  # a memory only: the key slots in the repository are the main guard


def _was_encrypted(cache_root: Path, location: str) -> bool:
    try:
        return _location_mark(location) in (cache_root / ENCRYPTED_LOCATIONS).read_text().split()
    except OSError:
        return False


def _time_us(time: datetime) -> int:
    return (time - EPOCH) // timedelta(microseconds=1)
