"""Page maps: which chunk holds each page of a captured SQLite database.

Pages are chunked one by one (club's updates are scattered: SQLITE_NOTES §2), so a 1 GB
database has 262,144 chunk ids: 8 MB as a flat list, more than a day of changes. A
snapshot's map therefore costs what changed, as a *skip delta* (the scheme Subversion
uses for file revisions):

- a **base** lists every page's id, in leaves of ``LEAF_PAGES`` ids; unchanged leaves
  dedupe like any blob;
- map number ``n`` after a base (``seq``) is a **delta** against map ``n & (n - 1)`` of
  the same chain: the pages that differ from it. Resolving a map reads the base and at
  most one delta per set bit of ``n`` (12 for ``MAX_SEQ``), so any snapshot restores with
  a bounded number of reads, while a delta spans ``n``'s lowest set bit of snapshots and
  its average cost stays a small multiple of the pages changed since the parent.

A new base starts when the chain is long (``MAX_SEQ``), when one delta would change more
than ``REBASE_FRACTION`` of the pages (a VACUUM, a restore), or when the deltas written
since the base add up to more than the base itself.

Every map record and leaf is a TREE blob (metadata); ``docs/format.md`` has the records.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

from .errors import IntegrityError
from .format import ID_SIZE, BlobType, ChunkId, pack_record, unpack_record
from .tree import BlobStore

LEAF_PAGES = 1024
MAX_SEQ = 4096
REBASE_FRACTION = 0.25
CHANGE = struct.Struct(">I32s")  # page number (from 1), chunk id


def store_page_map(store: BlobStore, ids: bytes, page_size: int, parent: ChunkId | None) -> ChunkId:
    """Store the map of an image whose page ``i`` (from 1) has chunk id
    ``ids[(i-1)*32:i*32]``; ``parent`` is the previous snapshot's map of the same file."""
    parent_record = _read(store, parent) if parent is not None else None
    if parent is not None and parent_record is not None and parent_record["page_size"] == page_size:
        delta = _delta(store, ids, page_size, parent, parent_record)
        if delta is not None:
            return delta
    leaves = [store.add_blob(BlobType.TREE, pack_record({"page_ids": ids[at:at + LEAF_PAGES * ID_SIZE]}))
              for at in range(0, len(ids), LEAF_PAGES * ID_SIZE)]
    return store.add_blob(BlobType.TREE, pack_record({
        "page_map": "base", "page_size": page_size, "pages": len(ids) // ID_SIZE, "seq": 0,
        "leaves": [bytes(leaf) for leaf in leaves]}))


def _delta(store: BlobStore, ids: bytes, page_size: int, parent: ChunkId,
           parent_record: dict[str, Any]) -> ChunkId | None:
    seq = parent_record["seq"] + 1
    if seq >= MAX_SEQ:
        return None
    chain = _chain(store, parent, parent_record)
    base = chain[0][0]
    reference_seq = seq & (seq - 1)  # on the parent's own chain, by construction
    old = bytearray()
    reference, reference_ids = base, b""
    for map_id, record in chain:
        _apply(old, record, store, map_id)
        if record["seq"] == reference_seq:
            reference, reference_ids = map_id, bytes(old)
    if old == ids:
        return parent  # nothing changed: the parent's map is this image's map
    changes = _changes(reference_ids, ids)
    written = parent_record.get("delta_bytes", 0) + len(changes)
    pages = len(ids) // ID_SIZE
    if len(changes) // CHANGE.size > REBASE_FRACTION * pages or written > len(ids):
        return None
    return store.add_blob(BlobType.TREE, pack_record({
        "page_map": "delta", "page_size": page_size, "pages": pages, "seq": seq, "base": bytes(base),
        "ref": bytes(reference), "changes": changes, "delta_bytes": written}))


