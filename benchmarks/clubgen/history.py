"""Writing the generated history into club.db in time order.

Rows are inserted day by day in timestamp order, one transaction per simulated day, so
tables interleave on disk the way an organically grown club DB does; a DB loaded table by
table would have unrealistically contiguous pages and flatter page-level churn.
"""

from __future__ import annotations

import itertools
import random
import sqlite3

from .build import PackageResult
from .catalog import PackagePlan, VersionPlan
from .model import VersionRecord
from .rand import DAY_MS, EPOCH_MS, MINUTE_MS, rng_for
from .rows import (Row, Timed, audit, dep_rows, fts_row, insert, public_resolvable, score_row, tags_for, upload_row,
                   version_row)
from .semver import is_prerelease, latest_pointers

DARTDOC_DELAY = 5 * MINUTE_MS
SCORE_DELAY = 2 * MINUTE_MS


def write_history(conn: sqlite3.Connection, timed: list[Timed]) -> None:
    """Insert all rows, grouped per simulated day and batched per consecutive table."""
    timed.sort(key=lambda t: t.ts)
    for _, day_rows in itertools.groupby(timed, key=lambda t: (t.ts - EPOCH_MS) // DAY_MS):
        conn.execute("BEGIN")
        for table, rows in itertools.groupby(day_rows, key=lambda t: t.table):
            insert(conn, table, [t.row for t in rows])
        conn.execute("COMMIT")


def final_pointers(plan: PackagePlan) -> tuple[str | None, str | None]:
    """latest_version / latest_prerelease once the whole history has happened."""
    return latest_pointers(v.spec.version for v in plan.versions if v.retracted_at is None)


def package_rows(seed: int, plan: PackagePlan, result: PackageResult, likes: int,
                 public: set[str], scoring: bool) -> list[Timed]:
    """Every row a package's history wrote: package, uploaders, versions, scores, audit."""
    rng = rng_for(seed, "history", plan.name)
    out = [Timed(plan.created_at, "packages", _package_row(plan, likes))]
    out += [Timed(at, "package_uploaders", {"package_name": plan.name, "user_id": uid, "created_at": at})
            for uid, at in plan.uploaders]
    latest_record = next(r for r in result.records if r.version == (final_pointers(plan)[0] or r.version))
    out.append(Timed(plan.created_at, "package_fts", fts_row(
        plan.name, plan.versions[0].spec.description, latest_record.readme,
        tags_for(plan.versions[0].spec), plan.versions[0].spec.topics)))
    if plan.visibility_changed:
        at, by = plan.visibility_changed
        out.append(audit(rng, at, "package.made_public", by, f"Made {plan.name} public", package=plan.name))
    latest_so_far: str | None = None
    for index, (vplan, record) in enumerate(zip(plan.versions, result.records)):
        out += _version_rows(rng, plan, vplan, record, index == 0, public, scoring)
        latest_so_far, changed = _advance(latest_so_far, vplan.spec.version)
        if changed and plan.dartdoc_status:
            out.append(_dartdoc_audit(rng, plan, vplan))
    if plan.dartdoc_status:
        out.append(_dartdoc_status_row(plan))
    return out


def _advance(current: str | None, version: str) -> tuple[str | None, bool]:
    if is_prerelease(version):
        return current, False
    newest = latest_pointers([v for v in (current, version) if v])[0]
    return newest, newest != current


def _package_row(plan: PackagePlan, likes: int) -> Row:
    latest, prerelease = final_pointers(plan)
    changed_at, changed_by = plan.visibility_changed or (None, None)
    return {"name": plan.name, "publisher_id": plan.publisher_id, "latest_version": latest,
            "latest_prerelease": prerelease, "likes_count": likes, "is_discontinued": int(plan.is_discontinued),
            "replaced_by": None, "is_unlisted": int(plan.is_unlisted), "visibility": plan.visibility,
            "visibility_changed_at": changed_at, "visibility_changed_by": changed_by,
            "created_at": plan.created_at, "updated_at": plan.versions[-1].published_at}


def _version_rows(rng: random.Random, plan: PackagePlan, vplan: VersionPlan, record: VersionRecord,
                  first: bool, public: set[str], scoring: bool) -> list[Timed]:
    at, spec = vplan.published_at, vplan.spec
    failed_at = at - 10 * MINUTE_MS
    out = [Timed(failed_at, "upload_sessions", upload_row(rng, vplan.uploader_id, failed_at, "failed"))
           for _ in range(vplan.failed_uploads)]
    out.append(Timed(at - 30_000, "upload_sessions", upload_row(rng, vplan.uploader_id, at - 30_000, "complete")))
    resolvable = public_resolvable(plan.name in public, spec.deps, public)
    out.append(Timed(at, "package_versions", version_row(
        spec, record, published_at=at, uploader_id=vplan.uploader_id, publisher_id=plan.publisher_id,
        public_resolvable=resolvable, retracted_at=vplan.retracted_at)))
    out += [Timed(at, "package_version_dependencies", row) for row in dep_rows(spec)]
    kind = "package.created" if first else "package.version_published"
    out.append(audit(rng, at, kind, vplan.uploader_id, f"Published {plan.name} {spec.version}", package=plan.name,
                     version=spec.version, publisher=plan.publisher_id,
                     data={"sha256": record.sha256, "size": record.size}))
    if scoring:
        out += _score_rows(rng, plan, vplan, record)
    if vplan.retracted_at:
        out.append(audit(rng, vplan.retracted_at, "package.version_retracted", vplan.uploader_id,
                         f"Retracted {plan.name} {spec.version}", package=plan.name, version=spec.version))
    return out


def _score_rows(rng: random.Random, plan: PackagePlan, vplan: VersionPlan, record: VersionRecord) -> list[Timed]:
    at = vplan.published_at + SCORE_DELAY
    score = record.score
    kind = "package.version_scored" if score.status == "completed" else "package.version_score_failed"
    return [Timed(at, "package_scores", score_row(plan.name, record.version, score, vplan.published_at, at)),
            audit(rng, at, kind, None, f"Scored {plan.name} {record.version}", package=plan.name,
                  version=record.version, data={"grantedPoints": score.granted, "maxPoints": score.max_points})]


def _dartdoc_audit(rng: random.Random, plan: PackagePlan, vplan: VersionPlan) -> Timed:
    at = vplan.published_at + DARTDOC_DELAY
    failed = vplan is plan.versions[-1] and plan.dartdoc_status == "failed"
    kind = "package.dartdoc_failed" if failed else "package.dartdoc_generated"
    return audit(rng, at, kind, None, f"dartdoc for {plan.name} {vplan.spec.version}", package=plan.name,
                 version=vplan.spec.version)


def _dartdoc_status_row(plan: PackagePlan) -> Timed:
    at = plan.versions[-1].published_at + DARTDOC_DELAY
    latest = final_pointers(plan)[0] or plan.versions[-1].spec.version
    status = plan.dartdoc_status or "pending"
    return Timed(at, "dartdoc_status", {
        "package_name": plan.name, "version": latest, "status": status,
        "error_message": "dartdoc exited with code 65" if status == "failed" else None,
        "generated_at": at if status == "completed" else None, "created_at": plan.created_at, "updated_at": at})
