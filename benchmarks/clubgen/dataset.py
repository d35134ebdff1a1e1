"""generate(): plan the history, build blobs (in parallel), then write the DB and extras."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from . import dartdoc, extras, summary
from .build import DartdocJob, PackageJob, PackageResult, build_package
from .catalog import expected_cost
from .history import DARTDOC_DELAY, final_pointers, package_rows, write_history
from .plan import World, plan_world
from .profiles import DARTDOC_MODES, Meta, profile_for, save_meta
from .rand import rng_for
from .rows import Timed
from .schema import create_database, finish_database
from .store import BlobStore


def generate(root: Path, size: str = "tiny", seed: int = 0, *, dartdoc_mode: str = "blob",
             scoring_enabled: bool = True, sidecars: bool = False) -> dict[str, Any]:
    """Create a club data dir at ``root`` (absent or empty) and return its summary.

    ``size`` is tiny, small or medium (CLUB_DATA §6.3). The keyword knobs are §6.1's:
    where dartdoc lives, whether scoring ran, and S3/GCS-style ``package.json`` sidecars.
    The same (size, seed, knobs) always gives byte-identical blobs and the same rows.
    """
    root = Path(root)
    profile_for(size)
    if dartdoc_mode not in DARTDOC_MODES:
        raise ValueError(f"dartdoc_mode must be one of {DARTDOC_MODES}")
    meta = Meta(size, seed, dartdoc_mode, scoring_enabled, sidecars)
    _prepare(root)
    world = plan_world(meta)
    results = _build_all(root, world, meta)
    _write_db(root, world, results, meta)
    stray = _write_extras(root, world, results, meta)
    save_meta(root, meta)
    return _summary(root, meta, stray)


def _prepare(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    for sub in ("db", "blobs", "logs", "cache", "tmp/uploads"):
        (root / sub).mkdir(parents=True, exist_ok=True)


def _jobs(root: Path, world: World, meta: Meta) -> list[PackageJob]:
    profile = meta.profile
    jobs = []
    for plan in world.packages:
        docs = None
        if meta.dartdoc_mode != "none" and plan.dartdoc_status == "completed":
            latest = final_pointers(plan)[0] or plan.versions[-1].spec.version
            spec = next(v.spec for v in plan.versions if v.spec.version == latest)
            target = dartdoc.target_size(plan.name, profile.dartdoc_median, profile.dartdoc_sigma, profile.static_scale)
            docs = DartdocJob(meta.dartdoc_mode, latest, spec.libraries, target, profile.static_scale,
                              plan.versions[-1].published_at + DARTDOC_DELAY)
        jobs.append(PackageJob(str(root), plan, docs, meta.sidecars))
    return jobs


def _build_all(root: Path, world: World, meta: Meta) -> list[PackageResult]:
    """Build packages, biggest first across workers; results come back in plan order."""
    jobs = sorted(_jobs(root, world, meta), key=lambda j: -expected_cost(j.plan))
    if meta.profile.workers <= 1:
        built = [build_package(job) for job in jobs]
    else:  # an executor, not a Pool: a worker that dies raises instead of hanging
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(meta.profile.workers, mp_context=context) as pool:
            built = list(pool.map(build_package, jobs))
    by_name = {result.name: result for result in built}
    return [by_name[plan.name] for plan in world.packages]


def _write_db(root: Path, world: World, results: list[PackageResult], meta: Meta) -> None:
    public = {p.name for p in world.packages if p.visibility == "public"}
    timed: list[Timed] = list(world.timed)
    for plan, result in zip(world.packages, results):
        timed += package_rows(meta.seed, plan, result, world.likes_count[plan.name], public, meta.scoring_enabled)
    rng = rng_for(meta.seed, "extras")
    timed += extras.inflight_uploads(root, rng, world.users, meta.profile.history_end_ms, rng.randint(1, 2))
    conn = create_database(root / "db" / "club.db")
    try:
        write_history(conn, timed)
    finally:
        finish_database(conn)


def _write_extras(root: Path, world: World, results: list[PackageResult], meta: Meta) -> str:
    rng = rng_for(meta.seed, "extras-files")
    if meta.scoring_enabled:
        extras.write_scoring_log(root, world.packages, results)
    extras.write_sdk_cache(root, rng, meta.profile)
    store = BlobStore(root, lambda: meta.profile.history_end_ms * 1000 - rng.randrange(10**6))
    return extras.leave_stray_tmp(store, rng, world.packages)


def _summary(root: Path, meta: Meta, stray: str) -> dict[str, Any]:
    sizes, files = summary.tier_sizes(root)
    tables = summary.table_counts(root / "db" / "club.db")
    return {"root": str(root), "size": meta.size, "seed": meta.seed, "dartdoc_mode": meta.dartdoc_mode,
            "scoring_enabled": meta.scoring_enabled, "sidecars": meta.sidecars,
            "packages": tables["packages"], "versions": tables["package_versions"],
            "total_bytes": sum(sizes.get(tier, 0) for tier in ("db", "blobs", "cache", "logs", "tmp")),
            "tables": tables, "bytes": sizes, "files": files, "stray_tmp": stray}
