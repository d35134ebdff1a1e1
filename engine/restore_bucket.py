"""Restore a snapshot's ``blobs/`` tier into a bucket: club's blob store on S3 or GCS.

Each file under ``blobs/`` becomes the object of the same key under the target's prefix,
sidecars included. An object already there with the same size and the ETag the snapshot
recorded (a snapshot taken from that bucket) is left alone. Objects are streamed: chunks
are fetched in file order, a few MiB at a time, and uploaded in parts, so a large
tarball never sits whole in memory; several objects upload at once. Each object appears
whole or not at all (S3 semantics), so an interrupted restore can simply be run again.
The database cannot live in a bucket: ``db/`` is restored into a directory separately.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .backends.s3 import S3Backend
from .errors import IntegrityError, ObjectNotFound, UsageError
from .format import ChunkId, decode_blob, display, pack_key
from .packs import BlobEntry
from .repository import Repository, SnapshotInfo
from .restore import FilePlan, select_files
from .sources.bucket import TIER

RUN_BYTES = 4 << 20  # contiguous stored chunks fetched in one ranged GET, at most


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
        if there is not None and there.size == file.entry["size"] and there.etag == file.entry.get("etag"):
            plan.unchanged += 1
        else:
            plan.uploads.append((key, file))
    if delete:
        scopes = [i.strip("/").removeprefix("blobs").strip("/") for i in includes or []]
        plan.deletions = sorted(key for key in present if key not in wanted
                                and (not scopes or any(key == s or key.startswith(s + "/") for s in scopes)))
    return plan


def apply_bucket_restore(repo: Repository, plan: BucketRestorePlan, target: S3Backend,
                         progress: Callable[[int, int], None] | None = None) -> BucketRestoreResult:
    located = repo.locate_many(c for _, f in plan.uploads for c in f.chunks)
    result = BucketRestoreResult()
    total = sum(f.entry["size"] for _, f in plan.uploads)

    def upload(key: str, file: FilePlan) -> int:
        target.put_stream(key, _file_content(repo, file, located), file.entry["size"])
        return int(file.entry["size"])

    with ThreadPoolExecutor(target.concurrency, thread_name_prefix="restore-upload") as pool:
        for size in pool.map(lambda item: upload(*item), plan.uploads):
            result.objects_written += 1
            result.bytes_uploaded += size
            if progress:
                progress(result.bytes_uploaded, total)
    for key in plan.deletions:
        target.delete(key)
        result.deleted += 1
    return result


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
        yield decode_blob(memoryview(data)[entry.offset - start:entry.offset - start + entry.length], entry.id, key)
