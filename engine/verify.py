"""Repository check: structure always, data on request.

Structure: every index object and snapshot record is re-read from storage and matches its
name, every indexed pack exists with the indexed size, every tree of every snapshot
decodes and hashes right, and every chunk a file names is in the index. ``read_data``
additionally reads packs back and re-hashes every blob; a damaged blob is reported with
the pack it sits in and the files (snapshot and path) that need it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from . import damage
from .errors import EngineError, IntegrityError, ObjectNotFound
from .format import (
    DATA_PREFIX, GARBAGE_PREFIX, INDEX_PREFIX, SNAPSHOT_PREFIX, SUMMARY_PREFIX, ChunkId, Kind, PackId, decode_blob, digest, open_object,
    pack_key, parse_snapshot_key,
)
from .packs import verify_pack
from .pagemap import file_chunks
from .repository import Repository, check_snapshot_time, SnapshotInfo
from .tree import Entry, load_tree, walk


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snapshots: int = 0
    trees: int = 0
    packs: int = 0
    packs_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def check(repo: Repository, read_data: bool = False, subset: float | None = None,
          progress: Callable[[int, int], None] | None = None,
          rng: random.Random | None = None, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
          ) -> CheckReport:
    """Check the repository; damage found is recorded (format §6.14), so that the next
    snapshot stores those blobs again, and the verdict too (§6.15), for ``status``."""
    report = CheckReport()
    try:
        snapshots = repo.snapshots()
        repo.sync_index()  # after the listing: it names every blob a listed snapshot needs
    except EngineError as exc:
        report.errors.append(str(exc))
        return report
    report.snapshots = len(snapshots)
    report.warnings += [f"{w} (a garbage record: prune condemns its packs again)" for w in repo.garbage_warnings]
    report.warnings += repo.damage_warnings
    findings: dict[PackId, damage.Finding] = {}
    _check_stored_records(repo, report)
    stored = _check_packs(repo, report, findings)
    _check_snapshots(repo, snapshots, report, stored)
    if read_data or subset is not None:
        bad = _read_packs(repo, report, subset, progress, rng or random.Random(), findings)
        if bad:
            _name_victims(repo, snapshots, bad, report)
    if findings:
        key = repo.note_damage(findings, "check")
        if key:
            report.warnings.append(f"damage recorded in {key}: the next snapshot stores those blobs again from the "
                                   f"source; then 'clubsnap repair packs' salvages the rest")
    damage.remove_settled(repo.backend, repo.catalog)
    _known_damage(repo, report, stored, findings)
    damage.record_check(repo.backend, repo.cipher, now(), 1.0 if read_data else subset, report.errors)
    return report


def _known_damage(repo: Repository, report: CheckReport, stored: set[PackId],
                  found: dict[PackId, damage.Finding]) -> None:
    """Damage recorded earlier (by any host) and not yet repaired is an error of this
    check too, even one that reads no data: the repository is not whole until it is."""
    unhealed = repo.catalog.unhealed_blobs()
    indexed = repo.catalog.packs()
    for pack, missing in sorted(repo.catalog.damaged_packs().items()):
        if pack in found or (pack not in stored and pack not in indexed):
            continue
        report.errors.append(f"{pack_key(pack)}: recorded as damaged{' (missing)' if missing else ''}; "
                             f"run 'clubsnap repair packs'")
    if unhealed:
        report.warnings.append(f"{unhealed} damaged blob(s) have no intact copy yet: a snapshot of a data dir "
                               f"that still has them stores them again")


def _check_stored_records(repo: Repository, report: CheckReport) -> None:
    """Re-read every index object and snapshot record from storage: the catalog holds
    copies, and a check that trusted them would pass a repository a new machine cannot use."""
    for prefix, kind, name_of in ((INDEX_PREFIX, Kind.INDEX, lambda k: k[len(INDEX_PREFIX):]),
                                  (SNAPSHOT_PREFIX, Kind.SNAPSHOT, lambda k: parse_snapshot_key(k)[1].hex())):
        for key, _ in repo.backend.list(prefix):
            try:
                data = repo.backend.get(key)
                record = open_object(kind, data, key, repo.cipher)  # authenticated first, when encrypted
                if digest(data).hex() != name_of(key):
                    raise IntegrityError(f"{key}: content does not match its name (corrupted)")
                if kind == Kind.SNAPSHOT:
                    check_snapshot_time(key, record)
            except ObjectNotFound:
                continue  # listed, then deleted by a prune or a forget running beside the check
            except EngineError as exc:
                report.errors.append(str(exc))
    for key, _ in repo.backend.list(GARBAGE_PREFIX):
        try:
            data = repo.backend.get(key)
            open_object(Kind.GARBAGE, data, key, repo.cipher)
            if digest(data).hex() != key[len(GARBAGE_PREFIX):]:
                raise IntegrityError(f"{key}: content does not match its name (corrupted)")
        except ObjectNotFound:
            continue  # swept meanwhile
        except EngineError as exc:
            report.warnings.append(f"{exc} (a garbage record: prune condemns its packs again)")
    for key, _ in repo.backend.list(SUMMARY_PREFIX):
        # Summaries only save requests (readers check each record they take from one):
        # a damaged one is worth a warning, not a failed check.
        try:
            data = repo.backend.get(key)
            open_object(Kind.SNAPSHOT_SUMMARY, data, key, repo.cipher)
            if digest(data).hex() != key.rsplit("_", 1)[-1]:
                raise IntegrityError(f"{key}: content does not match its name (corrupted)")
        except EngineError as exc:
            report.warnings.append(f"{exc} (a snapshot summary: listing falls back to the records)")


def _check_packs(repo: Repository, report: CheckReport, findings: dict[PackId, damage.Finding]) -> set[PackId]:
    """Indexed packs against the listing; returns the packs stored. A pack missing or of
    another size is damage: every blob the index places there is lost."""
    stored = {PackId.from_hex(key.rsplit("/", 1)[-1]): size for key, size in repo.backend.list(DATA_PREFIX)}
    indexed = repo.catalog.packs()
    report.packs = len(stored)
    for pack, size in indexed.items():
        if pack not in stored:
            report.errors.append(f"{pack_key(pack)}: indexed pack is missing")
        elif stored[pack] != size:
            report.errors.append(f"{pack_key(pack)}: size {stored[pack]} differs from indexed {size}")
        else:
            continue
        findings[pack] = damage.Finding({e.id for e in repo.catalog.blobs_in_pack(pack)}, missing=True)
    # Packs a prune condemned are neither: they wait for deletion (docs/format.md §10).
    unindexed = len(set(stored) - set(indexed) - set(repo.catalog.condemned_packs()))
    if unindexed:
        report.warnings.append(f"{unindexed} pack(s) not in any index (left by an interrupted run; "
                               f"their chunks are uploaded again when needed, and prune deletes them)")
    return set(stored)


def _check_snapshots(repo: Repository, snapshots: list[SnapshotInfo], report: CheckReport,
                     stored: set[PackId]) -> None:
    seen_trees: set[ChunkId] = set()
    seen_chunks: set[ChunkId] = set()
    condemned = repo.catalog.condemned_packs()

    def readable(chunk: ChunkId) -> bool:
        """Indexed, or in a condemned pack still stored (a snapshot that finished while a
        prune ran may use one until the next prune re-indexes it)."""
        if repo.catalog.has_blob(chunk):
            return True
        entry = repo.catalog.lookup_condemned_many([chunk]).get(chunk) if condemned else None
        return entry is not None and entry.pack in stored

    for snap in snapshots:
        stack = [(b"", snap.tree)]
        while stack:
            prefix, tree = stack.pop()
            if tree in seen_trees:
                continue
            seen_trees.add(tree)
            try:
                entries = load_tree(repo, tree)
            except EngineError as exc:
                report.errors.append(f"snapshot {snap.id.short()} {_show(prefix) or '/'}: {exc}")
                continue
            report.trees += 1
            for entry in entries:
                path = prefix + entry["name"]
                if entry["type"] == "dir":
                    stack.append((path + b"/", ChunkId(entry["tree"])))
                elif entry["type"] == "file":
                    _check_file(repo, snap, path, entry, seen_chunks, report, readable)


def _check_file(repo: Repository, snap: SnapshotInfo, path: bytes, entry: Entry,
                seen: set[ChunkId], report: CheckReport, readable: Callable[[ChunkId], bool]) -> None:
    if "page_map" in entry:
        if ChunkId(entry["page_map"]) in seen:
            return  # an unchanged database shares its parent's map, already checked
        try:
            chunks = file_chunks(repo, entry)
        except EngineError as exc:
            report.errors.append(f"snapshot {snap.id.short()} {_show(path)}: page map: {exc}")
            return
        seen.add(ChunkId(entry["page_map"]))
    else:
        chunks = file_chunks(repo, entry)
    for chunk in chunks:
        if chunk in seen:
            continue
        if not readable(chunk):
            report.errors.append(f"snapshot {snap.id.short()} {_show(path)}: chunk {chunk.short()} missing")
            return
        seen.add(chunk)


def _read_packs(repo: Repository, report: CheckReport, subset: float | None,
                progress: Callable[[int, int], None] | None, rng: random.Random,
                findings: dict[PackId, damage.Finding]) -> set[ChunkId]:
    """Read packs back; returns the ids of blobs that failed."""
    # Condemned packs still stored are read too: a kept snapshot may need one until the
    # next prune re-indexes it.
    stored = {PackId.from_hex(key.rsplit("/", 1)[-1]) for key, _ in repo.backend.list(DATA_PREFIX)}
    packs = sorted(set(repo.catalog.packs()) | (set(repo.catalog.condemned_packs()) & stored))
    if subset is not None:
        packs = rng.sample(packs, max(1, round(len(packs) * subset))) if packs else []
    bad: set[ChunkId] = set()
    for number, pack in enumerate(packs, 1):
        key = pack_key(pack)
        try:
            _verify_read_back(repo, pack)
        except ObjectNotFound:
            if pack in repo.catalog.packs():
                report.errors.append(f"{key}: indexed pack is missing")
            continue  # a condemned pack, deleted by a prune meanwhile
        except IntegrityError as exc:  # read twice, damaged twice: damage, recorded
            report.errors.append(str(exc))
            failed = _bad_blobs(repo, pack)
            bad |= failed
            findings.setdefault(pack, damage.Finding()).blobs |= failed
        except EngineError as exc:  # unreachable, refused, a newer format: says nothing of the pack
            report.errors.append(f"{key}: not read back ({exc})")
        report.packs_read += 1
        if progress:
            progress(number, len(packs))
    return bad


def _verify_read_back(repo: Repository, pack: PackId) -> None:
    """Read a pack whole and check it; a pack that fails is read once more (a read
    garbled on its way is no damage), and only a second failure of its content raises
    IntegrityError."""
    try:
        verify_pack(repo.backend.get(pack_key(pack)), pack, repo.cipher)
    except IntegrityError:
        verify_pack(repo.backend.get(pack_key(pack)), pack, repo.cipher)


def _bad_blobs(repo: Repository, pack: PackId) -> set[ChunkId]:
    """Which blobs of a damaged pack fail on their own, twice (the rest may still
    restore); a blob that cannot be read at all this time is not counted."""
    bad = set()
    for entry in repo.catalog.blobs_in_pack(pack):
        for attempt in range(2):
            try:
                decode_blob(repo.backend.get(pack_key(pack), entry.offset, entry.length), entry.id, pack_key(pack),
                            repo.cipher)
                break
            except IntegrityError:
                if attempt:
                    bad.add(entry.id)
            except EngineError:
                break
    return bad


def _name_victims(repo: Repository, snapshots: list[SnapshotInfo], bad: set[ChunkId],
                  report: CheckReport) -> None:
    for snap in snapshots:
        try:
            for path, entry in walk(repo, snap.tree):
                if entry["type"] == "file" and bad & set(file_chunks(repo, entry)):
                    report.errors.append(f"snapshot {snap.id.short()} {_show(path)}: damaged data")
        except EngineError:
            continue  # a damaged tree is already reported by the structure check


def _show(path: bytes) -> str:
    return os.fsdecode(path)

