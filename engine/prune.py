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

Prune decides from a private copy of the index (processes sharing the local catalog
may rebuild it meanwhile) and from the garbage records' own blob lists. Killed at any
point, it leaves a repository where every snapshot's blobs are indexed or in a condemned
pack still stored; a later prune finishes the work.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

from . import damage, locks
from .errors import IntegrityError, ObjectNotFound, RepositoryLocked, UnsupportedFormat
from .format import (
    DATA_PREFIX, GARBAGE_PREFIX, ID_SIZE, BlobType, ChunkId, Kind, PackId, digest, index_key,
    pack_key, seal_object, unpack_record,
)
from .packs import BlobEntry, read_trailer
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
    # Set, it ends the wait early, as if ``wait_s`` had passed: a long-lived process that
    # is asked to stop (``clubsnap run`` on SIGTERM) must not sit out a wait of minutes.
    stop: threading.Event | None = None


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
        refuse_concurrent_prune(repo, own)
        repo.held_lock = own
        try:
            return _Pruner(repo, options, own).run()
        except BaseException:
            repo.discard_unwritten()  # a failed upload must not fail the next command of a long-lived process
            raise
        finally:
            repo.held_lock = None


def _refuse_beside_damaged_objects(repo: Repository) -> None:
    """A damaged index object hides where its blobs are, a damaged snapshot record what
    it uses: prune would take both for garbage and delete data that a repair could still
    bring back. Repair first."""
    if repo.damaged_objects:
        key, reason = next(iter(sorted(repo.damaged_objects.items())))
        repair = "repair index" if key.startswith("index/") else "repair snapshots"
        raise IntegrityError(f"prune refused: {len(repo.damaged_objects)} damaged index object(s) or snapshot "
                             f"record(s), first {key}; run 'clubsnap {repair}' first")


def refuse_concurrent_prune(repo: Repository, own: locks.Lock) -> None:
    others, _ = locks.live_locks(repo.backend, repo.cipher, ("prune",))
    others = [lock for lock in others if lock.key != own.key]
    if others:
        raise RepositoryLocked(f"another prune is running ({others[0].describe()}); "
                               f"if it is dead, its lock goes stale within {locks.STALE_AFTER}")


