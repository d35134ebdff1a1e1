"""Club-aware checks of a data directory (a restored one, usually): does every database
row that names a blob have it, with the recorded size and hash? (CLUB_DATA §6.5)

club's own admin check only asks whether each version's tarball exists. This one also
checks sizes and SHA-256s, screenshots, README assets, dartdoc pairs and the database
itself, and lists orphans (blobs no row names) separately, since club leaves some behind
by design (a deleted package's dartdoc).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import SourceError

SUPPORTED_SCHEMA = 3
_ASSET_URL = re.compile(r"/api/packages/([a-z][a-z0-9_]*)/versions/([0-9A-Za-z.+-]+)/"
                        r"(readme-assets|screenshots)/(\d+)\.(\w+)")


@dataclass
class ClubReport:
    missing: list[str] = field(default_factory=list)    # a row names a blob that is absent or wrong
    database: list[str] = field(default_factory=list)   # problems inside club.db
    orphans: list[str] = field(default_factory=list)    # blobs no row names (informational)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.database


def check_club(root: Path) -> ClubReport:
    """Check ``root/db/club.db`` against ``root/blobs``; never writes to either."""
    database = root / "db" / "club.db"
    if not database.is_file():
        raise SourceError(f"{database} does not exist")
    report = ClubReport()
    # A restored file has no WAL and is opened immutable (no sidecar is created); a live
    # one is read with its WAL, read-only.
    immutable = "" if Path(f"{database}-wal").exists() else "&immutable=1"
    conn = sqlite3.connect(f"file:{database}?mode=ro{immutable}", uri=True)
    try:
        _check_database(conn, report)
        if report.database and report.database[0].startswith("integrity"):
            return report
        named = _check_versions(conn, root / "blobs", report)
        named |= _check_dartdoc(conn, root / "blobs", report)
    except sqlite3.DatabaseError as exc:
        report.database.append(f"club.db is unreadable: {exc}")
        return report
    finally:
        conn.close()
    _find_orphans(root / "blobs", named, report)
    return report


def _check_database(conn: sqlite3.Connection, report: ClubReport) -> None:
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        report.database.append(f"integrity_check: {'; '.join(integrity[:5])}")
        return
    bad_keys = conn.execute("PRAGMA foreign_key_check").fetchall()
    if bad_keys:
        report.database.append(f"foreign_key_check: {len(bad_keys)} row(s) with a dangling reference")
    user_version = conn.execute("PRAGMA user_version").fetchone()[0]
    schema = conn.execute("SELECT value FROM club_schema WHERE key='schema_version'").fetchone()
    if schema is None or schema[0] != user_version:
        report.database.append(f"club_schema.schema_version {schema and schema[0]} differs from user_version {user_version}")
    elif user_version > SUPPORTED_SCHEMA:
        report.database.append(f"schema version {user_version} is newer than {SUPPORTED_SCHEMA}")
    for name, latest in conn.execute(
            "SELECT p.name, p.latest_version FROM packages p WHERE p.latest_version IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM package_versions v WHERE v.package_name=p.name AND v.version=p.latest_version)"):
        report.database.append(f"packages.latest_version {name} {latest} has no version row")


def _check_versions(conn: sqlite3.Connection, blobs: Path, report: ClubReport) -> set[str]:
    named: set[str] = set()
    rows = conn.execute("SELECT package_name, version, archive_size_bytes, archive_sha256, screenshots, "
                        "readme_content FROM package_versions").fetchall()
    report.checked["versions"] = len(rows)
    for pkg, ver, size, sha, shots, readme in rows:
        tarball = f"{pkg}/{ver}/artifacts/package.tar.gz"
        named.add(tarball)
        _expect(blobs, tarball, size, sha, report)
        for index, shot in enumerate(json.loads(shots or "[]")):
            key = f"{pkg}/{ver}/screenshots/{index}"
            named.add(key)
            _expect(blobs, key, shot.get("sizeBytes"), shot.get("sha256"), report)
        for key in _readme_assets(readme or ""):
            named.add(key)
            if not key.split("/")[2] == "screenshots":
                _expect(blobs, key, None, None, report)
    return named


def _readme_assets(readme: str) -> Iterator[str]:
    for pkg, ver, kind, index, ext in _ASSET_URL.findall(readme):
        yield f"{pkg}/{ver}/{kind}/{index}" + (f".{ext}" if kind == "readme-assets" else "")


def _expect(blobs: Path, key: str, size: int | None, sha: str | None, report: ClubReport) -> None:
    path = blobs / key
    if not path.is_file():
        report.missing.append(f"{key}: missing")
    elif size is not None and path.stat().st_size != size:
        report.missing.append(f"{key}: size {path.stat().st_size}, database says {size}")
    elif sha and _sha256(path) != sha:
        report.missing.append(f"{key}: sha256 differs from the database")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dartdoc(conn: sqlite3.Connection, blobs: Path, report: ClubReport) -> set[str]:
    named: set[str] = set()
    packages = [r[0] for r in conn.execute("SELECT package_name FROM dartdoc_status WHERE status='completed'")]
    report.checked["dartdoc"] = len(packages)
    for pkg in packages:
        blob, index = f"{pkg}/dartdoc/latest/blob", f"{pkg}/dartdoc/latest/index.json"
        if not (blobs / blob).exists() and not (blobs / index).exists():
            continue  # filesystem dartdoc mode: the docs live in cache/, not in blobs/
        named |= {blob, index}
        problem = _dartdoc_problem(blobs / blob, blobs / index, pkg)
        if problem:
            report.missing.append(f"{pkg}/dartdoc/latest: {problem}")
    return named


def _dartdoc_problem(blob: Path, index: Path, pkg: str) -> str | None:
    if not blob.is_file() or not index.is_file():
        return "blob or index.json missing"
    try:
        record = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError):
        return "index.json does not parse"
    if record.get("version") != 1 or not str(record.get("blobId", "")).startswith(f"{pkg}:latest:"):
        return "index.json has an unexpected version or blobId"
    ranges = sorted(_ranges(record.get("index", {})))
    size = blob.stat().st_size
    position = 0
    for start, end in ranges:
        if start != position or end < start:
            return "index ranges are not contiguous"
        position = end
    return None if position == size else f"index ends at {position}, blob has {size} bytes"


def _ranges(node: Any) -> Iterator[tuple[int, int]]:
    if isinstance(node, str):
        start, _, end = node.partition(":")
        yield int(start), int(end)
    elif isinstance(node, dict):
        for child in node.values():
            yield from _ranges(child)


def _find_orphans(blobs: Path, named: set[str], report: ClubReport) -> None:
    for dirpath, _dirs, files in os.walk(blobs):
        for name in files:
            key = os.path.relpath(os.path.join(dirpath, name), blobs)
            if key not in named and ".tmp." not in name and not key.endswith("/artifacts/package.json"):
                report.orphans.append(key)
