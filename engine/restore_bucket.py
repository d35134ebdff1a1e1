"""Restore a snapshot's ``blobs/`` tier into a bucket: club's blob store on S3 or GCS.

Each file under ``blobs/`` becomes the object of the same key under the target's prefix,
sidecars included. An object already there with the same size and the ETag the snapshot
recorded (a snapshot taken from that bucket) is left alone. Large objects are streamed:
chunks are fetched in file order, a few MiB at a time, and uploaded in parts, so a large
tarball never sits whole in memory. Small objects stored in one pack are fetched together
(a few ranged GETs for hundreds of screenshots and sidecars). Several objects upload at
once. Each object appears
whole or not at all (S3 semantics), so an interrupted restore can simply be run again.
The database cannot live in a bucket: ``db/`` is restored into a directory separately.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .backends.s3 import S3Backend
from .errors import IntegrityError, ObjectNotFound, UsageError
from .format import ChunkId, PackId, display, pack_key
from .packs import BlobEntry, coalesce
from .repository import Repository, SnapshotInfo
from .restore import FilePlan, normalise_include, select_files
from .sources.bucket import TIER

RUN_BYTES = 4 << 20  # contiguous stored chunks fetched in one ranged GET, at most
GROUP_BYTES = 8 << 20  # small objects of one pack restored together, per upload worker


@dataclass
class BucketRestorePlan:
    snapshot: SnapshotInfo
    target: str
    uploads: list[tuple[str, FilePlan]] = field(default_factory=list)  # (key, file)
    unchanged: int = 0
    deletions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # snapshot paths outside blobs/

    def summary(self) -> dict[str, object]:
        return {"snapshot": self.snapshot.id.hex(), "time": self.snapshot.time.isoformat(), "target": self.target,
                "objects": len(self.uploads) + self.unchanged, "objects_to_write": len(self.uploads),
                "objects_unchanged": self.unchanged, "bytes_to_upload": sum(f.entry["size"] for _, f in self.uploads),
                "deletions": len(self.deletions), "not_restored": self.skipped}


@dataclass
class BucketRestoreResult:
    objects_written: int = 0
    bytes_uploaded: int = 0
    deleted: int = 0


def plan_bucket_restore(repo: Repository, snapshot: SnapshotInfo, target: S3Backend,
                        includes: list[str] | None = None, delete: bool = False) -> BucketRestorePlan:
    """What to upload and delete; lists the target once."""
    repo.sync_index()
    plan = BucketRestorePlan(snapshot, target.url)
    files = select_files(repo, snapshot, includes)
    plan.skipped = sorted({display(f.rel).split("/", 1)[0] for f in files if not f.rel.startswith(TIER + b"/")})
    wanted = {display(f.rel)[len(TIER) + 1:]: f for f in files if f.rel.startswith(TIER + b"/")}
    if not wanted and not delete:
        raise UsageError(f"snapshot {snapshot.id.short()} has no blobs/ files to restore into a bucket")
    present = {info.key: info for info in target.list_objects()}
    for key, file in sorted(wanted.items()):
        there = present.get(key)
        if (there is not None and there.etag and there.size == file.entry["size"]
                and there.etag == file.entry.get("etag")):
            plan.unchanged += 1
        else:
            plan.uploads.append((key, file))
    if delete:
        if not wanted:
            raise UsageError(f"snapshot {snapshot.id.short()} has no blobs/ files in scope: --delete would empty "
                             f"{target.url}; refusing")
        scopes = _delete_scopes(includes)
        plan.deletions = sorted(key for key in present if key not in wanted
                                and (scopes is None or any(key == s or key.startswith(s + "/") for s in scopes)))
    return plan


def _delete_scopes(includes: list[str] | None) -> list[str] | None:
    """The key prefixes ``--delete`` may remove under: all (None) without ``--include`` or
    with ``--include blobs``; ``x`` for ``--include blobs/x``; includes outside ``blobs/``
    (``db``) reach nothing in a bucket."""
    if not includes:
        return None
    scopes = []
    for include in includes:
        path = display(normalise_include(include))
        if path == "blobs":
            return None
        if path.startswith("blobs/"):
            scopes.append(path[len("blobs/"):])
    return scopes


def apply_bucket_restore(repo: Repository, plan: BucketRestorePlan, target: S3Backend,
                         progress: Callable[[int, int], None] | None = None) -> BucketRestoreResult:
    located = repo.locate_many(c for _, f in plan.uploads for c in f.chunks)
    result = BucketRestoreResult()
    total = sum(f.entry["size"] for _, f in plan.uploads)
    # Small objects whose chunks share one pack are fetched together, a pack's worth of
    # ranged GETs for all of them (club's screenshots and sidecars come by the thousand);
    # the others are streamed one by one.
    by_pack: dict[PackId, list[tuple[str, FilePlan]]] = defaultdict(list)
    streamed = []
    for key, file in plan.uploads:
        packs = {located[c].pack for c in file.chunks}
        if len(packs) == 1 and file.entry["size"] <= RUN_BYTES:
            by_pack[packs.pop()].append((key, file))
        else:
            streamed.append((key, file))
    groups = [(pack, part) for pack, members in by_pack.items() for part in _bounded(members, GROUP_BYTES)]

    def upload_group(pack: PackId, group: list[tuple[str, FilePlan]]) -> int:
        raw = _fetch_pack_blobs(repo, pack, [located[c] for _, f in group for c in f.chunks])
        for key, file in group:
            data = b"".join(raw[c] for c in file.chunks)
            target.put_stream(key, [data], len(data))
        return sum(int(f.entry["size"]) for _, f in group)

    def upload_streamed(key: str, file: FilePlan) -> int:
        target.put_stream(key, _file_content(repo, file, located), file.entry["size"])
        return int(file.entry["size"])

    with ThreadPoolExecutor(target.concurrency, thread_name_prefix="restore-upload") as pool:
        jobs = [pool.submit(upload_group, pack, group) for pack, group in groups]
        jobs += [pool.submit(upload_streamed, key, file) for key, file in streamed]
        for job, count in zip(jobs, [len(g) for _, g in groups] + [1] * len(streamed)):
            result.bytes_uploaded += job.result()
            result.objects_written += count
            if progress:
                progress(result.bytes_uploaded, total)
    for key in plan.deletions:
        target.delete(key)
        result.deleted += 1
    return result


def _bounded(files: list[tuple[str, FilePlan]], limit: int) -> Iterator[list[tuple[str, FilePlan]]]:
    """Consecutive runs of ``files`` holding at most ``limit`` bytes (bounded memory per
    upload worker)."""
    run: list[tuple[str, FilePlan]] = []
    size = 0
    for item in files:
        if run and size + item[1].entry["size"] > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += item[1].entry["size"]
    if run:
        yield run


def _fetch_pack_blobs(repo: Repository, pack: PackId, entries: list[BlobEntry]) -> dict[ChunkId, bytes]:
    """The given blobs of one pack, decoded, in as few ranged GETs as ``coalesce`` allows."""
    key = pack_key(pack)
    raw: dict[ChunkId, bytes] = {}
    for start, end, members in coalesce({e.id: e for e in entries}.values()):
        try:
            data = repo.backend.get(key, start, end - start)
        except ObjectNotFound as exc:
            raise IntegrityError(f"{key}: pack missing, needed by {len(members)} chunk(s)") from exc
        for entry in members:
            raw[entry.id] = repo.decode_or_note(
                memoryview(data)[entry.offset - start:entry.offset - start + entry.length], entry, key)
    return raw


def _file_content(repo: Repository, file: FilePlan, located: dict[ChunkId, BlobEntry]) -> Iterator[bytes]:
    """The file's bytes in order: runs of chunks stored back to back in one pack (as a
    snapshot writes them) come in one ranged GET of at most ``RUN_BYTES``."""
    run: list[BlobEntry] = []
    for chunk in file.chunks:
        entry = located[chunk]
        if run and (entry.pack != run[-1].pack or entry.offset != run[-1].offset + run[-1].length
                    or entry.offset + entry.length - run[0].offset > RUN_BYTES):
            yield from _fetch_run(repo, run, file)
            run = []
        run.append(entry)
    if run:
        yield from _fetch_run(repo, run, file)


def _fetch_run(repo: Repository, run: list[BlobEntry], file: FilePlan) -> Iterator[bytes]:
    key = pack_key(run[0].pack)
    start = run[0].offset
    try:
        data = repo.backend.get(key, start, run[-1].offset + run[-1].length - start)
    except ObjectNotFound as exc:
        raise IntegrityError(f"{key}: pack missing, needed by {display(file.rel)}") from exc
    for entry in run:
        yield repo.decode_or_note(memoryview(data)[entry.offset - start:entry.offset - start + entry.length], entry, key)
