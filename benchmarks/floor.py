"""The physical floor: what any backup tool must at least move, and how fast this machine
reads and hashes, so that figures are judged against the data and not only against peers.

Changed database bytes are counted in pages, at the database's own page size, between
backup-API images of two states: that is what a page-exact incremental tool would store.
Blob bytes are the sizes of files that are new or whose content changed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import blake3

READ_BLOCK = 1 << 20
TIERS = ("db", "blobs")


def db_image(database: Path, out: Path) -> Path:
    """A consistent copy of ``database`` (backup API in one step, page numbering kept)."""
    out.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    target = sqlite3.connect(out)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    return out


def page_size(image: Path) -> int:
    with open(image, "rb") as handle:
        header = handle.read(18)
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def changed_db_bytes(old: Path, new: Path) -> int:
    """Bytes of the pages of ``new`` that ``old`` does not hold at the same page number."""
    size = page_size(new)
    changed = 0
    with open(old, "rb") as a, open(new, "rb") as b:
        while page := b.read(size):
            if a.read(size) != page:
                changed += 1
    return changed * size


def blob_sizes(root: Path) -> dict[str, int]:
    """Size of every file under blobs/, keyed like clubstate.blob_digests."""
    out = {}
    for dirpath, _dirs, files in os.walk(root / "blobs"):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.stat().st_size
    return out


def changed_blob_bytes(old: dict[str, str], new: dict[str, str], sizes: dict[str, int]) -> int:
    """Bytes of files in ``new`` (path -> digest) that are absent from or differ in ``old``."""
    return sum(sizes[path] for path, digest in new.items() if old.get(path) != digest)


def _files(root: Path) -> list[Path]:
    return [Path(d) / name for tier in TIERS for d, _dirs, names in os.walk(root / tier) for name in names]


def read_and_hash_seconds(root: Path) -> dict[str, float]:
    """Seconds to read db/ + blobs/ (page cache warm, as in every step) and to read and
    blake3-hash them in one single-threaded pass; and the byte count."""
    files = _files(root)
    started = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            while block := handle.read(READ_BLOCK):
                total += len(block)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    for path in files:
        hasher = blake3.blake3()
        with open(path, "rb") as handle:
            while block := handle.read(READ_BLOCK):
                hasher.update(block)
        hasher.digest()
    hash_s = time.perf_counter() - started
    return {"bytes": total, "read_s": round(read_s, 3), "hash_s": round(hash_s, 3)}
