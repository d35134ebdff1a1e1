"""What changed between two snapshots, walking only subtrees whose ids differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .format import ChunkId
from .repository import Repository
from .tree import Entry, load_tree, walk


@dataclass(frozen=True)
class Change:
    kind: str  # "+" added, "-" removed, "M" content changed, "m" metadata only
    path: bytes
    size_delta: int


def diff_trees(repo: Repository, old: ChunkId, new: ChunkId, prefix: bytes = b"") -> Iterator[Change]:
    if old == new:
        return
    before = {e["name"]: e for e in load_tree(repo, old)}
    after = {e["name"]: e for e in load_tree(repo, new)}
    for name in sorted(before.keys() | after.keys()):
        yield from _compare(repo, prefix + name, before.get(name), after.get(name))


def _compare(repo: Repository, path: bytes, old: Entry | None, new: Entry | None) -> Iterator[Change]:
    if old is not None and new is not None and old["type"] == new["type"] == "dir":
        yield from diff_trees(repo, ChunkId(old["tree"]), ChunkId(new["tree"]), path + b"/")
        return
    if old is not None and (new is None or old["type"] != new["type"]):
        yield from _all(repo, "-", path, old)
    if new is not None and (old is None or old["type"] != new["type"]):
        yield from _all(repo, "+", path, new)
    if old is not None and new is not None and old["type"] == new["type"]:
        if any(old.get(k) != new.get(k) for k in ("chunks", "page_map", "target")):
            yield Change("M", path, new.get("size", 0) - old.get("size", 0))
        elif (old["mode"], old["mtime"]) != (new["mode"], new["mtime"]):
            yield Change("m", path, 0)


def _all(repo: Repository, kind: str, path: bytes, entry: Entry) -> Iterator[Change]:
    sign = 1 if kind == "+" else -1
    yield Change(kind, path, sign * entry.get("size", 0))
    if entry["type"] == "dir":
        for sub, child in walk(repo, ChunkId(entry["tree"]), path + b"/"):
            yield Change(kind, sub, sign * child.get("size", 0))