class _Pruner:
    """One prune run. Its working set lives in temporary tables of the catalog's SQLite
    connection (``temp.prune_*``): the used set, and a private copy of the index taken
    in one read, which no other process sharing the catalog can clear or reload under it."""

    def __init__(self, repo: Repository, options: PruneOptions, own: locks.Lock | None = None) -> None:
        self.repo = repo
        self.catalog = repo.catalog
        self.options = options
        self.own = own
        self.report = PruneReport(dry_run=options.dry_run)
        self.used = UsedSet(repo)
        self.sql = self.catalog.execute

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
        listed_index = self._private_index()
        _refuse_beside_damaged_objects(repo)
        report.warnings += repo.garbage_warnings + repo.damage_warnings
        report.index_objects_before = len(listed_index)
        earlier = self._earlier_garbage()
        sweepable = {name for name, (waiting_for, _) in earlier.items() if _may_sweep(waiting_for, running)}
        report.snapshots = len(snapshots)
        self.say(f"marking blobs used by {len(snapshots)} snapshot(s)")
        for snap in snapshots:
            self.used.mark_snapshot(snap)
        self.used.flush()
        plan = self._plan(earlier, sweepable)
        if self.options.dry_run:
            return report

        written_before = replace(repo.stats)
        own_index = self._repack(plan.repack)
        new_index = self._write_index(plan)
        garbage = self._write_garbage(plan.condemned)  # step 4: before the old index goes
        self._ensure_held()
        self.catalog.replace_index(
            new_index,
            "SELECT * FROM temp.prune_blobs WHERE pack NOT IN (SELECT id FROM temp.prune_dropped) "
            "AND id NOT IN (SELECT id FROM temp.prune_new_blobs) UNION ALL SELECT * FROM temp.prune_new_blobs",
            "SELECT * FROM temp.prune_packs WHERE id NOT IN (SELECT id FROM temp.prune_dropped) "
            "UNION SELECT id, size FROM temp.prune_new_packs")
        # Step 5. Only what this run listed or wrote goes (an index object another process
        # wrote since stays); in a plain repository an unchanged index consolidates to the
        # same bytes, hence the same name: what was just written never goes.
        superseded = (listed_index | own_index) - set(new_index)
        self._ensure_held()
        self.say(f"deleting {len(superseded)} superseded index object(s)")
        for name in sorted(superseded):
            repo.backend.delete(index_key(bytes.fromhex(name)))
        report.index_objects_after = len(new_index)

        self._sweep_earlier(plan, sweepable)
        self._hand_on_unlisted(earlier, running)
        if garbage:
            self._sweep_new(garbage, {s.key for s in snapshots})
        repo.sync_index()
        damage.remove_settled(repo.backend, self.catalog)
        report.stale_locks_removed = len(locks.remove_stale(repo.backend, repo.cipher))
        report.freed_bytes -= repo.stats.since(written_before).pack_bytes_written  # net of the repack's packs
        return report

    def _ensure_held(self) -> None:
        """Before deleting: a prune whose own lock lapsed may have a second one beside it."""
        if self.own is not None:
            self.own.ensure_held()

    # ---- planning -------------------------------------------------------------------------

    def _private_index(self) -> set[str]:
        """Refresh the catalog, then copy its index into ``temp.prune_blobs/packs`` in one
        read; returns the index objects listed. The copy must hold every one of them: a
        process on this host may have cleared the catalog in between (then again)."""
        for _ in range(5):
            listed = self.repo.sync_index()
            held = self.catalog.copy_index("temp.prune_blobs", "temp.prune_packs")
            if listed <= held:
                self.sql("CREATE INDEX temp.prune_blobs_id ON prune_blobs (id)")
                self.sql("CREATE INDEX temp.prune_blobs_pack ON prune_blobs (pack)")
                return listed
        raise RepositoryLocked("the local catalog kept being rebuilt by another process (a 'cache --rebuild'?); "
                               "prune again when it has finished")

    def _running_processes(self) -> set[str]:
        """Lock keys of running snapshots and readers; unreadable locks count as running."""
        found, unreadable = locks.live_locks(self.repo.backend, self.repo.cipher, ("snapshot", "read"))
        return {lock.key for lock in found} | set(unreadable)

    def _earlier_garbage(self) -> dict[str, tuple[list[str] | None, dict[PackId, int]]]:
        """Every garbage record: whom it waits for, and its packs with their sizes (its
        blob lists are read again, one record at a time, only when it is swept)."""
        records = {}
        for key, _ in self.repo.backend.list(GARBAGE_PREFIX):
            name = key[len(GARBAGE_PREFIX):]
            try:
                record = self.repo.read_garbage(name)
            except ObjectNotFound:
                continue
            except (IntegrityError, UnsupportedFormat) as exc:
                # Its packs look unindexed below: condemned anew, with their trailers' lists.
                self.report.warnings.append(f"{exc} (its packs are condemned again)")
                continue
            waiting_for = record.get("waiting_for")
            records[name] = (None if waiting_for is None else [str(k) for k in waiting_for],
                             {PackId(p["id"]): int(p["size"]) for p in record["packs"]})
        return records

    def _plan(self, earlier: dict[str, tuple[list[str] | None, dict[PackId, int]]], sweepable: set[str]) -> "_Plan":
        report = self.report
        stored = {PackId.from_hex(key.rsplit("/", 1)[-1]): size for key, size in self.repo.backend.list(DATA_PREFIX)}
        live = {PackId(row[0]): row[1] for row in self.sql("SELECT id, size FROM temp.prune_packs")}
        condemned = {pack for _, packs in earlier.values() for pack in packs}
        report.packs, report.pack_bytes = len(stored), sum(stored.values())
        plan = _Plan()
        usage = self.sql(
            "SELECT b.pack, COUNT(u.id), COALESCE(SUM(CASE WHEN u.id IS NULL THEN 0 ELSE b.length END), 0), "
            "COALESCE(SUM(CASE WHEN u.id IS NULL THEN b.length ELSE 0 END), 0), MIN(b.type) "
            "FROM temp.prune_blobs b LEFT JOIN temp.prune_used u ON u.id = b.id GROUP BY b.pack")
        per_pack = {PackId(row[0]): (row[1], row[2], row[3]) for row in usage}
        pack_type = {PackId(row[0]): row[4] for row in usage}
        candidates = []
        # A damaged pack still in use is left to 'repair packs' (a repack would stop at its
        # damaged blob); one nothing uses goes like any other.
        damaged = set(self.catalog.damaged_packs())
        for pack, size in live.items():
            used_count, used_bytes, garbage = per_pack.get(pack, (0, 0, 0))
            report.used_blobs += used_count
            report.used_bytes += used_bytes
            if used_count == 0:
                plan.condemned[pack] = size
                report.unused_packs += 1
                report.unused_bytes += size
            elif pack in damaged:
                report.warnings.append(f"{pack_key(pack)} is damaged and still in use: left to 'clubsnap repair packs'")
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
            if pack not in plan.condemned and pack not in damaged and size < self.repo.config.pack_size // SMALL_PACK_FRACTION:
                small.setdefault(pack_type[pack], []).append(pack)
        for packs in small.values():
            if len(packs) >= 2 and self.options.max_unused != float("inf"):  # unlimited: no repacking at all
                for pack in packs:
                    used_count, used_bytes, garbage = per_pack[pack]
                    self._choose_repack(plan, pack, live[pack], used_count, used_bytes)
                    report.repack_small_packs += 1
                    report.garbage_left_bytes -= garbage
        self._plan_unindexed(plan, stored, live, condemned)
        self._plan_earlier(plan, earlier, sweepable, stored, live)
        report.predicted_freed_bytes = (sum(plan.condemned.values()) - plan.repack_new_bytes
                                        + sum(plan.sweep.values()))
        return plan

    def _plan_unindexed(self, plan: "_Plan", stored: dict[PackId, int], live: dict[PackId, int],
                        condemned: set[PackId]) -> None:
        """Packs no index and no garbage record names (a killed run's) are condemned, with
        the blob lists of their trailers: a snapshot of that run may yet be saved (its lock
        is then live) and its blobs must be found and rescued."""
        self.sql("CREATE TEMP TABLE IF NOT EXISTS prune_extra (id BLOB, type INTEGER, pack BLOB, offset INTEGER, "
                 "length INTEGER, raw_length INTEGER)")
        self.sql("DELETE FROM temp.prune_extra")
        for pack, size in sorted(stored.items()):
            if pack in live or pack in condemned:
                continue
            try:
                entries = read_trailer(self.repo.backend, pack, size, self.repo.cipher)
            except ObjectNotFound:
                continue  # deleted since the listing
            except (IntegrityError, UnsupportedFormat) as exc:
                self.report.warnings.append(f"{exc} (an unindexed pack: left alone)")
                continue
            self.catalog.executemany("INSERT INTO temp.prune_extra VALUES (?, ?, ?, ?, ?, ?)", [
                (bytes(e.id), int(e.type), bytes(pack), e.offset, e.length, e.raw_length) for e in entries])
            plan.condemned[pack] = size
            self.report.unindexed_packs += 1
            self.report.unindexed_bytes += size

    def _plan_earlier(self, plan: "_Plan", earlier: dict[str, tuple[list[str] | None, dict[PackId, int]]],
                      sweepable: set[str], stored: dict[PackId, int], live: dict[PackId, int]) -> None:
        """Earlier garbage: a pack of a sweepable record is rescued (indexed again) if it
        holds a used blob no index names, left alone if an index names it again, and
        deleted otherwise. Decided from the records' own blob lists."""
        self.sql("CREATE TEMP TABLE IF NOT EXISTS prune_rescued (id BLOB, type INTEGER, pack BLOB, offset INTEGER, "
                 "length INTEGER, raw_length INTEGER)")
        self.sql("DELETE FROM temp.prune_rescued")
        pending = {p: s for name, (_, packs) in earlier.items() if name not in sweepable for p, s in packs.items()}
        for name in sorted(sweepable):
            try:
                record = self.repo.read_garbage(name)
            except ObjectNotFound:
                continue
            for pack in record["packs"]:
                pack_id, size = PackId(pack["id"]), int(pack["size"])
                if pack_id in live or pack_id not in stored or pack_id in pending:
                    continue  # indexed again; gone already; or still waited for by another record
                if self._holds_needed(pack["blobs"]):
                    self.catalog.executemany("INSERT INTO temp.prune_rescued VALUES (?, ?, ?, ?, ?, ?)",
                                             [(r[0], r[1], bytes(pack_id), r[2], r[3], r[4]) for r in pack["blobs"]])
                    plan.rescue[pack_id] = size
                    self.report.rescued_packs += 1
                else:
                    plan.sweep[pack_id] = size
                    self.report.swept_earlier_packs += 1
                    self.report.swept_earlier_bytes += size
        for pack, size in pending.items():
            if pack in stored and pack not in live:
                self.report.pending_packs += 1
                self.report.pending_bytes += size

    def _holds_needed(self, rows: list[list[Any]]) -> bool:
        """Whether any of these blobs is used and named by no index (the private copy)."""
        for start in range(0, len(rows), 500):
            ids = [bytes(r[0]) for r in rows[start:start + 500]]
            marks = ",".join("?" * len(ids))
            if self.sql(f"SELECT 1 FROM temp.prune_used WHERE id IN ({marks}) AND id NOT IN "
                        f"(SELECT id FROM temp.prune_blobs WHERE id IN ({marks})) LIMIT 1", ids + ids):
                return True
        return False

    def _choose_repack(self, plan: "_Plan", pack: PackId, size: int, used_count: int, used_bytes: int) -> None:
        plan.repack[pack] = size
        plan.condemned[pack] = size
        self.report.repack_packs += 1
        self.report.repack_bytes += size
        self.report.repack_used_bytes += used_bytes
        plan.repack_new_bytes += used_bytes + used_count * TRAILER_ROW_BYTES

    # ---- execution ------------------------------------------------------------------------

    def _repack(self, packs: dict[PackId, int]) -> set[str]:
        """Copy the used blobs of ``packs`` into new packs, recording their new places in
        ``temp.prune_new_blobs``/``prune_new_packs``; returns the index objects written."""
        repo = self.repo
        self.sql("CREATE TEMP TABLE IF NOT EXISTS prune_new_blobs (id BLOB PRIMARY KEY, type INTEGER, pack BLOB, "
                 "offset INTEGER, length INTEGER, raw_length INTEGER)")
        self.sql("CREATE TEMP TABLE IF NOT EXISTS prune_new_packs (id BLOB PRIMARY KEY, size INTEGER)")
        self.sql("DELETE FROM temp.prune_new_blobs")
        self.sql("DELETE FROM temp.prune_new_packs")
        repo.start_session()
        written_before = len(repo.index_objects_written)
        copied = 0
        for number, pack in enumerate(sorted(packs), 1):
            self.say(f"repacking {number}/{len(packs)}")
            entries = [BlobEntry(ChunkId(r[0]), BlobType(r[1]), pack, r[2], r[3], r[4]) for r in self.sql(
                "SELECT b.id, b.type, b.offset, b.length, b.raw_length FROM temp.prune_blobs b "
                "JOIN temp.prune_used u ON u.id = b.id WHERE b.pack = ? ORDER BY b.offset", [bytes(pack)])]
            key = pack_key(pack)
            try:
                data = memoryview(repo.backend.get(key))
            except ObjectNotFound as exc:
                raise IntegrityError(f"{key}: pack missing (needed for {len(entries)} used blob(s)); run "
                                     f"'clubsnap check' before pruning") from exc
            for entry in entries:
                stored = data[entry.offset:entry.offset + entry.length]
                repo.decode_or_note(stored, entry, key)  # never copy a damaged blob on (and it is recorded)
                repo.copy_blob(entry, stored)
            copied += len(entries)
            if number == len(packs) or copied >= USED_BATCH:
                self._record_moved()  # what is held in memory is bounded, however much moves
                copied = 0
        return set(repo.index_objects_written[written_before:])

    def _record_moved(self) -> None:
        repo = self.repo
        repo.flush()
        moved = repo.session_entries()
        self.catalog.executemany("INSERT OR REPLACE INTO temp.prune_new_blobs VALUES (?, ?, ?, ?, ?, ?)", [
            (bytes(e.id), int(e.type), bytes(e.pack), e.offset, e.length, e.raw_length) for e in moved])
        self.catalog.executemany("INSERT OR REPLACE INTO temp.prune_new_packs VALUES (?, ?)",
                                 [(bytes(p), size) for p, size in repo.session_packs().items()])
        repo.start_session()

    def _write_index(self, plan: "_Plan") -> list[str]:
        """Write index objects naming every live blob once (kept packs, repacked blobs,
        rescued packs); returns their names."""
        self.sql("CREATE TEMP TABLE IF NOT EXISTS prune_dropped (id BLOB PRIMARY KEY)")
        self.sql("DELETE FROM temp.prune_dropped")
        self.catalog.executemany("INSERT INTO temp.prune_dropped VALUES (?)", [(bytes(p),) for p in plan.condemned])
        self.sql("INSERT OR IGNORE INTO temp.prune_new_blobs SELECT * FROM temp.prune_rescued")
        self.catalog.executemany("INSERT OR REPLACE INTO temp.prune_new_packs VALUES (?, ?)",
                                 [(bytes(p), s) for p, s in plan.rescue.items()])
        sizes = {PackId(row[0]): row[1] for row in self.sql(
            "SELECT id, size FROM temp.prune_packs UNION SELECT id, size FROM temp.prune_new_packs")}
        rows = self.catalog.iterate(
            "SELECT id, type, pack, offset, length, raw_length FROM ("
            " SELECT * FROM temp.prune_blobs WHERE pack NOT IN (SELECT id FROM temp.prune_dropped)"
            "  AND id NOT IN (SELECT id FROM temp.prune_new_blobs)"
            " UNION ALL SELECT * FROM temp.prune_new_blobs) ORDER BY pack")
        names = []
        for batch in index_batches(rows, sizes):
            data = seal_object(Kind.INDEX, {"packs": batch}, self.repo.cipher)
            name = digest(data)
            self._ensure_held()
            self.repo.backend.put(index_key(name), data)
            names.append(name.hex())
        self.say(f"wrote {len(names)} index object(s)")
        return names

    def _write_garbage(self, packs: dict[PackId, int]) -> list[str]:
        """Garbage records naming ``packs`` with their blobs, each holding at most
        INDEX_ENTRIES_PER_OBJECT entries (so neither prune nor a reader ever holds more
        of them in memory); ``waiting_for`` stays nil until step 6 of the protocol."""
        names: list[str] = []
        batch: list[dict[str, Any]] = []
        count = 0
        for pack, size in sorted(packs.items()):
            rows = [[r[0], r[1], r[2], r[3], r[4]] for r in self.sql(
                "SELECT id, type, offset, length, raw_length FROM temp.prune_blobs WHERE pack = ? UNION ALL "
                "SELECT id, type, offset, length, raw_length FROM temp.prune_extra WHERE pack = ?",
                [bytes(pack), bytes(pack)])]
            if batch and count + len(rows) > INDEX_ENTRIES_PER_OBJECT:
                names.append(self._put_garbage(batch, None))
                batch, count = [], 0
            batch.append({"id": bytes(pack), "size": size, "blobs": rows})
            count += len(rows)
        if batch:
            names.append(self._put_garbage(batch, None))
        return names

    def _put_garbage(self, packs: list[dict[str, Any]], waiting_for: list[str] | None) -> str:
        record = {"time": datetime.now(timezone.utc).isoformat(), "host": locks.this_host(),
                  "waiting_for": waiting_for, "packs": packs}
        data = seal_object(Kind.GARBAGE, record, self.repo.cipher)
        name = digest(data).hex()
        self.repo.backend.put(f"{GARBAGE_PREFIX}{name}", data)
        return name

    def _delete_packs(self, packs: dict[PackId, int]) -> None:
        self._ensure_held()
        for pack in sorted(packs):
            self.repo.backend.delete(pack_key(pack))
            self.report.packs_deleted += 1
            self.report.freed_bytes += packs[pack]

    def _sweep_earlier(self, plan: "_Plan", sweepable: set[str]) -> None:
        """Earlier garbage whose processes are gone: delete its packs (the rescued ones
        are in the new index already), then the records."""
        self._delete_packs(plan.sweep)
        for name in sorted(sweepable):
            self.repo.backend.delete(f"{GARBAGE_PREFIX}{name}")
        self.catalog.remove_garbage(sweepable)

    def _hand_on_unlisted(self, earlier: dict[str, tuple[list[str] | None, dict[PackId, int]]],
                          running: set[str]) -> None:
        """A record left without its ``waiting_for`` (its prune died before step 6) gets
        the processes this run found running at its start: they are the only ones that
        could have read the index its prune replaced (that happened before this run)."""
        for name, (waiting_for, _) in sorted(earlier.items()):
            if waiting_for is None and running:
                try:
                    record = self.repo.read_garbage(name)
                except ObjectNotFound:
                    continue
                self._put_garbage(record["packs"], sorted(running))
                self.repo.backend.delete(f"{GARBAGE_PREFIX}{name}")

    def _sweep_new(self, names: list[str], marked: set[str]) -> None:
        """Step 6-8 for this run's garbage: wait for the processes that may have seen its
        packs as live, then delete them (or index again what a finished snapshot uses);
        or hand the records on to the next prune with the list of those still running."""
        repo, report = self.repo, self.report
        waiting = self._running_processes()
        try:
            waiting = self._wait_for(waiting)
        except KeyboardInterrupt:
            self._hand_on(names, waiting or self._running_processes())
            raise
        report.waited_for = sorted(waiting)
        if waiting:
            self._hand_on(names, waiting)
            return
        # Everything that may have used these packs has finished: its snapshot is listed.
        snapshots = repo.snapshots()
        listed = repo.sync_index()
        for snap in snapshots:
            if snap.key not in marked:
                self.used.mark_snapshot(snap)
        self.used.flush()
        held = self.catalog.copy_index("temp.prune_blobs", "temp.prune_packs")
        if not listed <= held:
            self._hand_on(names, set())  # the catalog is being rebuilt: the next prune sweeps
            return
        live = {PackId(row[0]) for row in self.sql("SELECT id FROM temp.prune_packs")}
        self.sql("CREATE INDEX temp.prune_blobs_id ON prune_blobs (id)")
        for name in names:
            record = repo.read_garbage(name)
            rescue, doomed = [], {}
            for pack in record["packs"]:
                pack_id = PackId(pack["id"])
                if pack_id in live:
                    continue  # indexed again meanwhile
                # Rescued only for a used blob that is nowhere else (a repacked blob is
                # used, but its copy in the new pack serves).
                if self._holds_needed(pack["blobs"]):
                    rescue.append(pack)
                else:
                    doomed[pack_id] = int(pack["size"])
            for start in range(0, len(rescue), 64):
                data = seal_object(Kind.INDEX, {"packs": rescue[start:start + 64]}, repo.cipher)
                self._ensure_held()
                repo.backend.put(index_key(digest(data)), data)
            report.rescued_packs += len(rescue)
            self._delete_packs(doomed)
            repo.backend.delete(f"{GARBAGE_PREFIX}{name}")

    def _wait_for(self, waiting: set[str]) -> set[str]:
        """Wait until none of ``waiting`` runs, ``wait_s`` passes or ``stop`` is set;
        returns those still running."""
        stop = self.options.stop or threading.Event()  # never set: each pause is a full poll
        deadline = time.monotonic() + self.options.wait_s
        while waiting and time.monotonic() < deadline and not stop.is_set():
            self.say(f"waiting for {len(waiting)} running snapshot(s)/restore(s) before deleting")
            stop.wait(min(WAIT_POLL_S, max(deadline - time.monotonic(), 0.0)))
            waiting &= self._running_processes()
        return waiting

    def _hand_on(self, names: list[str], waiting: set[str]) -> None:
        """Write the records again with ``waiting_for``, for the next prune to sweep."""
        for name in names:
            record = self.repo.read_garbage(name)
            self._put_garbage(record["packs"], sorted(waiting))
            self.repo.backend.delete(f"{GARBAGE_PREFIX}{name}")
            self.report.pending_packs += len(record["packs"])
            self.report.pending_bytes += sum(int(p["size"]) for p in record["packs"])


