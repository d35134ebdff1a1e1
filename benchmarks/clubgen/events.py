"""The package events of one day of club activity (CLUB_DATA §6.4 items 1-4 and 7-10).

Each event commits its own transaction(s) through ``Server`` like club's API handlers,
and orders blob and DB work as club does: publish commits the DB then writes blobs;
deletes remove blobs first, then rows. Packages touched by one event are not reused by
another on the same day, so every event's effect stays visible in the report.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field, replace
from typing import Any

from . import catalog
from .jobs import run_scoring
from .publish import NewPackage, enqueue_score, public_names, publish, refresh_fts, refresh_latest
from .successor import load_carry, load_deps, republish_spec, spec_from
from .rand import derive_seed
from .rows import public_resolvable
from .semver import next_pr, next_stable
from .server import Server

@dataclass
class DayState:
    """What the day has done so far; ``report`` becomes one_day's summary."""

    label: tuple[int, int]
    touched: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=dict)


def owner(server: Server) -> str:
    """The instance owner, who acts for admin-only events."""
    return str(server.query("SELECT user_id FROM users WHERE role = 'owner' ORDER BY created_at LIMIT 1")[0][0])


def _free_packages(server: Server, state: DayState, sql: str = "SELECT name FROM packages ORDER BY name") -> list[str]:
    return [row[0] for row in server.query(sql) if row[0] not in state.touched]


def _claim(server: Server, state: DayState, candidates: list[str]) -> str | None:
    """Pick a package for one event and keep other events off it; None when none fits.

    A long run on the tiny profile can exhaust candidates (e.g. no private package left),
    and a skipped event is better than a failed day.
    """
    if not candidates:
        return None
    package = server.rng.choice(candidates)
    state.touched.add(package)
    return package


def publishes(server: Server, state: DayState) -> list[tuple[str, str]]:
    """New versions across some packages, brand-new packages included (§6.4 item 1)."""
    day = server.meta.profile.day
    done = [_new_package(server, state) for _ in range(day.new_packages)]
    existing = _free_packages(server, state, "SELECT name FROM packages WHERE latest_version IS NOT NULL ORDER BY name")
    chosen = server.rng.sample(existing, min(len(existing), day.publish_packages - day.new_packages))
    shares = [1] * len(chosen)
    for _ in range(max(0, day.publishes - len(done) - len(chosen)) if shares else 0):
        shares[server.rng.randrange(len(shares))] += 1
    for package, count in zip(chosen, shares):
        state.touched.add(package)
        for _ in range(count):
            done.append(_next_version(server, state, package))
    state.report["published"] = [{"package": p, "version": v, "new_package": i < day.new_packages}
                                 for i, (p, v) in enumerate(done)]
    return done


def _uploader(server: Server, package: str) -> str:
    return str(server.rng.choice([r[0] for r in server.query(
        "SELECT user_id FROM package_uploaders WHERE package_name = ? ORDER BY user_id", (package,))]))


def _next_version(server: Server, state: DayState, package: str) -> tuple[str, str]:
    versions = [r[0] for r in server.query("SELECT version FROM package_versions WHERE package_name = ?", (package,))]
    version = next_stable(server.rng, versions)
    server.clock.advance(server.rng.randrange(120_000, 1_200_000))
    publish(server, spec_from(server, package, version, state.label), _uploader(server, package))
    return package, version


def _new_package(server: Server, state: DayState) -> tuple[str, str]:
    existing = sorted(r[0] for r in server.query("SELECT name FROM packages"))
    taken = set(existing) | {p.name for p in server.store.base.iterdir()}  # deleted packages leave dartdoc/ dirs
    name = catalog.package_name(server.rng, taken)
    flutter = server.rng.random() < 0.5
    deps = catalog.plan_deps(server.rng, existing, flutter)
    version = server.rng.choice(("0.1.0", "1.0.0"))
    spec = replace(catalog.base_spec(server.rng, server.meta.profile, name, flutter, deps), version=version,
                   tar_bytes=catalog.tar_size(server.rng, server.meta.profile), seed=derive_seed(state.label, name))
    uploader = server.rng.choice([r[0] for r in server.query(
        "SELECT user_id FROM users WHERE is_active = 1 AND role != 'viewer' ORDER BY user_id")])
    publishers = [r[0] for r in server.query("SELECT id FROM publishers ORDER BY id")] + [None]
    server.clock.advance(server.rng.randrange(120_000, 1_200_000))
    publish(server, spec, uploader, new_package=NewPackage(server.rng.choice(publishers)))
    state.touched.add(name)
    return name, version


