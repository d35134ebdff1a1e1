"""club's scoring jobs: pana score, then dartdoc for the package's current latest (§2.2).

A job re-checks ``latest_version`` before building docs, as club's scoring service does,
so a burst of publishes regenerates a package's docs once, for the version that won.
"""

from __future__ import annotations

import json

from . import dartdoc, scores
from .build import DartdocJob, write_dartdoc
from .rand import iso_utc, rng_for
from .rows import audit, insert
from .server import Server


def run_scoring(server: Server, package: str, version: str, *, shuffle_docs: bool = False) -> bool:
    """pending -> running -> completed, then docs if the version is still the latest.

    Returns True when dartdoc was regenerated. ``shuffle_docs`` models a same-version
    rescore, whose docs come out with identical members in another order.
    """
    with server.tx() as conn:
        conn.execute("UPDATE package_scores SET status = 'running', updated_at = ? WHERE package_name = ? "
                     "AND version = ?", (server.clock.now(), package, version))
    pubspec = json.loads(server.query("SELECT pubspec_json FROM package_versions WHERE package_name = ? "
                                      "AND version = ?", (package, version))[0][0])
    record = scores.score(rng_for(server.rng.getrandbits(64), "score"), package, version,
                          "flutter" in pubspec["environment"], True)
    now = server.clock.advance(90_000)
    with server.tx() as conn:
        conn.execute("UPDATE package_scores SET status = ?, granted_points = ?, max_points = ?, report_json = ?, "
                     "pana_tags = ?, pana_version = ?, dart_version = ?, scored_at = ?, updated_at = ? "
                     "WHERE package_name = ? AND version = ?",
                     (record.status, record.granted, record.max_points, record.report_json, record.pana_tags,
                      scores.PANA_VERSION, scores.DART_VERSION, now, now, package, version))
        insert(conn, "audit_log", [audit(server.rng, now, "package.version_scored", None, f"Scored {package} {version}",
                                         package=package, version=version,
                                         data={"grantedPoints": record.granted, "maxPoints": 160}).row])
    server.log_lines.append(f"{iso_utc(now)} INFO scoring: completed {package} {version} points={record.granted}/160")
    latest = server.query("SELECT latest_version FROM packages WHERE name = ?", (package,))
    if server.meta.dartdoc_mode == "none" or not latest or latest[0][0] != version:
        return False
    regenerate_docs(server, package, version, shuffle=shuffle_docs)
    return True


def regenerate_docs(server: Server, package: str, version: str, *, shuffle: bool) -> None:
    """dartdoc_status running, build in memory, blob then index.json, then completed."""
    now = server.clock.now()
    with server.tx() as conn:
        conn.execute("INSERT INTO dartdoc_status (package_name, version, status, created_at, updated_at) "
                     "VALUES (?, ?, 'running', ?, ?) ON CONFLICT (package_name) DO UPDATE SET "
                     "version = excluded.version, status = 'running', updated_at = excluded.updated_at",
                     (package, version, now, now))
    profile = server.meta.profile
    libraries = json.loads(server.query("SELECT libraries FROM package_versions WHERE package_name = ? "
                                        "AND version = ?", (package, version))[0][0])
    done = server.clock.advance(120_000)
    job = DartdocJob(server.meta.dartdoc_mode, version, tuple(libraries),
                     dartdoc.target_size(package, profile.dartdoc_median, profile.dartdoc_sigma, profile.static_scale),
                     profile.static_scale, done)
    members = dartdoc.build_members(package, version, libraries, job.target, job.scale)
    if shuffle:
        members = dartdoc.shuffled(members, package, done)
    write_dartdoc(server.store, server.root, package, job, members)
    with server.tx() as conn:
        conn.execute("UPDATE dartdoc_status SET status = 'completed', error_message = NULL, generated_at = ?, "
                     "updated_at = ? WHERE package_name = ?", (done, done, package))
        insert(conn, "audit_log", [audit(server.rng, done, "package.dartdoc_generated", None,
                                         f"dartdoc for {package} {version}", package=package, version=version).row])
    server.log_lines.append(f"{iso_utc(done)} INFO dartdoc: completed {package} {version}")
