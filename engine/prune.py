"""Prune: delete the packs no snapshot needs, repack mostly-garbage ones, consolidate the index.

Safe beside running snapshots and restores, on this host or another, without blocking
them. The protocol (docs/format.md §10) is two-phase, as in kopia and rustic:

1. **Mark.** Walk every snapshot into a set of used blob ids (a table in the catalog's
   temporary database, so memory does not grow with the repository). Packs with no used
   blob, and packs whose garbage is worth it (``max_unused``), are *condemned*: the used
   blobs of the latter are copied into new packs first. A new set of index objects names
   every live pack; then a garbage record lists the condemned packs with their blobs;
   only then are the old index objects deleted. From that moment no process that starts
   can see a condemned blob as stored, so no new snapshot dedups against one.
2. **Sweep.** The processes that were running when the old index was deleted might have
   seen condemned blobs as stored. Their locks are written into the garbage record; its
   packs are deleted once all of them are gone (prune waits for them a while, otherwise
   the next prune sweeps). Before deleting, the snapshots are listed again: a snapshot
   that finished meanwhile and uses a condemned blob gets its pack re-indexed instead.
   Readers take blobs from condemned packs meanwhile (the garbage record says where).

Killed at any point, prune leaves a repository where every snapshot's blobs are indexed
or in a condemned pack still stored; a later prune finishes the work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

from . import locks
from .errors import IntegrityError, ObjectNotFound, RepositoryLocked
from .format import (
    DATA_PREFIX, GARBAGE_PREFIX, ID_SIZE, BlobType, ChunkId, Kind, PackId, decode_blob, digest, index_key,
    pack_key, seal_object, unpack_record,
)
from .packs import BlobEntry
from .pagemap import load_page_ids, map_blobs
from .repository import Repository, SnapshotInfo

INDEX_ENTRIES_PER_OBJECT = 100_000  # ~5 MB per consolidated index object
USED_BATCH = 20_000
SMALL_PACK_FRACTION = 4  # a pack below 1/4 of the target size is small: merged with others
WAIT_POLL_S = 2.0
# Estimated bytes a blob costs in a pack beyond its stored bytes (its trailer row), and a
# pack beyond its blobs (header, footer, trailer envelope): for the dry run's prediction.
TRAILER_ROW_BYTES = 48
PACK_OVERHEAD_BYTES = 64


@dataclass
class PruneOptions:
    max_unused: float = 0.05   # garbage tolerated in kept packs, as a fraction of the used bytes
    dry_run: bool = False
    wait_s: float = 300.0      # how long to wait for running processes before sweeping
    progress: Callable[[str], None] | None = None


@dataclass
class PruneReport:
    snapshots: int = 0
    packs: int = 0
    pack_bytes: int = 0
    used_blobs: int = 0
    used_bytes: int = 0
    unused_packs: int = 0           # live packs without a used blob
    unused_bytes: int = 0
    repack_packs: int = 0
    repack_bytes: int = 0
    repack_used_bytes: int = 0      # what repacking copies
    repack_small_packs: int = 0     # of the repacked: small packs merged
    unindexed_packs: int = 0        # left by killed runs
    unindexed_bytes: int = 0
    swept_earlier_packs: int = 0    # condemned by an earlier prune, deleted now
    swept_earlier_bytes: int = 0
    rescued_packs: int = 0          # condemned earlier, needed by a snapshot that finished since
    pending_packs: int = 0          # condemned, waiting for running processes
    pending_bytes: int = 0
    garbage_left_bytes: int = 0     # unused blob bytes staying in kept packs
    predicted_freed_bytes: int = 0
    freed_bytes: int = 0            # pack bytes deleted, less the pack bytes repacking wrote
    packs_deleted: int = 0
    index_objects_before: int = 0
    index_objects_after: int = 0
    waited_for: list[str] = field(default_factory=list)
    stale_locks_removed: int = 0
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prune(repo: Repository, options: PruneOptions) -> PruneReport:
    """Plan, and unless ``options.dry_run``, carry out a prune (see the module docstring)."""
    if options.dry_run:
        return _Pruner(repo, options).run()  # writes nothing, so needs no lock
    with repo.lock("prune") as own:
        _refuse_concurrent_prune(repo, own)
        return _Pruner(repo, options).run()


def _refuse_concurrent_prune(repo: Repository, own: locks.Lock) -> None:
    others, _ = locks.live_locks(repo.backend, repo.cipher, ("prune",))
    others = [lock for lock in others if lock.key != own.key]
    if others:
        raise RepositoryLocked(f"another prune is running ({others[0].describe()}); "
                               f"if it is dead, its lock goes stale within {locks.STALE_AFTER}")


class _Pruner:
    def __init__(self, repo: Repository, options: PruneOptions) -> None:
        self.repo = repo
        self.catalog = repo.catalog
        self.options = options
        self.report = PruneReport(dry_run=options.dry_run)
        self.used = UsedSet(repo)
        self.own_index: set[str] = set()  # index objects the repack wrote (superseded at once)

    def say(self, text: str) -> None:
        if self.options.progress:
            self.options.progress(text)

    def run(self) -> PruneReport:
        report = self.report
        repo = self.repo
        # Which earlier garbage records may be swept is decided before the snapshots are
        # listed, so a process that finishes in between has its snapshot in the listing.
        # The index is read after that listing: it then names every blob they need.
        running = self._running_processes()
        snapshots = repo.snapshots()
        repo.sync_index()
        report.warnings += repo.garbage_warnings
        old_index = self.catalog.index_object_names()
        report.index_objects_before = len(old_index)
        earlier = self._earlier_garbage()
        sweepable = {name for name, record in earlier.items() if _may_sweep(record, running)}
        report.snapshots = len(snapshots)
        self.say(f"marking blobs used by {len(snapshots)} snapshot(s)")
        for snap in snapshots:
            self.used.mark_snapshot(snap)
        self.used.flush()
        plan = self._plan(sweepable)
        if self.options.dry_run:
            return report

        written_before = replace(repo.stats)
        moved = self._repack(plan.repack)
        new_index = self._write_index(plan, moved)
        garbage_name = self._write_garbage(plan.condemned, waiting_for=None)
        self.catalog.replace_index(new_index, self._new_pack_sizes(plan, moved), "temp.prune_new_blobs",
                                   "temp.prune_dropped")
        if garbage_name:
            repo.read_garbage(garbage_name, catalog=True)
        # An unchanged index consolidates to the same bytes, hence the same name, in a
        # plain repository: what was just written is never among what goes.
        superseded = (old_index | self.own_index) - set(new_index)
        self.say(f"deleting {len(superseded)} superseded index object(s)")
        for name in sorted(superseded):
            repo.backend.delete(index_key(bytes.fromhex(name)))
        report.index_objects_after = len(new_index)

        self._sweep_earlier(plan, sweepable)
        if garbage_name:
            self._sweep_new(garbage_name, {s.key for s in snapshots})
        report.stale_locks_removed = len(locks.remove_stale(repo.backend, repo.cipher))
        report.freed_bytes -= repo.stats.since(written_before).pack_bytes_written  # net of the repack's packs
        return report

    # ---- planning -------------------------------------------------------------------------

    def _running_processes(self) -> set[str]:
        """Lock keys of running snapshots and readers; unreadable locks count as running."""
        found, unreadable = locks.live_locks(self.repo.backend, self.repo.cipher, ("snapshot", "read"))
        return {lock.key for lock in found} | set(unreadable)

    def _earlier_garbage(self) -> dict[str, dict[str, Any]]:
        records = {}
        for name in self.catalog.garbage_names():
            try:
                records[name] = self.repo.read_garbage(name)
            except ObjectNotFound:
                continue
        return records

    def _plan(self, sweepable: set[str]) -> "_Plan":
        report, catalog = self.report, self.catalog
        stored = {PackId.from_hex(key.rsplit("/", 1)[-1]): size for key, size in self.repo.backend.list(DATA_PREFIX)}
        live = catalog.packs()
        condemned = catalog.condemned_packs()
        report.packs, report.pack_bytes = len(stored), sum(stored.values())
        plan = _Plan()
        usage = catalog.execute(
            "SELECT b.pack, COUNT(u.id), COALESCE(SUM(CASE WHEN u.id IS NULL THEN 0 ELSE b.length END), 0), "
            "COALESCE(SUM(CASE WHEN u.id IS NULL THEN b.length ELSE 0 END), 0), MIN(b.type) "
            "FROM blobs b LEFT JOIN temp.prune_used u ON u.id = b.id GROUP BY b.pack")
        per_pack = {PackId(row[0]): (row[1], row[2], row[3]) for row in usage}
        pack_type = {PackId(row[0]): row[4] for row in usage}
        candidates = []
        for pack, size in live.items():
            used_count, used_bytes, garbage = per_pack.get(pack, (0, 0, 0))
            report.used_blobs += used_count
            report.used_bytes += used_bytes
            if used_count == 0:
                plan.condemned[pack] = size
                report.unused_packs += 1
                report.unused_bytes += size
            elif garbage:
                candidates.append((garbage / size, pack, size, used_count, used_bytes, garbage))
        # Repack the worst packs first until the garbage left is within the bound.
        garbage_left = sum(c[5] for c in candidates)
        limit = self.options.max_unused * report.used_bytes
        for _, pack, size, used_count, used_bytes, garbage in sorted(candidates, reverse=True):
            if garbage_left <= limit:
                break
            self._choose_repack(plan, pack, size, used_count, used_bytes)
            garbage_left -= garbage
        report.garbage_left_bytes = garbage_left
        # Frequent snapshots each leave a small pack or two; merged, they cost a request
        # each instead of dozens (restores, checks). Each byte is merged a bounded number
        # of times: a merged pack stops being small once it reaches a quarter of the target.
        small: dict[int, list[PackId]] = {}
        for pack, size in live.items():
            if pack not in plan.condemned and size < self.repo.config.pack_size // SMALL_PACK_FRACTION:
                small.setdefault(pack_type[pack], []).append(pack)
        for packs in small.values():
            if len(packs) >= 2 and self.options.max_unused != float("inf"):  # unlimited: no repacking at all
                for pack in packs:
                    used_count, used_bytes, garbage = per_pack[pack]
                    self._choose_repack(plan, pack, live[pack], used_count, used_bytes)
                    report.repack_small_packs += 1
                    report.garbage_left_bytes -= garbage
        plan.repack_new_bytes += PACK_OVERHEAD_BYTES * -(-plan.repack_new_bytes // self.repo.config.pack_size)
        for pack, size in stored.items():
            if pack not in live and pack not in condemned:
                plan.condemned[pack] = size  # a killed run's: no index names it
                report.unindexed_packs += 1
                report.unindexed_bytes += size
        # Earlier garbage: rescued if a snapshot uses a blob in it, kept if indexed again.
        for pack, (size, name) in condemned.items():
            if name not in sweepable:
                if pack in stored:
                    report.pending_packs += 1
                    report.pending_bytes += size
                continue
            if pack in live:
                continue
            if catalog.execute("SELECT 1 FROM condemned_blobs c JOIN temp.prune_used u ON u.id = c.id "
                               "WHERE c.pack = ? AND c.id NOT IN (SELECT id FROM blobs) LIMIT 1", [bytes(pack)]):
                plan.rescue[pack] = size
                report.rescued_packs += 1
            elif pack in stored:
                plan.sweep[pack] = size
                report.swept_earlier_packs += 1
                report.swept_earlier_bytes += size
        report.predicted_freed_bytes = (sum(plan.condemned.values()) - plan.repack_new_bytes
                                        + sum(plan.sweep.values()))
        return plan

    def _choose_repack(self, plan: "_Plan", pack: PackId, size: int, used_count: int, used_bytes: int) -> None:
        plan.repack[pack] = size
        plan.condemned[pack] = size
        self.report.repack_packs += 1
        self.report.repack_bytes += size
        self.report.repack_used_bytes += used_bytes
        plan.repack_new_bytes += used_bytes + used_count * TRAILER_ROW_BYTES

    # ---- execution ------------------------------------------------------------------------

    def _repack(self, packs: dict[PackId, int]) -> list[BlobEntry]:
        """Copy the used blobs of ``packs`` into new packs; returns their new entries."""
        repo = self.repo
        repo.start_session()
        live_before = set(self.catalog.packs())
        for number, pack in enumerate(sorted(packs), 1):
            self.say(f"repacking {number}/{len(packs)}")
            entries = [BlobEntry(ChunkId(r[0]), BlobType(r[1]), pack, r[2], r[3], r[4]) for r in self.catalog.execute(
                "SELECT b.id, b.type, b.offset, b.length, b.raw_length FROM blobs b "
                "JOIN temp.prune_used u ON u.id = b.id WHERE b.pack = ? ORDER BY b.offset", [bytes(pack)])]
            key = pack_key(pack)
            try:
                data = memoryview(repo.backend.get(key))
            except ObjectNotFound as exc:
                raise IntegrityError(f"{key}: pack missing (needed for {len(entries)} used blob(s)); run "
                                     f"'clubsnap check' before pruning") from exc
            for entry in entries:
                stored = data[entry.offset:entry.offset + entry.length]
                decode_blob(stored, entry.id, key, repo.cipher)  # never copy a damaged blob on
                repo.copy_blob(entry, stored)
        before = set(self.catalog.index_object_names())
        repo.flush()
        self.own_index = self.catalog.index_object_names() - before
        return [e for e in repo.session_entries() if e.pack not in live_before]

    def _write_index(self, plan: "_Plan", moved: list[BlobEntry]) -> list[str]:
        """Write index objects naming every live blob once; returns their names."""
        catalog = self.catalog
        catalog.execute("CREATE TEMP TABLE IF NOT EXISTS prune_dropped (id BLOB PRIMARY KEY)")
        catalog.execute("DELETE FROM temp.prune_dropped")
        catalog.executemany("INSERT INTO temp.prune_dropped VALUES (?)", [(bytes(p),) for p in plan.condemned])
        catalog.execute("CREATE TEMP TABLE IF NOT EXISTS prune_new_blobs (id BLOB PRIMARY KEY, type INTEGER, "
                        "pack BLOB, offset INTEGER, length INTEGER, raw_length INTEGER)")
        catalog.execute("DELETE FROM temp.prune_new_blobs")
        catalog.executemany("INSERT OR REPLACE INTO temp.prune_new_blobs VALUES (?, ?, ?, ?, ?, ?)",
                            [(bytes(e.id), int(e.type), bytes(e.pack), e.offset, e.length, e.raw_length)
                             for e in moved])
        for pack in plan.rescue:
            catalog.execute("INSERT OR IGNORE INTO temp.prune_new_blobs SELECT * FROM condemned_blobs WHERE pack = ?",
                            [bytes(pack)])
        sizes = catalog.packs() | {p: size for p, size in plan.rescue.items()}
        rows = catalog.iterate(
            "SELECT id, type, pack, offset, length, raw_length FROM ("
            " SELECT * FROM blobs WHERE pack NOT IN (SELECT id FROM temp.prune_dropped)"
            "  AND id NOT IN (SELECT id FROM temp.prune_new_blobs)"
            " UNION ALL SELECT * FROM temp.prune_new_blobs) ORDER BY pack")
        names = []
        for batch in _index_batches(rows, sizes):
            data = seal_object(Kind.INDEX, {"packs": batch}, self.repo.cipher)
            name = digest(data)
            self.repo.backend.put(index_key(name), data)
            names.append(name.hex())
        self.say(f"wrote {len(names)} index object(s)")
        return names

    def _new_pack_sizes(self, plan: "_Plan", moved: list[BlobEntry]) -> list[tuple[bytes, int]]:
        packs = self.catalog.packs()
        new = {e.pack for e in moved}
        return [(bytes(p), packs[p]) for p in new if p in packs] + [(bytes(p), s) for p, s in plan.rescue.items()]

    def _write_garbage(self, packs: dict[PackId, int], waiting_for: list[str] | None) -> str | None:
        if not packs:
            return None
        entries: dict[PackId, list[list[object]]] = {p: [] for p in packs}
        for pack in packs:
            entries[pack] = [[r[0], r[1], r[2], r[3], r[4]] for r in self.catalog.execute(
                "SELECT id, type, offset, length, raw_length FROM blobs WHERE pack = ?", [bytes(pack)])]
        return self._put_garbage({"time": datetime.now(timezone.utc).isoformat(), "host": locks.this_host(),
                                  "waiting_for": waiting_for,
                                  "packs": [{"id": bytes(p), "size": s, "blobs": entries[p]}
                                            for p, s in sorted(packs.items())]})

    def _put_garbage(self, record: dict[str, Any]) -> str:
        data = seal_object(Kind.GARBAGE, record, self.repo.cipher)
        name = digest(data).hex()
        self.repo.backend.put(f"{GARBAGE_PREFIX}{name}", data)
        return name

    def _delete_packs(self, packs: Iterable[PackId], sizes: dict[PackId, int]) -> None:
        for pack in packs:
            self.repo.backend.delete(pack_key(pack))
            self.report.packs_deleted += 1
            self.report.freed_bytes += sizes.get(pack, 0)

    def _sweep_earlier(self, plan: "_Plan", sweepable: set[str]) -> None:
        """Earlier garbage whose processes are gone: delete its packs (the rescued ones
        are in the new index already), then the record."""
        if not sweepable:
            return
        self._delete_packs(sorted(plan.sweep), plan.sweep)
        for name in sorted(sweepable):
            self.repo.backend.delete(f"{GARBAGE_PREFIX}{name}")
        self.catalog.remove_garbage(sweepable)

    def _sweep_new(self, name: str, marked: set[str]) -> None:
        """Sweep this run's garbage once the processes that may have seen its packs as
        live are gone, or hand it on to the next prune with their list."""
        repo, report = self.repo, self.report
        waiting = self._running_processes()
        deadline = time.monotonic() + self.options.wait_s
        while waiting and time.monotonic() < deadline:
            self.say(f"waiting for {len(waiting)} running snapshot(s)/restore(s) before deleting")
            time.sleep(WAIT_POLL_S)
            waiting &= self._running_processes()
        report.waited_for = sorted(waiting)
        record = repo.read_garbage(name)
        if waiting:
            self._put_garbage(record | {"waiting_for": sorted(waiting)})
            repo.backend.delete(f"{GARBAGE_PREFIX}{name}")
            repo.sync_index()
            report.pending_packs += len(record["packs"])
            report.pending_bytes += sum(int(p["size"]) for p in record["packs"])
            return
        # Everything that may have used these packs has finished: its snapshot is listed.
        snapshots = repo.snapshots()
        repo.sync_index()
        for snap in snapshots:
            if snap.key not in marked:
                self.used.mark_snapshot(snap)
        self.used.flush()
        live = self.catalog.packs()
        rescue = []
        doomed: dict[PackId, int] = {}
        for pack in record["packs"]:
            pack_id, size = PackId(pack["id"]), int(pack["size"])
            if pack_id in live:
                continue  # indexed again meanwhile
            # Rescued only for a used blob that is nowhere else (a repacked blob is used,
            # but its copy in the new pack serves).
            if any(self.used.contains(row[0]) and not self.catalog.has_blob(row[0]) for row in pack["blobs"]):
                rescue.append(pack)
            else:
                doomed[pack_id] = size
        if rescue:
            data = seal_object(Kind.INDEX, {"packs": rescue}, repo.cipher)
            repo.backend.put(index_key(digest(data)), data)
            report.rescued_packs += len(rescue)
        self._delete_packs(sorted(doomed), doomed)
        repo.backend.delete(f"{GARBAGE_PREFIX}{name}")
        repo.sync_index()


@dataclass
class _Plan:
    condemned: dict[PackId, int] = field(default_factory=dict)  # to delete after the sweep protocol
    repack: dict[PackId, int] = field(default_factory=dict)     # condemned, after copying their used blobs
    rescue: dict[PackId, int] = field(default_factory=dict)     # earlier garbage a snapshot needs
    sweep: dict[PackId, int] = field(default_factory=dict)      # earlier garbage to delete now
    repack_new_bytes: int = 0


def _may_sweep(record: dict[str, Any], running: set[str]) -> bool:
    """A garbage record may be swept once none of the processes it waits for runs. One
    without that list (its prune was killed before writing it) waits for every process
    running now: any of them may have seen its packs as live."""
    waiting_for = record.get("waiting_for")
    if waiting_for is None:
        return not running
    return not (set(waiting_for) & running)


def _index_batches(rows: Iterable[tuple[Any, ...]], sizes: dict[PackId, int]) -> Iterator[list[dict[str, Any]]]:
    """Index records of at most INDEX_ENTRIES_PER_OBJECT blobs from rows sorted by pack."""
    batch: list[dict[str, Any]] = []
    count = 0
    current: dict[str, Any] | None = None
    for blob_id, blob_type, pack, offset, length, raw_length in rows:
        if current is None or current["id"] != pack:
            if count >= INDEX_ENTRIES_PER_OBJECT:
                yield batch
                batch, count = [], 0
            current = {"id": bytes(pack), "size": sizes[PackId(pack)], "blobs": []}
            batch.append(current)
        current["blobs"].append([bytes(blob_id), blob_type, offset, length, raw_length])
        count += 1
    if batch:
        yield batch


class UsedSet:
    """The blob ids some snapshot uses, in a temporary table of the catalog: SQLite keeps
    it on disk past its page cache, so millions of ids cost disk, not memory."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.catalog = repo.catalog
        self.catalog.execute("CREATE TEMP TABLE IF NOT EXISTS prune_used (id BLOB PRIMARY KEY) WITHOUT ROWID")
        self.catalog.execute("DELETE FROM temp.prune_used")
        self._pending: list[tuple[bytes]] = []
        self._last_pages: dict[bytes, bytearray] = {}  # database path -> page ids last marked

    def add(self, blob_id: bytes | bytearray) -> None:
        self._pending.append((bytes(blob_id),))
        if len(self._pending) >= USED_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.catalog.executemany("INSERT OR IGNORE INTO temp.prune_used VALUES (?)", self._pending)
            self._pending = []

    def contains(self, blob_id: bytes) -> bool:
        return bool(self.catalog.execute("SELECT 1 FROM temp.prune_used WHERE id = ?", [bytes(blob_id)]))

    def _claim(self, blob_id: bytes) -> bool:
        """Mark a tree-like blob; False if it was marked already (with all below it)."""
        if self.contains(blob_id):
            return False
        self.catalog.execute("INSERT INTO temp.prune_used VALUES (?)", [bytes(blob_id)])
        return True

    def mark_snapshot(self, snap: SnapshotInfo) -> None:
        """Every blob the snapshot needs: its trees, file chunks, page maps and pages. A
        tree already marked was marked with everything under it, so a snapshot costs what
        changed since the ones marked before it."""
        stack = [(b"", snap.tree)]
        while stack:
            prefix, tree_id = stack.pop()
            if not self._claim(tree_id):
                continue
            record = unpack_record(self.repo.read_blob(tree_id), f"tree {tree_id.short()}")
            parts = [ChunkId(p) for p in record.get("parts", [])]
            entries = list(record.get("entries", []))
            for part in parts:
                self.add(part)
                entries += unpack_record(self.repo.read_blob(part), f"tree {part.short()}")["entries"]
            for entry in entries:
                path = prefix + entry["name"]
                if entry["type"] == "dir":
                    stack.append((path + b"/", ChunkId(entry["tree"])))
                elif entry["type"] == "file":
                    if "page_map" in entry:
                        self._mark_page_map(path, ChunkId(entry["page_map"]))
                    else:
                        for chunk in entry["chunks"]:
                            self.add(chunk)

    def _mark_page_map(self, path: bytes, map_id: ChunkId) -> None:
        if not self._claim(map_id):
            return
        for blob in map_blobs(self.repo, map_id):
            self.add(blob)
        ids = load_page_ids(self.repo, map_id)
        previous = self._last_pages.get(path, bytearray())
        # Consecutive maps of a database differ in a few pages: only those are inserted
        # (whole equal runs of ids are compared at C speed).
        block = 1024 * ID_SIZE
        for start in range(0, len(ids), block):
            if ids[start:start + block] == previous[start:start + block]:
                continue
            for at in range(start, min(start + block, len(ids)), ID_SIZE):
                if ids[at:at + ID_SIZE] != previous[at:at + ID_SIZE]:
                    self.add(ids[at:at + ID_SIZE])
        self._last_pages[path] = ids