def pr_build(server: Server, state: DayState, pushes: int = 3) -> tuple[str, str] | None:
    """A private package's -prN version force-republished ``pushes`` times (§6.4 item 3)."""
    with_pr = _free_packages(server, state, "SELECT DISTINCT p.name FROM packages p JOIN package_versions v ON "
                             "v.package_name = p.name WHERE p.visibility = 'private' AND v.version LIKE '%-pr%' "
                             "ORDER BY p.name")
    private = _free_packages(server, state, "SELECT name FROM packages WHERE visibility = 'private' "
                             "AND latest_version IS NOT NULL ORDER BY name")
    package = _claim(server, state, with_pr or private)
    state.report["forced_republish"] = None
    if package is None:
        return None
    versions = [r[0] for r in server.query("SELECT version FROM package_versions WHERE package_name = ? "
                                           "ORDER BY published_at", (package,))]
    pr_versions = [v for v in versions if "-pr" in v]
    if not pr_versions:
        pr_versions.append(next_pr(versions))
        publish(server, spec_from(server, package, pr_versions[0], state.label), _uploader(server, package))
    version = pr_versions[-1]
    published_at = server.query("SELECT published_at FROM package_versions WHERE package_name = ? AND version = ?",
                                (package, version))[0][0]
    spec = spec_from(server, package, version, state.label, base=version)
    shas = []
    for push in range(pushes):
        server.clock.advance(server.rng.randrange(300_000, 900_000))
        carry = load_carry(server, package, published_at)
        shas.append(publish(server, republish_spec(spec, (state.label, push)), _uploader(server, package),
                            force=True, carry=carry).sha256)
    state.report["forced_republish"] = {"package": package, "version": version, "sha256": shas}
    return package, version


def score_all(server: Server, state: DayState, versions: list[tuple[str, str]]) -> None:
    """Run the queued scoring jobs; each regenerates docs only if still the latest (§2.2)."""
    regenerated = []
    for package, version in dict.fromkeys(versions):
        server.clock.advance(60_000)
        if run_scoring(server, package, version):
            regenerated.append(package)
    state.report["scored"] = len(dict.fromkeys(versions))
    state.report["dartdoc_regenerated"] = regenerated


def rescore(server: Server, state: DayState) -> None:
    """Same-version rescore: new score row state, docs with identical members reshuffled."""
    candidates = _free_packages(server, state, "SELECT d.package_name FROM dartdoc_status d JOIN packages p ON "
                                "p.name = d.package_name AND p.latest_version = d.version WHERE d.status = 'completed' "
                                "ORDER BY d.package_name")
    package = _claim(server, state, candidates)
    state.report["rescored"] = None
    if package is None:
        return
    version = server.query("SELECT latest_version FROM packages WHERE name = ?", (package,))[0][0]
    with server.tx() as conn:
        enqueue_score(conn, package, version, server.clock.advance(600_000))
    run_scoring(server, package, version, shuffle_docs=True)
    state.report["rescored"] = {"package": package, "version": version}


def retract(server: Server, state: DayState) -> None:
    """Retract a package's latest version; latest pointers recomputed (§6.4 item 7)."""
    candidates = _free_packages(server, state, "SELECT package_name FROM package_versions WHERE is_retracted = 0 "
                                "GROUP BY package_name HAVING count(*) >= 2 ORDER BY package_name")
    package = _claim(server, state, candidates)
    state.report["retracted"] = None
    if package is None:
        return
    version = server.query("SELECT latest_version FROM packages WHERE name = ?", (package,))[0][0]
    now = server.clock.advance(600_000)
    with server.tx() as conn:
        conn.execute("UPDATE package_versions SET is_retracted = 1, retracted_at = ? WHERE package_name = ? "
                     "AND version = ?", (now, package, version))
        refresh_latest(conn, package, now)
        server.audit(conn, "package.version_retracted", _uploader(server, package), f"Retracted {package} {version}",
                     package=package, version=version)
    state.report["retracted"] = {"package": package, "version": version}


