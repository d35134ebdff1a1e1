"""A club blob store that lives in a bucket instead of ``blobs/`` (CLUB_DATA §2: the same
key layout, plus an ``artifacts/package.json`` sidecar per version on S3 and GCS).

The bucket is listed once (one LIST per 1000 keys) and its objects become the snapshot's
``blobs/`` tier: key ``a/b/c`` is the file ``blobs/a/b/c``, directories are implied by the
keys. An object is downloaded only when its size or ETag differs from what the files
cache remembers, and then streamed through the chunker: a large tarball never sits whole
in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.s3 import ObjectInfo, S3Backend
from ..format import display

TIER = b"blobs"
FILE_MODE, DIR_MODE = 0o644, 0o755


@dataclass
class BucketListing:
    objects: dict[bytes, ObjectInfo] = field(default_factory=dict)  # "blobs/<key>" -> object
    dirs: dict[bytes, dict[str, object]] = field(default_factory=dict)  # implied directories
    errors: list[str] = field(default_factory=list)


def list_blob_store(store: S3Backend) -> BucketListing:
    """Every object of the store as a path under ``blobs/``, and the directories implied.
    Keys that cannot be a relative path (``a//b``, ``..``) are reported, not taken: a
    restore would have nowhere safe to put them."""
    listing = BucketListing()
    listing.dirs[TIER] = _dir_meta(TIER)
    for info in store.list_objects():
        parts = info.key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            listing.errors.append(f"{store.url}/{info.key}: key is not a relative path; not taken")
            continue
        rel = TIER + b"/" + info.key.encode()
        listing.objects[rel] = info
        imply_dirs(listing, rel)
    # `a/b` and `a/b/c` in one bucket: a file and a directory of one name cannot both be
    # restored into a directory. The object is reported and left out, the rest kept.
    for rel in sorted(set(listing.objects) & set(listing.dirs)):
        del listing.objects[rel]
        listing.errors.append(f"{store.url}/{display(rel)[len(TIER) + 1:]}: key is also a prefix of other keys "
                              f"(a file and a directory of one name); not taken")
    return listing


def imply_dirs(listing: BucketListing, rel: bytes) -> None:
    """Add the directories ``blobs/<key>`` implies (an object found after the listing too)."""
    parts = rel.split(b"/")[1:]
    for depth in range(1, len(parts)):
        directory = TIER + b"/" + b"/".join(parts[:depth])
        listing.dirs.setdefault(directory, _dir_meta(directory))


def object_entry(rel: bytes, size: int, mtime_ns: int, etag: str, chunks: list[bytes], chunker: str
                 ) -> dict[str, object]:
    """A tree entry for an object: a file with fixed owner and mode, and its ETag (which a
    restore into a bucket compares to skip objects already there)."""
    return {"name": rel.rsplit(b"/", 1)[-1], "mode": FILE_MODE, "mtime": mtime_ns, "uid": 0, "gid": 0,
            "type": "file", "size": size, "chunker": chunker, "chunks": chunks, "etag": etag}


def _dir_meta(rel: bytes) -> dict[str, object]:
    # Fixed metadata: a bucket has no directories, and a constant keeps unchanged
    # directory trees identical from one snapshot to the next.
    return {"name": rel.rsplit(b"/", 1)[-1], "mode": DIR_MODE, "mtime": 0, "uid": 0, "gid": 0}