@dataclass
class _Plan:
    condemned: dict[PackId, int] = field(default_factory=dict)  # to delete after the sweep protocol
    repack: dict[PackId, int] = field(default_factory=dict)     # condemned, after copying their used blobs
    rescue: dict[PackId, int] = field(default_factory=dict)     # earlier garbage a snapshot needs
    sweep: dict[PackId, int] = field(default_factory=dict)      # earlier garbage to delete now
    repack_new_bytes: int = 0


def _may_sweep(waiting_for: list[str] | None, running: set[str]) -> bool:
    """A garbage record may be swept once none of the processes it waits for runs. One
    without that list (its prune was killed before writing it) waits for every process
    running now: any of them may have seen its packs as live."""
    if waiting_for is None:
        return not running
    return not (set(waiting_for) & running)


def index_batches(rows: Iterable[tuple[Any, ...]], sizes: dict[PackId, int]) -> Iterator[list[dict[str, Any]]]:
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
            self._mark_entries(prefix, record.get("entries", []), stack)
            for part in record.get("parts", []):  # one part at a time: a directory may be huge
                self.add(part)
                self._mark_entries(prefix, unpack_record(self.repo.read_blob(ChunkId(part)),
                                                         f"tree {part.hex()[:8]}")["entries"], stack)

    def _mark_entries(self, prefix: bytes, entries: list[dict[str, Any]], stack: list[tuple[bytes, ChunkId]]) -> None:
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
