"""Walking a club data dir by tiers, without reading file contents.

Tiers (CLUB_DATA §4): ``db/`` and ``blobs/`` always, ``logs/`` on request, ``cache/``
and ``tmp/`` never. club's in-flight blob writes (``<final>.tmp.<µs>``) are never taken:
club deletes them at boot. In ``db/``, SQLite files are recognised by their header and
captured through SQLite (never by plain reads); their ``-wal``/``-shm``/``-journal``
sidecars are never taken, since restoring a stale sidecar silently undoes a restore, nor
the safety copies a restore leaves beside a database it replaced.

club deletes a version by removing its whole ``<pkg>/<ver>/`` directory (CLUB_DATA §2.2),
at any moment of a scan: a file or directory that is gone by the time it is listed or
stat'ed is counted in ``Scan.vanished``, as if deleted before the scan, never an error
(the snapshot would be PARTIAL, and ``status`` would page someone, for a normal delete).
Whether club.db still names it is for the consistent cut to judge (engine/consistency.py).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

from ..format import display

ALWAYS_TIERS = ("db", "blobs")
OPTIONAL_TIERS = ("logs",)
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_SIDECARS = (b"-wal", b"-shm", b"-journal")
CLUB_TEMP_FILE = re.compile(rb"\.tmp\.\d+$")
RESTORE_TEMP_MARK = b".clubsnap-restore-"
PRE_RESTORE_MARK = b".pre-restore-"  # a database a restore replaced, kept aside on the host


@dataclass(frozen=True)
class Item:
    """One file, directory or symlink found by the scan; ``rel`` uses ``/`` separators."""

    rel: bytes
    path: bytes
    st: os.stat_result
    kind: str  # "file", "dir", "symlink", "sqlite"


@dataclass
class Scan:
    items: list[Item] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    vanished: list[bytes] = field(default_factory=list)  # deleted while being listed

    @property
    def files(self) -> list[Item]:
        return [i for i in self.items if i.kind == "file"]

    @property
    def databases(self) -> list[Item]:
        return [i for i in self.items if i.kind == "sqlite"]


def tiers_for(include_logs: bool) -> tuple[str, ...]:
    return ALWAYS_TIERS + (OPTIONAL_TIERS if include_logs else ())


def scan_tier(root: bytes, tier: str, scan: Scan) -> None:
    """Add a tier's directory, and everything under it, to ``scan``."""
    top = os.path.join(root, tier.encode())
    try:
        st = os.stat(top)  # a tier may be a symlink to another volume: follow it
    except FileNotFoundError:
        return
    except OSError as exc:
        scan.errors.append(f"{tier}: {exc.strerror}")
        return
    if stat.S_ISDIR(st.st_mode):
        scan.items.append(Item(tier.encode(), top, st, "dir"))
        _walk(top, tier.encode(), tier, scan)


def _walk(directory: bytes, rel: bytes, tier: str, scan: Scan) -> None:
    try:
        with os.scandir(directory) as listing:
            children = sorted(listing, key=lambda e: e.name)
    except FileNotFoundError:
        _vanish(rel, scan)
        return
    except OSError as exc:
        scan.errors.append(f"{display(rel)}: cannot list directory ({exc.strerror})")
        return
    for child in children:
        child_rel = rel + b"/" + child.name
        try:
            st = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            scan.vanished.append(child_rel)
            continue
        except OSError as exc:
            scan.errors.append(f"{display(child_rel)}: {exc.strerror}")
            continue
        kind = _classify(child.name, child.path, st, tier, scan, child_rel)
        if kind is None:
            continue
        scan.items.append(Item(child_rel, child.path, st, kind))
        if kind == "dir":
            _walk(child.path, child_rel, tier, scan)


def _vanish(rel: bytes, scan: Scan) -> None:
    """A directory listed by its parent and deleted before it was read: dropped, not
    kept as an empty directory the data dir never had at any one time."""
    scan.vanished.append(rel)
    scan.items = [i for i in scan.items if i.rel != rel]


def _classify(name: bytes, path: bytes, st: os.stat_result, tier: str, scan: Scan, rel: bytes) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISREG(st.st_mode):
        return None
    if tier == "blobs" and CLUB_TEMP_FILE.search(name):
        return None
    if RESTORE_TEMP_MARK in name or PRE_RESTORE_MARK in name:
        return None  # left by a (killed) restore: a temporary, or a local safety copy
    if tier == "db":
        if name.endswith(SQLITE_SIDECARS):
            return None
        if _is_sqlite(path, scan, rel):
            return "sqlite"
    return "file"


def _is_sqlite(path: bytes, scan: Scan, rel: bytes) -> bool:
    """Sniff the header. Runs before any SQLite connection exists in this process: closing
    a file descriptor on a database drops the process's POSIX locks on it."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except FileNotFoundError:
        return False  # deleted since the listing: a plain file that then vanishes on read
    except OSError as exc:
        scan.errors.append(f"{display(rel)}: {exc.strerror}")
        return False
