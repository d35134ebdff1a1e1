"""club's publish, step by step, in club's order (§2.2).

Publish: upload session, then ONE transaction for the version and its package, then the
blobs (tarball, screenshots, readme-assets), then FTS, then the score enqueue, then the
upload is marked complete. The DB therefore commits before the blobs exist, which is the
window a snapshot taken mid-publish must tolerate.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from .build import write_version_blobs
from .content import build_version
from .model import BuiltVersion, Carry, VersionSpec
from .rows import audit, dep_rows, fts_row, insert, public_resolvable, upload_row, version_row
from .semver import latest_pointers
from .server import Server
from .successor import load_carry


@dataclass(frozen=True)
class NewPackage:
    """Settings of a package created by its first publish."""

    publisher_id: str | None
    visibility: str = "private"


def publish(server: Server, spec: VersionSpec, uploader: str, *, force: bool = False,
            new_package: NewPackage | None = None, carry: Carry | None = None) -> BuiltVersion:
    """Publish (or force-republish) one version the way club does; returns what was built."""
    built = build_version(spec, carry if carry is not None else load_carry(server, spec.package, None))
    upload_id = _receive_upload(server, uploader, built.tarball)
    _commit_version(server, spec, built, uploader, force, new_package)
    write_version_blobs(server.store, spec, built, republish=force,
                        sidecar_ms=server.clock.now() if server.meta.sidecars else None)
    refresh_fts(server, spec.package)
    if server.meta.scoring_enabled:
        with server.tx() as conn:
            enqueue_score(conn, spec.package, spec.version, server.clock.now())
    _complete_upload(server, upload_id)
    return built


def _receive_upload(server: Server, uploader: str, tarball: bytes) -> str:
    """upload_sessions row (pending), the temp file, then received and processing."""
    row = upload_row(server.rng, uploader, server.clock.now(), "pending")
    with server.tx() as conn:
        insert(conn, "upload_sessions", [row])
    path = server.root / "tmp" / "uploads" / f"{row['id']}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tarball)
    for state in ("received", "processing"):
        with server.tx() as conn:
            conn.execute("UPDATE upload_sessions SET state = ? WHERE id = ?", (state, row["id"]))
    return str(row["id"])


def _complete_upload(server: Server, upload_id: str) -> None:
    with server.tx() as conn:
        conn.execute("UPDATE upload_sessions SET state = 'complete' WHERE id = ?", (upload_id,))
    (server.root / "tmp" / "uploads" / f"{upload_id}.tar.gz").unlink(missing_ok=True)


def _commit_version(server: Server, spec: VersionSpec, built: BuiltVersion, uploader: str, force: bool,
                    new_package: NewPackage | None) -> None:
    """The publish transaction: package, version row, deps, pointers and the audit row."""
    now = server.clock.now()
    with server.tx() as conn:
        if new_package:
            _create_package(conn, spec.package, new_package, uploader, now)
        package_public, publisher = conn.execute(
            "SELECT visibility = 'public', publisher_id FROM packages WHERE name = ?", (spec.package,)).fetchone()
        resolvable = public_resolvable(bool(package_public), spec.deps, public_names(conn))
        if force:
            _update_version(conn, spec, built, uploader, resolvable)
        else:
            insert(conn, "package_versions", [version_row(spec, built, published_at=now, uploader_id=uploader,
                                                          publisher_id=publisher, public_resolvable=resolvable,
                                                          retracted_at=None)])
        conn.execute("DELETE FROM package_version_dependencies WHERE package_name = ? AND version = ?",
                     (spec.package, spec.version))
        insert(conn, "package_version_dependencies", dep_rows(spec))
        refresh_latest(conn, spec.package, now)
        kind = "package.created" if new_package else "package.version_published"
        data: dict[str, object] = {"sha256": built.sha256, "size": built.size, **({"forced": True} if force else {})}
        insert(conn, "audit_log", [audit(server.rng, now, kind, uploader, f"Published {spec.package} {spec.version}",
                                         package=spec.package, version=spec.version, publisher=publisher,
                                         data=data).row])


def _create_package(conn: sqlite3.Connection, name: str, new: NewPackage, uploader: str, now: int) -> None:
    insert(conn, "packages", [{"name": name, "publisher_id": new.publisher_id, "visibility": new.visibility,
                               "created_at": now, "updated_at": now}])
    insert(conn, "package_uploaders", [{"package_name": name, "user_id": uploader, "created_at": now}])


def _update_version(conn: sqlite3.Connection, spec: VersionSpec, built: BuiltVersion, uploader: str,
                    resolvable: bool) -> None:
    """Forced republish: new archive facts; old screenshots JSON kept when the new list is empty."""
    conn.execute(
        "UPDATE package_versions SET pubspec_json = ?, readme_content = coalesce(?, readme_content), "
        "changelog_content = ?, screenshots = CASE WHEN ? = '[]' THEN screenshots ELSE ? END, "
        "archive_size_bytes = ?, archive_sha256 = ?, uploader_id = ?, public_resolvable = ? "
        "WHERE package_name = ? AND version = ?",
        (built.pubspec_json, built.readme, built.changelog, built.screenshots_json, built.screenshots_json,
         built.size, built.sha256, uploader, int(resolvable), spec.package, spec.version))


def public_names(conn: sqlite3.Connection) -> set[str]:
    """Public packages, the input of every public_resolvable recompute."""
    return {name for (name,) in conn.execute("SELECT name FROM packages WHERE visibility = 'public'")}


def refresh_latest(conn: sqlite3.Connection, package: str, now: int) -> None:
    """Recompute latest_version / latest_prerelease over non-retracted versions."""
    versions = [v for (v,) in conn.execute(
        "SELECT version FROM package_versions WHERE package_name = ? AND is_retracted = 0", (package,))]
    latest, prerelease = latest_pointers(versions)
    conn.execute("UPDATE packages SET latest_version = ?, latest_prerelease = ?, updated_at = ? WHERE name = ?",
                 (latest, prerelease, now, package))


def refresh_fts(server: Server, package: str) -> None:
    """club maintains FTS in application code: delete, then insert from the latest version."""
    rows = server.query("SELECT v.pubspec_json, v.readme_content, v.tags FROM packages p JOIN package_versions v "
                        "ON v.package_name = p.name AND v.version = p.latest_version WHERE p.name = ?", (package,))
    with server.tx() as conn:
        conn.execute("DELETE FROM package_fts WHERE package_name = ?", (package,))
        for pubspec_json, readme, tags in rows:
            pubspec = json.loads(pubspec_json)
            insert(conn, "package_fts", [fts_row(package, pubspec.get("description", ""), readme or "", tags,
                                                 tuple(pubspec.get("topics", ())))])


def enqueue_score(conn: sqlite3.Connection, package: str, version: str, now: int) -> None:
    """Queue a pana job: the row goes (back) to pending, as on publish and rescore."""
    conn.execute(
        "INSERT INTO package_scores (package_name, version, status, created_at, updated_at) "
        "VALUES (?, ?, 'pending', ?, ?) ON CONFLICT (package_name, version) "
        "DO UPDATE SET status = 'pending', updated_at = excluded.updated_at", (package, version, now, now))
