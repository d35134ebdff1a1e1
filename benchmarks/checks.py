"""Is a restored data dir the source as it was? Every restore of every tool goes through here.

The database must pass integrity_check and hold the same rows as the source at that
time (clubstate digests every table); every blob file of that time must be there,
byte-identical. A peer restoring over a newer data dir cannot delete files the snapshot
lacks, so for that case extra files are counted (club sees them as orphan blobs) rather
than failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.clubstate import blob_digests, db_dump


class CheckFailed(Exception):
    """A restore did not reproduce the source state: the run must fail."""


def check_restore(target: Path, expected: dict[str, Any], only_db: bool = False,
                  allow_extra: bool = False) -> dict[str, Any]:
    database = target / "db" / "club.db"
    if not database.is_file():
        raise CheckFailed(f"{target}: no db/club.db after the restore")
    db = db_dump(database, live=False)
    if db != expected["db"]:
        wrong = sorted(k for k in expected["db"] if db.get(k) != expected["db"][k])
        raise CheckFailed(f"{target}: db/club.db differs from the source in {', '.join(wrong[:8])}")
    if only_db:
        return {"verified": True}
    blobs = blob_digests(target)
    wrong = [p for p, digest in expected["blobs"].items() if blobs.get(p) != digest]
    extra = [p for p in blobs if p not in expected["blobs"]]
    if wrong or (extra and not allow_extra):
        raise CheckFailed(f"{target}: {len(wrong)} blob file(s) missing or different (e.g. {wrong[:3]}), "
                          f"{len(extra)} unexpected (e.g. {extra[:3]})")
    return {"verified": True, "leftover_files": len(extra)}
