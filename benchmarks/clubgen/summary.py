"""Sizes and counts of a generated data dir, for reports and benchmark sanity checks."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from .schema import TABLES

_STRAY = re.compile(r"\.tmp\.\d+$")
_TABLE_NAME = re.compile(r"CREATE (?:VIRTUAL )?TABLE (\w+)")


def blob_kind(key: str) -> str:
    """Classify a blob key by club's layout (§2.1)."""
    parts = key.split("/")
    if _STRAY.search(key):
        return "stray_tmp"
    if len(parts) >= 2 and parts[1] == "dartdoc":
        return "dartdoc"
    if len(parts) >= 3:
        return {"artifacts": "sidecars" if key.endswith(".json") else "tarballs",
                "screenshots": "screenshots", "readme-assets": "readme_assets"}.get(parts[2], "other")
    return "other"


def tier_sizes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, files) per tier and per blob kind."""
    size: dict[str, int] = {}
    files: dict[str, int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        tier = rel.split("/", 1)[0]
        keys = [tier] + ([blob_kind(rel.split("/", 1)[1])] if tier == "blobs" else [])
        for key in keys:
            size[key] = size.get(key, 0) + path.stat().st_size
            files[key] = files.get(key, 0) + 1
    return size, files


def table_counts(db: Path) -> dict[str, int]:
    """Row count of every club table (opening the DB checkpoints any WAL: generate only)."""
    conn = sqlite3.connect(db)
    try:
        names = [m.group(1) for m in map(_TABLE_NAME.match, TABLES) if m]
        return {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in names}
    finally:
        conn.close()