def delete_version(server: Server, state: DayState) -> None:
    """Admin version delete: the whole ``<pkg>/<ver>/`` first, then the row (§6.4 item 8)."""
    candidates = _free_packages(server, state, "SELECT package_name FROM package_versions GROUP BY package_name "
                                "HAVING count(*) >= 2 ORDER BY package_name")
    package = _claim(server, state, candidates)
    state.report["deleted_version"] = None
    if package is None:
        return
    versions = [r[0] for r in server.query("SELECT version FROM package_versions WHERE package_name = ? "
                                           "ORDER BY published_at, version", (package,))]
    version = server.rng.choice(versions[:-1])
    server.clock.advance(600_000)
    server.store.delete_version(package, version)
    with server.tx() as conn:
        conn.execute("DELETE FROM package_versions WHERE package_name = ? AND version = ?", (package, version))
        refresh_latest(conn, package, server.clock.now())
        server.audit(conn, "package.version_deleted", owner(server), f"Deleted {package} {version}",
                     package=package, version=version)
    refresh_fts(server, package)
    state.report["deleted_version"] = {"package": package, "version": version}


_BY_ARCHIVE_BYTES = ("SELECT p.name FROM packages p LEFT JOIN package_versions v ON v.package_name = p.name "
                     "GROUP BY p.name ORDER BY coalesce(sum(v.archive_size_bytes), 0), p.name")


def delete_package(server: Server, state: DayState) -> None:
    """Package delete: version dirs first, then cascade; ``<pkg>/dartdoc/`` stays (§6.4 item 9).

    The victim comes from the smaller half of the packages (deleted packages are usually
    abandoned experiments), preferring one with docs so the dartdoc leftover shows up.
    """
    smallest = _free_packages(server, state, _BY_ARCHIVE_BYTES)
    smallest = smallest[: max(1, len(smallest) // 2)]
    with_docs = [p for p in smallest if server.store.exists(f"{p}/dartdoc/latest/blob")]
    package = _claim(server, state, with_docs or smallest)
    state.report["deleted_package"] = package
    if package is None:
        return
    server.clock.advance(600_000)
    for (version,) in server.query("SELECT version FROM package_versions WHERE package_name = ? ORDER BY version",
                                   (package,)):
        server.store.delete_version(package, version)
    with server.tx() as conn:
        conn.execute("DELETE FROM packages WHERE name = ?", (package,))
        conn.execute("DELETE FROM package_fts WHERE package_name = ?", (package,))
        server.audit(conn, "package.deleted", owner(server), f"Deleted package {package}", package=package)


_NO_PUBLIC_DEPENDENTS = (
    "SELECT name FROM packages p WHERE visibility = 'public' AND NOT EXISTS (SELECT 1 FROM "
    "package_version_dependencies d JOIN packages q ON q.name = d.package_name WHERE d.dep_name = p.name "
    "AND d.is_local = 1 AND q.visibility = 'public') ORDER BY name")


def visibility_flip(server: Server, state: DayState) -> None:
    """Flip one package's visibility and recompute public_resolvable where it matters.

    Private to public when possible; otherwise public to private for a package no public
    package depends on (club refuses a flip that would break public dependents).
    """
    private = _free_packages(server, state, "SELECT name FROM packages WHERE visibility = 'private' ORDER BY name")
    unneeded = _free_packages(server, state, _NO_PUBLIC_DEPENDENTS)
    package = _claim(server, state, private or unneeded)
    state.report["visibility_flip"] = None
    if package is None:
        return
    target = "public" if private else "private"
    now = server.clock.advance(600_000)
    admin = owner(server)
    with server.tx() as conn:
        conn.execute("UPDATE packages SET visibility = ?, visibility_changed_at = ?, visibility_changed_by = ?, "
                     "updated_at = ? WHERE name = ?", (target, now, admin, now, package))
        changed = _recompute_resolvable(server, conn, package)
        server.audit(conn, f"package.made_{target}", admin, f"Made {package} {target}", package=package)
    state.report["visibility_flip"] = {"package": package, "to": target, "versions_recomputed": changed}


def _recompute_resolvable(server: Server, conn: sqlite3.Connection, package: str) -> int:
    public = public_names(conn)
    rows = conn.execute(
        "SELECT v.package_name, v.version, v.public_resolvable FROM package_versions v WHERE v.package_name = ?1 "
        "OR EXISTS (SELECT 1 FROM package_version_dependencies d WHERE d.package_name = v.package_name AND "
        "d.version = v.version AND d.dep_name = ?1 AND d.is_local = 1) ORDER BY 1, 2", (package,)).fetchall()
    changed = 0
    for name, version, old in rows:
        new = int(public_resolvable(name in public, load_deps(server, name, version), public))
        if new != old:
            conn.execute("UPDATE package_versions SET public_resolvable = ? WHERE package_name = ? AND version = ?",
                         (new, name, version))
            changed += 1
    return changed
