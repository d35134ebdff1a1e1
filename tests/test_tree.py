"""Trees: unchanged directories dedupe; a huge directory changes by parts."""

from __future__ import annotations

from engine.format import BlobType, ChunkId, digest
from engine.tree import load_tree, store_tree


class MemoryStore:
    def __init__(self) -> None:
        self.blobs: dict[ChunkId, bytes] = {}

    def add_blob(self, blob_type: BlobType, raw: bytes, blob_id: ChunkId | None = None) -> ChunkId:
        blob_id = blob_id or ChunkId(digest(raw))
        self.blobs.setdefault(blob_id, raw)
        return blob_id

    def read_blob(self, blob_id: ChunkId) -> bytes:
        return self.blobs[blob_id]


def _entries(names: list[str]) -> list[dict]:
    return [{"name": n.encode(), "type": "dir", "mode": 0o755, "mtime": 1, "uid": 0, "gid": 0,
             "tree": b"\0" * 32} for n in sorted(names)]


def test_same_listing_same_id() -> None:
    store = MemoryStore()
    assert store_tree(store, _entries(["a", "b"])) == store_tree(store, _entries(["a", "b"]))


def test_large_directory_round_trips() -> None:
    store = MemoryStore()
    names = [f"pkg_{i:05d}" for i in range(5000)]
    tree = store_tree(store, _entries(names))
    assert [e["name"].decode() for e in load_tree(store, tree)] == names


def test_adding_one_package_to_thousands_writes_little() -> None:
    store = MemoryStore()
    names = [f"pkg_{i:05d}" for i in range(5000)]
    store_tree(store, _entries(names))
    before = dict(store.blobs)
    store_tree(store, _entries(names + ["pkg_new_one"]))
    new_bytes = sum(len(raw) for key, raw in store.blobs.items() if key not in before)
    full_listing = sum(len(raw) for raw in before.values())
    assert new_bytes < full_listing / 10
