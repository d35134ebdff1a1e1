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
        _find_orphans(conn, root / "blobs", named, report)
    except sqlite3.DatabaseError as exc:
        report.database.append(f"club.db is unreadable: {exc}")
    finally:
        conn.close()
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


@dataclass(frozen=True)
class Expected:
    """A blob a database row names, with what the row says about it (None: unknown)."""

    key: str  # relative to blobs/
    size: int | None = None
    sha256: str | None = None


def expected_blobs(conn: sqlite3.Connection) -> tuple[list[Expected], list[str]]:
    """Every tarball, screenshot and README asset club.db names (CLUB_DATA §6.5), and the
    rows whose screenshot list does not parse (named, then skipped).

    Used on a restored file here and, by a snapshot, on the pinned image it captured.
    """
    expected, problems = [], []
    for row in conn.execute(f"SELECT {_VERSION_COLUMNS} FROM package_versions"):
        named, problem = _row_expectations(*row)
        expected += named
        problems += problem
    return expected, problems


def named_by_version(conn: sqlite3.Connection, package: str, version: str) -> list[Expected]:
    """The blobs one version's row names now ([] when there is no such row): what a
    snapshot asks the live database about a blob its pinned image names but the data
    dir lacks."""
    row = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM package_versions WHERE package_name = ? AND version = ?",
                       (package, version)).fetchone()
    return _row_expectations(*row)[0] if row else []


_VERSION_COLUMNS = "package_name, version, archive_size_bytes, archive_sha256, screenshots, readme_content"


def _row_expectations(pkg: str, ver: str, size: int | None, sha: str | None, shots: str | None,
                      readme: str | None) -> tuple[list[Expected], list[str]]:
    expected, problems = [Expected(f"{pkg}/{ver}/artifacts/package.tar.gz", size, sha)], []
    try:
        expected += [Expected(f"{pkg}/{ver}/screenshots/{index}", shot.get("sizeBytes"), shot.get("sha256"))
                     for index, shot in enumerate(json.loads(shots or "[]"))]
    except (ValueError, TypeError, AttributeError):
        problems.append(f"package_versions {pkg} {ver}: screenshots is not a list of objects")
    expected += [Expected(key) for key in _readme_assets(readme or "") if key.split("/")[2] != "screenshots"]
    return expected, problems


def _check_versions(conn: sqlite3.Connection, blobs: Path, report: ClubReport) -> set[str]:
    expected, problems = expected_blobs(conn)
    report.database += problems
    report.checked["versions"] = sum(e.key.endswith("/artifacts/package.tar.gz") for e in expected)
    for item in expected:
        _expect(blobs, item, report)
    return {e.key for e in expected} | {key for key in _named_screenshots(conn)}


def _named_screenshots(conn: sqlite3.Connection) -> Iterator[str]:
    """Screenshot keys a README links to: named (never orphans) but checked via their row."""
    for (readme,) in conn.execute("SELECT readme_content FROM package_versions"):
        yield from (k for k in _readme_assets(readme or "") if k.split("/")[2] == "screenshots")


def _readme_assets(readme: str) -> Iterator[str]:
    for pkg, ver, kind, index, ext in _ASSET_URL.findall(readme):
        yield f"{pkg}/{ver}/{kind}/{index}" + (f".{ext}" if kind == "readme-assets" else "")


def _expect(blobs: Path, item: Expected, report: ClubReport) -> None:
    path = blobs / item.key
    if not path.is_file():
        report.missing.append(f"{item.key}: missing")
    elif item.size is not None and path.stat().st_size != item.size:
        report.missing.append(f"{item.key}: size {path.stat().st_size}, database says {item.size}")
    elif item.sha256 and _sha256(path) != item.sha256:
        report.missing.append(f"{item.key}: sha256 differs from the database")


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
    if (not isinstance(record, dict) or record.get("version") != 1
            or not str(record.get("blobId", "")).startswith(f"{pkg}:latest:")):
        return "index.json has an unexpected version or blobId"
    size = blob.stat().st_size
    # club swaps the blob, then the index: for a moment a new blob sits beside the old
    # index, which club tolerates. A pair is good when every range fits in the blob.
    try:
        for start, end in _ranges(record.get("index", {})):
            if not 0 <= start <= end <= size:
                return f"index range {start}:{end} does not fit in the {size}-byte blob"
    except ValueError:
        return "index.json has a malformed range"
    return None


def _ranges(node: Any) -> Iterator[tuple[int, int]]:
    if isinstance(node, str):
        start, _, end = node.partition(":")
        yield int(start), int(end)
    elif isinstance(node, dict):
        for child in node.values():
            yield from _ranges(child)


def _find_orphans(conn: sqlite3.Connection, blobs: Path, named: set[str], report: ClubReport) -> None:
    """Blobs no row names. Those club itself leaves behind (CLUB_DATA §2.2) are labelled:
    a deleted package's dartdoc pair, and a deleted version's screenshots and README assets
    (an S3/GCS delete removes only the tarball)."""
    packages = {r[0] for r in conn.execute("SELECT name FROM packages")}
    versions = {f"{p}/{v}" for p, v in conn.execute("SELECT package_name, version FROM package_versions")}
    for dirpath, _dirs, files in os.walk(blobs):
        for name in files:
            key = os.path.relpath(os.path.join(dirpath, name), blobs)
            if key in named or ".tmp." in name or key.endswith("/artifacts/package.json"):
                continue
            parts = key.split("/")
            if len(parts) >= 3 and parts[1] == "dartdoc" and parts[0] not in packages:
                key += " (club leftover: dartdoc of a deleted package)"
            elif len(parts) >= 4 and parts[2] in ("screenshots", "readme-assets") and "/".join(parts[:2]) not in versions:
                key += " (club leftover: asset of a deleted version)"
            report.orphans.append(key)
