"""One consistent cut between club.db and blobs/ (CLUB_DATA §2.2 and §5, format §6.6).

The cut must hold whatever order a writer follows. club publishes a version's row before
its blobs and deletes the blobs before the row; other writers do the opposite. So no
single order of "read the database" and "read the blobs" is enough on its own:

1. The blobs are scanned and stored **first**, then the databases are pinned (the pin
   is the snapshot's time). A blob deleted before the pin is either in the scan (an
   orphan now, harmless) or gone with its row already gone, or still named: see 3.
2. The **second look**: every blob the pinned club.db names that the scan missed, or
   found at another size than the row, is looked for again on disk and read (a publish
   or a forced republish landed during the scan; club writes the row first, so the
   tarball may still be on its way: a few tries, for at most a couple of seconds).
3. A named blob still missing is asked about on the **live** database (a fresh
   connection, not the pin). When the live database no longer names it (or names other
   bytes), club is deleting (or republishing) it right now: the pins are released and
   taken again, a bounded number of times, before any database page is read.
4. What is missing after that and still named by the live database is **lost**: club.db
   names it and the data dir lacks it. It is carried forward from the parent snapshot
   when the parent has it (with the size its row records), so the restore stays whole,
   and it is always reported (``lost``): a lost blob must never look like a good backup.
   A named blob missing with no earlier copy is ``dangling`` as well.

A blob missing whose row the live database no longer names, after the last pin, is a
delete that outran every pin: carried forward when the parent has it (not lost), else
dangling. A publish that lands after the pin is at worst an orphan.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .clubcheck import Expected, named_by_version
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
    lost: list[bytes] = field(default_factory=list)            # named, missing, and still named live
    verification: dict[str, Any] | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.carried:
            record["carried_forward"] = sorted(display(rel) for rel in self.carried)[:MAX_LISTED]
        if self.dangling:
            record["dangling"] = self.dangling[:MAX_LISTED]
        if self.lost:
            record["lost"] = sorted(display(rel) for rel in self.lost)[:MAX_LISTED]
            record["lost_count"] = len(self.lost)
        if self.verification is not None:
            record["verified"] = self.verification
        return record


def blob_path(item: Expected) -> bytes:
    return b"blobs/" + item.key.encode()


def unmatched(expected: list[Expected], entries: dict[bytes, Entry]) -> list[Expected]:
    """The named blobs the snapshot lacks, or holds at another size than the row says."""
    out = []
    for item in expected:
        entry = entries.get(blob_path(item))
        if entry is None or entry["type"] != "file" or (item.size is not None and entry["size"] != item.size):
            out.append(item)
    return out


def live_names(database: str, items: list[Expected]) -> dict[str, Expected]:
    """What the live database (a new connection, its newest commit) names of ``items``'
    keys: key -> the live row's expectation; a key no row names is absent. A database
    that cannot be opened this way (a stopped club on a read-only mount) names them all
    as pinned: nothing can be deleting them."""
    try:
        conn = sqlite3.connect(f"file:{quote(database)}?mode=ro", uri=True, timeout=5, isolation_level=None)
    except sqlite3.Error:
        return {item.key: item for item in items}
    try:
        conn.execute("BEGIN")  # one commit's view for all of them
        found: dict[str, Expected] = {}
        for package, version in sorted({tuple(item.key.split("/")[:2]) for item in items}):
            found |= {e.key: e for e in named_by_version(conn, package, version)}
        return {item.key: found[item.key] for item in items if item.key in found}
    except sqlite3.Error:
        return {item.key: item for item in items}
    finally:
        conn.close()


def consistent_cut(repo: Repository, expected: list[Expected] | None, entries: dict[bytes, Entry],
                   still_named: dict[str, Expected], parent: SnapshotInfo | None, verify: bool) -> Cut:
    """Judge what the final pin's club.db names but the snapshot lacks (after the second
    look): lost when the live database still names it (``still_named``), else a delete
    that outran the pins; either is carried forward when the parent has a copy of the
    size its row records. With ``verify``, also hold every named blob's size to the row
    (no data is read)."""
    cut = Cut()
    if expected is None:
        return cut
    loaded: dict[ChunkId, dict[bytes, Entry]] = {}
    for item in expected:
        rel = blob_path(item)
        if rel in entries:
            continue
        if item.key in still_named:
            cut.lost.append(rel)
        found = _parent_copy(repo, parent, rel, item, loaded)
        if found is None:
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


def _parent_copy(repo: Repository, parent: SnapshotInfo | None, rel: bytes, item: Expected,
                 loaded: dict[ChunkId, dict[bytes, Entry]]) -> list[Entry] | None:
    """The parent's entries down to ``rel``, when it holds a whole copy the row can use."""
    try:
        found = lookup(repo, parent.tree, rel, loaded) if parent else None
    except IntegrityError:
        return None  # the parent's tree is no longer live (pruned): nothing to carry
    if (found is None or found[-1]["type"] != "file"
            or (item.size is not None and found[-1]["size"] != item.size)
            or not _all_stored(repo, found[-1])):
        return None
    return found


def _all_stored(repo: Repository, entry: Entry) -> bool:
    """A carried entry must not name a chunk a prune has condemned (format §10)."""
    chunks = [ChunkId(c) for c in entry.get("chunks", [])]
    return len(repo.which_exist(chunks)) == len(set(chunks))


def _verify(expected: list[Expected], entries: dict[bytes, Entry]) -> dict[str, Any]:
    problems = []
    for item in expected:
        entry = entries.get(blob_path(item))
        if entry is None or entry["type"] != "file":
            problems.append(f"{item.key}: missing")
        elif item.size is not None and entry["size"] != item.size:
            problems.append(f"{item.key}: size {entry['size']}, database says {item.size}")
    return {"consistent": not problems, "checked": len(expected), "problems": problems[:MAX_LISTED],
            "problem_count": len(problems)}
