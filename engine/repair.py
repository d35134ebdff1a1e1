"""Repair: heal what ``check`` found (docs/format.md §11), as restic's ``repair`` does.

- ``repair_index`` rebuilds the index from what is stored: the entries of every readable
  index object, and the trailers of packs no readable index object names; damaged index
  objects are passed over and deleted with the rest once the new index is written.
- ``repair_packs`` reads each pack a damage record names (or the operator does), copies
  every intact blob into new packs, writes an index without the damaged packs, and
  deletes them once no running process can be reading them. Blobs that have no intact
  copy anywhere are unrecoverable: the files of each snapshot that need them are named.
- ``repair_snapshots`` removes snapshot records that cannot be read (restoring them from
  a snapshot summary's copy when one is intact), and replaces each record whose files
  need unrecoverable blobs by one without those files, naming each.

All three hold the ``prune`` lock: no prune runs beside them, while snapshots and
restores go on. New objects are written before old ones are deleted, so a repair killed
at any point leaves the repository as readable as before, and can be run again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from . import damage, locks
from .errors import BackendError, EngineError, IntegrityError, ObjectNotFound, UnsupportedFormat, UsageError
from .format import (
    DATA_PREFIX, GARBAGE_PREFIX, INDEX_PREFIX, SNAPSHOT_PREFIX, SUMMARY_PREFIX, BlobType,
    ChunkId, Kind, PackId, SnapshotId, decode_blob, digest, display, index_key, open_object, pack_key, parse_snapshot_key,
    seal_object,
)
from .forget import remove_snapshots
from .packs import BlobEntry, read_trailer, trailer_of
from .pagemap import file_chunks
from .prune import index_batches, refuse_concurrent_prune
from .repository import Repository, SnapshotInfo, check_snapshot_time
from .tree import load_tree, store_tree

MAX_LISTED = 100


@dataclass
class RepairReport:
    """What a repair did (or, with ``dry_run``, would do)."""

    dry_run: bool
    damaged_index_objects: list[str] = field(default_factory=list)
    packs_from_trailers: int = 0
    packs_dropped: list[str] = field(default_factory=list)      # indexed, but missing from storage
    packs_unreadable: list[str] = field(default_factory=list)   # stored, no index names it, trailer damaged
    index_objects_written: int = 0
    index_objects_deleted: int = 0
    packs_repaired: list[str] = field(default_factory=list)
    blobs_salvaged: int = 0
    blobs_lost: int = 0
    packs_deleted: int = 0
    packs_pending: int = 0                                      # deleted by the next prune
    unrecoverable: list[str] = field(default_factory=list)      # "snapshot <id> <path>"
    records_removed: list[str] = field(default_factory=list)
    records_recovered: list[str] = field(default_factory=list)  # from a summary's copy
    records_replaced: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def _maintenance(repo: Repository, dry_run: bool) -> Iterator[None]:
    """The prune lock (none for a dry run, which writes nothing), so that no prune plans
    from an index a repair is rewriting."""
    if dry_run:
        yield
        return
    with repo.lock("prune") as own:
        refuse_concurrent_prune(repo, own)
        repo.held_lock = own
        try:
            yield
        except BaseException:
            repo.discard_unwritten()
            raise
        finally:
            repo.held_lock = None


def _stored_packs(repo: Repository) -> dict[PackId, int]:
    return {PackId.from_hex(key.rsplit("/", 1)[-1]): size for key, size in repo.backend.list(DATA_PREFIX)}


# ---- repair index ---------------------------------------------------------------------------

def repair_index(repo: Repository, dry_run: bool = False) -> RepairReport:
    report = RepairReport(dry_run)
    with _maintenance(repo, dry_run):
        _rewrite_index(repo, report, exclude=set())
    return report


def _rewrite_index(repo: Repository, report: RepairReport, exclude: set[PackId]) -> None:
    """Write an index naming every blob of every stored pack but ``exclude`` (and the
    packs garbage records condemn: prune's), from the index objects that read back
    intact and, for packs none of them names, the packs' trailers; then delete the index
    objects it replaces, damaged ones included. The catalog is not trusted for this: it
    may hold what a damaged object said before it was damaged, or miss what it says. A
    read that fails for another reason than damage (storage unreachable) stops it before
    anything is deleted."""
    repo.sync_index()
    # index/ before data/: every pack a listed index object names was stored before it, so
    # a snapshot writing beside the repair never has its new packs taken for missing ones.
    listed = sorted(key[len(INDEX_PREFIX):] for key, _ in repo.backend.list(INDEX_PREFIX))
    stored = _stored_packs(repo)
    keep = set(stored) - exclude - set(repo.catalog.condemned_packs())
    covered: set[PackId] = set()
    damaged: set[str] = set()
    for name in listed:
        packs = _index_object_packs(repo, name)
        if packs is None:
            damaged.add(name)
            report.damaged_index_objects.append(INDEX_PREFIX + name)
        else:
            covered |= {pack for pack, _ in packs}
    report.packs_dropped = sorted(pack_key(p) for p in covered - set(stored) - exclude if _gone(repo, p))
    from_trailers = sorted(keep - covered)
    if report.dry_run:
        for _ in _trailer_rows(repo, from_trailers, stored, report):
            pass
        return
    written: list[str] = []
    rows = _index_rows(repo, [n for n in listed if n not in damaged], keep, from_trailers, stored, report)
    for batch in index_batches(rows, stored):
        data = seal_object(Kind.INDEX, {"packs": batch}, repo.cipher)
        if repo.held_lock is not None:
            repo.held_lock.ensure_held()
        repo.backend.put(index_key(digest(data)), data)
        written.append(digest(data).hex())
    report.index_objects_written = len(written)
    for name in listed:
        if name not in written:
            with contextlib.suppress(ObjectNotFound):
                repo.backend.delete(index_key(bytes.fromhex(name)))
            report.index_objects_deleted += 1
    repo.damaged_objects = {k: v for k, v in repo.damaged_objects.items() if not k.startswith(INDEX_PREFIX)}
    repo.catalog.clear_index()
    repo.sync_index()


def _gone(repo: Repository, pack: PackId) -> bool:
    """Whether a pack an index object names is really absent (asked once more)."""
    try:
        repo.backend.stat(pack_key(pack))
        return False
    except ObjectNotFound:
        return True


def _index_object_packs(repo: Repository, name: str) -> list[tuple[PackId, list[BlobEntry]]] | None:
    """The packs and entries of one index object read back from storage; None if it is
    damaged. Any other failure (unreachable storage, the object gone while the prune lock
    is held) raises: it says nothing about the object, and the repair must stop."""
    try:
        record = repo.read_named(INDEX_PREFIX, Kind.INDEX, name)
        return [(PackId(p["id"]), [BlobEntry.from_row(PackId(p["id"]), row) for row in p["blobs"]])
                for p in record["packs"]]
    except ObjectNotFound as exc:
        raise BackendError(f"{INDEX_PREFIX}{name} vanished while the index was repaired (another "
                           f"repair?); run it again") from exc
    except (IntegrityError, UnsupportedFormat, KeyError, TypeError, ValueError):
        return None


def _index_rows(repo: Repository, listed: list[str], keep: set[PackId], from_trailers: list[PackId],
                stored: dict[PackId, int], report: RepairReport) -> Iterator[tuple[Any, ...]]:
    """Every entry of every kept pack, grouped by pack, once per pack: from the intact
    index objects (one held in memory at a time), then from the trailers (one at a time).
    A blob stored in two packs keeps both entries, as the packs hold it."""
    done: set[PackId] = set()
    for name in listed:
        packs = _index_object_packs(repo, name)
        if packs is None:
            raise IntegrityError(f"{INDEX_PREFIX}{name} read back intact, then damaged: nothing was deleted; "
                                 f"run 'clubsnap repair index' again")
        for pack, entries in packs:
            if pack in keep and pack not in done:
                done.add(pack)
                yield from (_row(e) for e in entries)
    yield from _trailer_rows(repo, [p for p in from_trailers if p not in done], stored, report)


def _trailer_rows(repo: Repository, packs: list[PackId], stored: dict[PackId, int],
                  report: RepairReport) -> Iterator[tuple[Any, ...]]:
    """The entries of packs no intact index object names, from their trailers; a pack
    whose trailer is damaged too is reported (its blobs cannot be found)."""
    for pack in packs:
        try:
            entries = read_trailer(repo.backend, pack, stored[pack], repo.cipher)
        except ObjectNotFound:
            continue  # deleted since the listing
        except (IntegrityError, UnsupportedFormat) as exc:
            report.packs_unreadable.append(f"{pack_key(pack)} ({exc})")
            continue
        report.packs_from_trailers += 1
        yield from (_row(e) for e in entries)


def _row(entry: BlobEntry) -> tuple[Any, ...]:
    return bytes(entry.id), int(entry.type), bytes(entry.pack), entry.offset, entry.length, entry.raw_length


# ---- repair packs ---------------------------------------------------------------------------

def repair_packs(repo: Repository, packs: list[str] | None = None, dry_run: bool = False) -> RepairReport:
    report = RepairReport(dry_run)
    with _maintenance(repo, dry_run):
        repo.sync_index()
        stored = _stored_packs(repo)
        targets = _damaged_targets(repo, stored, packs or [])
        if not targets:
            return report
        repo.start_session()
        lost: set[ChunkId] = set()
        for pack in sorted(targets):
            lost |= _salvage(repo, pack, stored.get(pack), report)
        report.packs_repaired = [pack_key(p) for p in sorted(targets)]
        if not dry_run:
            repo.flush()
            _rewrite_index(repo, report, exclude=targets)  # the new packs are in the index objects flush wrote
            _delete_damaged(repo, {p: stored[p] for p in targets if p in stored}, report)
            damage.remove_settled(repo.backend, repo.catalog)
        lost -= repo.which_exist(sorted(lost))  # another copy is stored after all
        report.blobs_lost = len(lost)
        if lost:
            report.unrecoverable = _victims(repo, lost)
    return report


def _damaged_targets(repo: Repository, stored: dict[PackId, int], named: list[str]) -> set[PackId]:
    """The packs damage records name (still stored or indexed), and those named by id."""
    known = set(stored) | set(repo.catalog.packs())
    targets = {p for p in repo.catalog.damaged_packs() if p in known}
    for ref in named:
        matches = [p for p in known if p.hex().startswith(ref.lower().rsplit("/", 1)[-1])]
        if len(matches) != 1:
            raise UsageError(f"pack {ref!r} {'matches no pack' if not matches else 'is ambiguous'}")
        targets.add(matches[0])
    return targets


def _salvage(repo: Repository, pack: PackId, size: int | None, report: RepairReport) -> set[ChunkId]:
    """Copy the intact blobs of one damaged pack into new packs (not in a dry run);
    returns the ids of those that are damaged here and have no intact copy elsewhere."""
    entries = {e.id: e for e in repo.catalog.blobs_in_pack(pack)}
    data = b""
    if size is not None:
        try:
            data = repo.backend.get(pack_key(pack))
        except ObjectNotFound:
            pass
        try:
            trailer = trailer_of(data, pack, repo.cipher)
        except EngineError:
            trailer = []  # damaged too: the index's entries are all there is
        for entry in trailer:
            entries.setdefault(entry.id, entry)
    lost = set()
    elsewhere = repo.which_exist(list(entries))
    for entry in entries.values():
        here = repo.catalog.lookup(entry.id)
        if entry.id in elsewhere and here is not None and here.pack != pack:
            continue  # an intact copy is indexed in another pack already
        stored = memoryview(data)[entry.offset:entry.offset + entry.length]
        try:
            decode_blob(stored, entry.id, pack_key(pack), repo.cipher)
        except EngineError:
            lost.add(entry.id)
            continue
        report.blobs_salvaged += 1
        if not report.dry_run:
            repo.copy_blob(entry, stored)
    return lost


def _delete_damaged(repo: Repository, packs: dict[PackId, int], report: RepairReport) -> None:
    """Delete the damaged packs now if no snapshot or reader runs (one that does may have
    read the old index); else condemn them in a garbage record for the next prune. The
    record lists no blobs: nothing is to be rescued from a damaged pack."""
    if not packs:
        return
    running, unreadable = locks.live_locks(repo.backend, repo.cipher, ("snapshot", "read"))
    waiting = sorted({lock.key for lock in running} | set(unreadable))
    if waiting:
        record = {"time": datetime.now(timezone.utc).isoformat(), "host": locks.this_host(), "waiting_for": waiting,
                  "packs": [{"id": bytes(p), "size": s, "blobs": []} for p, s in sorted(packs.items())]}
        data = seal_object(Kind.GARBAGE, record, repo.cipher)
        repo.backend.put(f"{GARBAGE_PREFIX}{digest(data).hex()}", data)
        report.packs_pending = len(packs)
        return
    if repo.held_lock is not None:
        repo.held_lock.ensure_held()
    for pack in sorted(packs):
        with contextlib.suppress(ObjectNotFound):
            repo.backend.delete(pack_key(pack))
        report.packs_deleted += 1


def _victims(repo: Repository, lost: set[ChunkId]) -> list[str]:
    """The files (and unreadable directories) of every snapshot that need a lost blob."""
    names: list[str] = []
    memo: dict[ChunkId, tuple[ChunkId | None, list[bytes]]] = {}
    for snap in repo.snapshots():
        _, removed = _without_lost(repo, snap.tree, lambda chunks: not lost & set(chunks), memo, store=False)
        names += [f"snapshot {snap.id.short()} {_shown(path)}" for path in removed]
    return names


# ---- repair snapshots -----------------------------------------------------------------------

def repair_snapshots(repo: Repository, dry_run: bool = False) -> RepairReport:
    report = RepairReport(dry_run)
    with _maintenance(repo, dry_run):
        repo.sync_index()
        if repo.catalog.damaged_packs():
            report.warnings.append("damaged packs are not repaired yet: run 'clubsnap repair packs' first, or "
                                   "files whose blobs a snapshot could still store again are dropped")
        doomed = _unreadable_records(repo, report)
        available = _availability(repo)
        memo: dict[ChunkId, tuple[ChunkId | None, list[bytes]]] = {}
        replaced: list[tuple[SnapshotInfo, dict[str, Any]]] = []
        snapshots = repo.snapshots()
        # A repair killed between writing a replacement and deleting the original: the
        # replacement stands (a record's id hashes its encrypted bytes, so writing it anew
        # would make a second one), and only the original is left to delete.
        done = {bytes(s.record["repaired"]["original"]): s for s in snapshots if "repaired" in s.record}
        for snap in snapshots:
            if bytes(snap.id) in done:
                doomed.append(snap)
                report.records_replaced.append({"id": snap.id.hex(), "time": snap.time.isoformat(),
                                                "new_id": done[bytes(snap.id)].id.hex(),
                                                **{k: done[bytes(snap.id)].record["repaired"][k]
                                                   for k in ("removed", "removed_count")}})
                continue
            tree, lost_paths = _without_lost(repo, snap.tree, available, memo, store=not dry_run)
            if not lost_paths:
                continue
            removed = [_shown(path) for path in lost_paths]
            entry = {"id": snap.id.hex(), "time": snap.time.isoformat(), "removed": removed[:MAX_LISTED],
                     "removed_count": len(removed)}
            if tree is None:  # the root itself is unreadable: nothing of it restores
                doomed.append(snap)
                report.records_removed.append(f"{snap.key} (its root tree is unreadable)")
            else:
                replaced.append((snap, _replacement(snap, tree, removed)))
                report.records_replaced.append(entry)
        if dry_run:
            return report
        new = [repo.save_snapshot(record, snap.time) for snap, record in replaced]
        for (snap, _), info in zip(replaced, new):
            report.records_replaced[[r["id"] for r in report.records_replaced].index(snap.id.hex())]["new_id"] = \
                info.id.hex()
        remove_snapshots(repo, doomed + [snap for snap, _ in replaced])
        repo.damaged_objects = {k: v for k, v in repo.damaged_objects.items() if not k.startswith(SNAPSHOT_PREFIX)}
    return report


def _unreadable_records(repo: Repository, report: RepairReport) -> list[SnapshotInfo]:
    """Snapshot records that fail when read from storage: put back from an intact copy
    where there is one (the local catalog's, a summary's), else to be removed."""
    copies = _summary_copies(repo)
    doomed = []
    for time, snap_id, key in repo.snapshot_keys():
        try:
            data = repo.backend.get(key)
            record = open_object(Kind.SNAPSHOT, data, key, repo.cipher)
            if SnapshotId(digest(data)) != snap_id:
                raise IntegrityError(f"{key}: snapshot record does not match its id (corrupted)")
            check_snapshot_time(key, record)
            continue
        except ObjectNotFound:
            continue
        except (IntegrityError, UnsupportedFormat) as exc:
            reason = str(exc)
        cached = repo.catalog.snapshot_sealed(key)  # the catalog keeps the record as stored
        if cached is not None and SnapshotId(digest(cached)) == snap_id:
            copies.setdefault(key, cached)
        if key in copies:
            if not report.dry_run:
                repo.backend.put(key, copies[key])
                repo.catalog.remove_snapshots([key])
            report.records_recovered.append(key)
            repo.damaged_objects.pop(key, None)
            continue
        report.records_removed.append(f"{key} ({reason})")
        doomed.append(SnapshotInfo(snap_id, key, time, {}))
    return doomed


def _summary_copies(repo: Repository) -> dict[str, bytes]:
    """Intact copies of snapshot records held by readable summaries, by key."""
    copies: dict[str, bytes] = {}
    for key, _ in sorted(repo.backend.list(SUMMARY_PREFIX), reverse=True):
        try:
            record = open_object(Kind.SNAPSHOT_SUMMARY, repo.backend.get(key), key, repo.cipher)
            for snap_key, sealed in record.get("snapshots", []):
                if snap_key not in copies and SnapshotId(digest(sealed)) == parse_snapshot_key(snap_key)[1]:
                    open_object(Kind.SNAPSHOT, sealed, snap_key, repo.cipher)
                    copies[snap_key] = bytes(sealed)
        except (EngineError, ValueError, TypeError):
            continue
    return copies


def _availability(repo: Repository) -> Callable[[list[ChunkId]], bool]:
    """Whether every chunk of a list can be read: indexed intact, or in a condemned pack
    still stored (a reader takes it from there, format §10)."""
    stored = set(_stored_packs(repo))

    def available(chunks: list[ChunkId]) -> bool:
        unique = list(set(chunks))
        found = repo.which_exist(unique)
        rest = [c for c in unique if c not in found]
        if not rest:
            return True
        condemned = repo.catalog.lookup_condemned_many(rest)
        return all(c in condemned and condemned[c].pack in stored for c in rest)

    return available


def _without_lost(repo: Repository, tree_id: ChunkId, available: Callable[[list[ChunkId]], bool],
                  memo: dict[ChunkId, tuple[ChunkId | None, list[bytes]]], store: bool
                  ) -> tuple[ChunkId | None, list[bytes]]:
    """The tree without the files whose blobs cannot be read (None when the tree itself
    cannot be), and the paths left out, relative to it (a directory's end in ``/``).
    Subtrees are judged once (``memo``): directories shared by many snapshots cost one walk."""
    if tree_id in memo:
        return memo[tree_id]
    try:
        entries = load_tree(repo, tree_id)
    except (IntegrityError, UnsupportedFormat):  # lost; an unreachable storage raises on
        memo[tree_id] = (None, [b""])
        return memo[tree_id]
    kept, removed = [], []
    for entry in entries:
        name = entry["name"]
        if entry["type"] == "dir":
            new, below = _without_lost(repo, ChunkId(entry["tree"]), available, memo, store)
            removed += [name + b"/" + path for path in below]
            if new is not None:
                kept.append({**entry, "tree": bytes(new)})
        elif entry["type"] == "file" and not _file_readable(repo, entry, available):
            removed.append(name)
        else:
            kept.append(entry)
    if not removed:
        new_id: ChunkId = tree_id
    else:  # a dry run stores nothing: any id other than the old one says "changed"
        new_id = store_tree(_TreeSink(repo), kept) if store else ChunkId(digest(b"dry run" + tree_id))
    memo[tree_id] = (new_id, removed)
    return memo[tree_id]


def _shown(path: bytes) -> str:
    return f"{display(path) or '/'} (directory unreadable)" if path.endswith(b"/") or not path else display(path)


def _file_readable(repo: Repository, entry: dict[str, Any], available: Callable[[list[ChunkId]], bool]) -> bool:
    try:
        return available(file_chunks(repo, entry))
    except (IntegrityError, UnsupportedFormat):
        return False  # a database whose page map is lost


class _TreeSink:
    """Stores the rewritten trees as TREE blobs of the repository."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def add_blob(self, blob_type: BlobType, raw: bytes, blob_id: ChunkId | None = None) -> ChunkId:
        return self.repo.add_blob(BlobType.TREE, raw, blob_id)


def _replacement(snap: SnapshotInfo, tree: ChunkId, removed: list[str]) -> dict[str, Any]:
    """The record that replaces ``snap``: the same snapshot (time, host, source) without
    the files it can no longer restore, tagged ``repaired`` and saying what it lacks."""
    record = dict(snap.record)
    record["tree"] = bytes(tree)
    record["tags"] = sorted(set(snap.tags) | {"repaired"})
    record["repaired"] = {"original": bytes(snap.id), "removed": removed[:MAX_LISTED], "removed_count": len(removed)}
    return record
