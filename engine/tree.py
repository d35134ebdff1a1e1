"""Directory trees: one record per directory, stored as a TREE blob, named by its hash.

An unchanged directory encodes to the same bytes, hence the same id, hence no write: a
snapshot's metadata grows with what changed, not with the size of the data dir. A
directory with thousands of entries (``blobs/`` with one entry per package) is split
into parts at content-defined boundaries on entry names, so adding a package rewrites
one part of ~128 entries plus a short list of part ids, not the whole listing.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from .format import BlobType, ChunkId, digest, pack_record, unpack_record

Entry = dict[str, Any]

SPLIT_ABOVE = 256      # directories with more entries than this are split into parts
BOUNDARY_MODULUS = 128  # average entries per part


class BlobSink(Protocol):
    def add_blob(self, blob_type: BlobType, raw: bytes, blob_id: ChunkId | None = None) -> ChunkId: ...


class BlobStore(BlobSink, Protocol):
    def read_blob(self, blob_id: ChunkId) -> bytes: ...


def store_tree(store: BlobSink, entries: list[Entry]) -> ChunkId:
    """Store a directory listing (entries sorted by name) and return its tree id."""
    if len(entries) <= SPLIT_ABOVE:
        return store.add_blob(BlobType.TREE, pack_record({"entries": entries}))
    parts = [store.add_blob(BlobType.TREE, pack_record({"entries": part}))
             for part in _split(entries)]
    return store.add_blob(BlobType.TREE, pack_record({"parts": [bytes(p) for p in parts],
                                                      "count": len(entries)}))


def _split(entries: list[Entry]) -> Iterator[list[Entry]]:
    """Cut after entries whose name hash hits the boundary: stable under inserts."""
    part: list[Entry] = []
    for entry in entries:
        part.append(entry)
        if int.from_bytes(digest(entry["name"])[:4], "little") % BOUNDARY_MODULUS == 0:
            yield part
            part = []
    if part:
        yield part


def load_tree(store: BlobStore, tree_id: ChunkId) -> list[Entry]:
    record = unpack_record(store.read_blob(tree_id), f"tree {tree_id.short()}")
    if "parts" in record:
        return [e for part in record["parts"] for e in load_tree(store, ChunkId(part))]
    return list(record["entries"])


def walk(store: BlobStore, tree_id: ChunkId, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
    """Every entry under a tree, depth first, as (relative path, entry)."""
    for entry in load_tree(store, tree_id):
        path = prefix + entry["name"]
        yield path, entry
        if entry["type"] == "dir":
            yield from walk(store, ChunkId(entry["tree"]), path + b"/")


def lookup(store: BlobStore, tree_id: ChunkId, rel: bytes,
           loaded: dict[ChunkId, dict[bytes, Entry]] | None = None) -> list[Entry] | None:
    """The entries along ``rel`` (a/b/c: a's, b's, c's), or None when it is not there.
    ``loaded`` keeps the trees read, for callers that look up many paths."""
    loaded = {} if loaded is None else loaded
    found = []
    for name in rel.split(b"/"):
        if tree_id not in loaded:
            loaded[tree_id] = {e["name"]: e for e in load_tree(store, tree_id)}
        entry = loaded[tree_id].get(name)
        if entry is None:
            return None
        found.append(entry)
        if entry["type"] != "dir":
            break
        tree_id = ChunkId(entry["tree"])
    return found if len(found) == rel.count(b"/") + 1 else None