def _changes(old: bytes, new: bytes) -> bytes:
    """(page number, id) for every page of ``new`` whose id differs from ``old``'s."""
    return b"".join(CHANGE.pack(at // ID_SIZE + 1, new[at:at + ID_SIZE]) for at in _differing(old, new))


def changed_pages(old: bytes | bytearray, new: bytes | bytearray) -> int:
    """How many pages of ``new`` differ from ``old`` (pages past ``old``'s end count)."""
    return sum(1 for _ in _differing(old, new))


def _differing(old: bytes | bytearray, new: bytes | bytearray) -> Iterator[int]:
    """Byte offsets of the ids in ``new`` that differ from ``old``'s."""
    block = LEAF_PAGES * ID_SIZE
    for start in range(0, len(new), block):  # whole equal blocks are skipped at C speed
        if old[start:start + block] == new[start:start + block]:
            continue
        for at in range(start, min(start + block, len(new)), ID_SIZE):
            if old[at:at + ID_SIZE] != new[at:at + ID_SIZE]:
                yield at


def load_page_ids(store: BlobStore, map_id: ChunkId) -> bytearray:
    """The concatenated chunk ids of every page of the map's image."""
    ids = bytearray()
    for chain_id, record in _chain(store, map_id, _read(store, map_id)):
        _apply(ids, record, store, chain_id)
    return ids


def _chain(store: BlobStore, map_id: ChunkId, record: dict[str, Any]) -> list[tuple[ChunkId, dict[str, Any]]]:
    """The maps ``map_id`` is resolved through, base first."""
    chain = [(map_id, record)]
    while record["page_map"] == "delta":
        map_id = ChunkId(record["ref"])
        record = _read(store, map_id)
        chain.append((map_id, record))
    return chain[::-1]


def _apply(ids: bytearray, record: dict[str, Any], store: BlobStore, map_id: ChunkId) -> None:
    """Turn ``ids`` (the reference's pages) into this map's pages."""
    size = record["pages"] * ID_SIZE
    if record["page_map"] == "base":
        ids.clear()
        for leaf in record["leaves"]:
            ids += unpack_record(store.read_blob(ChunkId(leaf)), f"page map leaf {leaf.hex()[:8]}")["page_ids"]
    else:
        changes = record["changes"]
        if len(ids) < size:
            ids += bytes(size - len(ids))  # every new page is among the changes
        del ids[size:]
        for at in range(0, len(changes), CHANGE.size):
            number, page_id = CHANGE.unpack_from(changes, at)
            ids[(number - 1) * ID_SIZE:number * ID_SIZE] = page_id
    if len(ids) != size:
        raise IntegrityError(f"page map {map_id.short()} lists {len(ids) // ID_SIZE} pages, "
                             f"its record says {record['pages']}")


def page_chunks(store: BlobStore, map_id: ChunkId) -> list[ChunkId]:
    ids = load_page_ids(store, map_id)
    return [ChunkId(bytes(ids[at:at + ID_SIZE])) for at in range(0, len(ids), ID_SIZE)]


def map_blobs(store: BlobStore, map_id: ChunkId) -> list[ChunkId]:
    """The map's own records and leaves (not the pages): what a check must find."""
    blobs = []
    for chain_id, record in _chain(store, map_id, _read(store, map_id)):
        blobs.append(chain_id)
        blobs += [ChunkId(leaf) for leaf in record.get("leaves", [])]
    return blobs


def _read(store: BlobStore, map_id: ChunkId) -> dict[str, Any]:
    record: dict[str, Any] = unpack_record(store.read_blob(map_id), f"page map {map_id.short()}")
    if record.get("page_map") not in ("base", "delta"):
        raise IntegrityError(f"page map {map_id.short()}: not a page map record")
    return record


def file_chunks(store: BlobStore, entry: dict[str, Any]) -> list[ChunkId]:
    """A file entry's data chunks in order: from its page map (a database) or its list."""
    if "page_map" in entry:
        return page_chunks(store, ChunkId(entry["page_map"]))
    return [ChunkId(c) for c in entry["chunks"]]
