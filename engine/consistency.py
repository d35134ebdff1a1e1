"""One consistent cut between club.db and blobs/ (CLUB_DATA §2.2 and §5).

The database is captured first, the blobs scanned after. club commits a publish's row
before writing its blobs, so a blob the captured rows name was already written; and it
deletes a version's blobs before its row, so a version can vanish during the scan while
the captured rows still name it. The blobs of such a version are carried forward from
the parent snapshot, and the snapshot lists them. Only a vanished version qualifies (its
tarball is gone too, from the scan or from the disk by the end of it): a forced republish rewrites screenshots and README assets under
the same names, so a missing asset of a version still present may be on its way, and
the parent's copy could be the wrong bytes; it is left missing (``dangling``). A carried
blob must also have the size its row records. A publish that lands during the scan is at
worst an orphan: a blob no captured row names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .clubcheck import Expected
from .errors import IntegrityError
from .format import ChunkId, display
from .repository import Repository, SnapshotInfo
from .tree import Entry, lookup

CLUB_DB = b"db/club.db"
MAX_LISTED = 100  # problems or carried paths a record lists by name


@dataclass
class Cut:
    carried: dict[bytes, Entry] = field(default_factory=dict)  # path -> the parent's entry
    dirs: dict[bytes, Entry] = field(default_factory=dict)     # directories only those need
    dangling: list[str] = field(default_factory=list)          # named, in neither snapshot
    verification: dict[str, Any] | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.carried:
            record["carried_forward"] = sorted(display(rel) for rel in self.carried)[:MAX_LISTED]
        if self.dangling:
            record["dangling"] = self.dangling[:MAX_LISTED]
        if self.verification is not None:
            record["verified"] = self.verification
        return record


def consistent_cut(repo: Repository, still_present: Callable[[bytes], bool], expected: list[Expected] | None,
                   entries: dict[bytes, Entry], parent: SnapshotInfo | None, verify: bool) -> Cut:
    """Carry forward what the captured database names but the scan no longer found;
    with ``verify``, also hold every named blob's size to the row (no data is read).
    ``still_present(path)`` says whether a file (or bucket object) exists now."""
    cut = Cut()
    if expected is None:
        return cut
    loaded: dict[ChunkId, dict[bytes, Entry]] = {}
    for item in expected:
        rel = b"blobs/" + item.key.encode()
        if rel in entries:
            continue
        # Gone: its tarball missed the scan, or is missing now (club's rmtree of a version
        # removes files in no set order). A republish never removes the tarball: it
        # replaces it by a rename.
        tarball = _tarball(item.key)
        version_gone = tarball not in entries or not still_present(tarball)
        try:
            found = lookup(repo, parent.tree, rel, loaded) if parent and version_gone else None
        except IntegrityError:
            found = None  # the parent's tree is no longer live (pruned): nothing to carry
        if (found is None or found[-1]["type"] != "file"
                or (item.size is not None and found[-1]["size"] != item.size)
                or not _all_stored(repo, found[-1])):
            cut.dangling.append(item.key)
            continue
        cut.carried[rel] = found[-1]
        parts = rel.split(b"/")
        for depth, entry in enumerate(found[:-1]):
            cut.dirs.setdefault(b"/".join(parts[:depth + 1]),
                                {k: v for k, v in entry.items() if k not in ("type", "tree")})
    if verify:
        cut.verification = _verify(expected, entries | cut.carried)
    return cut


def _all_stored(repo: Repository, entry: Entry) -> bool:
    """A carried entry must not name a chunk a prune has condemned (format §10)."""
    chunks = [ChunkId(c) for c in entry.get("chunks", [])]
    return len(repo.which_exist(chunks)) == len(set(chunks))


def _tarball(key: str) -> bytes:
    package, version = key.split("/")[:2]
    return f"blobs/{package}/{version}/artifacts/package.tar.gz".encode()


def _verify(expected: list[Expected], entries: dict[bytes, Entry]) -> dict[str, Any]:
    problems = []
    for item in expected:
        entry = entries.get(b"blobs/" + item.key.encode())
        if entry is None or entry["type"] != "file":
            problems.append(f"{item.key}: missing")
        elif item.size is not None and entry["size"] != item.size:
            problems.append(f"{item.key}: size {entry['size']}, database says {item.size}")
    return {"consistent": not problems, "checked": len(expected), "problems": problems[:MAX_LISTED],
            "problem_count": len(problems)}
