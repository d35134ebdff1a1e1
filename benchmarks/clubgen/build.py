"""Building a package's blobs, in a worker process or inline.

A job is one package: versions must be built in order because screenshots and README
assets carry over from the previous version and the changelog is cumulative. Workers get
independent seeds per version, so the bytes do not depend on which process built them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from . import dartdoc, scores
from .catalog import PackagePlan
from .content import build_version
from .model import BuiltVersion, Carry, ScoreRecord, VersionRecord, VersionSpec
from .rand import rng_for
from .store import BlobStore


@dataclass(frozen=True)
class DartdocJob:
    """Docs to generate for a package's latest version (blob or filesystem mode)."""

    mode: str
    version: str
    libraries: tuple[str, ...]
    target: int
    scale: float
    generated_ms: int


@dataclass(frozen=True)
class PackageJob:
    """One worker task: a package's whole history, and its docs if it has any."""

    root: str
    plan: PackagePlan
    dartdoc: DartdocJob | None
    sidecars: bool


@dataclass(frozen=True)
class PackageResult:
    """A worker's answer: per-version DB facts, in version order."""

    name: str
    records: list[VersionRecord]


def build_package(job: PackageJob) -> PackageResult:
    """Write every version's blobs (and the docs) of one package; return the DB facts."""
    ticks = itertools.count(job.plan.created_at * 1000)
    store = BlobStore(Path(job.root), lambda: next(ticks))
    carry = Carry()
    records = []
    for vplan in job.plan.versions:
        built = build_version(vplan.spec, carry)
        keys = write_version_blobs(store, vplan.spec, built, republish=False,
                                   sidecar_ms=vplan.published_at if job.sidecars else None)
        score = scores.score(rng_for(vplan.spec.seed, "score"), vplan.spec.package, vplan.spec.version,
                             vplan.spec.flutter, vplan.score_ok)
        records.append(record_of(vplan.spec, built, score, keys))
        carry = Carry(built.shots, built.assets, built.changelog)
    if job.dartdoc:
        write_dartdoc(store, Path(job.root), job.plan.name, job.dartdoc)
    return PackageResult(job.plan.name, records)


def record_of(spec: VersionSpec, built: BuiltVersion, score: ScoreRecord, keys: list[str]) -> VersionRecord:
    """Drop the blob bytes; keep what the DB rows need."""
    return VersionRecord(spec.version, built.pubspec_json, built.readme, built.changelog, built.example_path,
                         built.example_content, built.screenshots_json, built.sha256, built.size, score, tuple(keys))


def write_version_blobs(store: BlobStore, spec: VersionSpec, built: BuiltVersion, *, republish: bool,
                        sidecar_ms: int | None) -> list[str]:
    """club's publish blob steps (§2.2 steps 2-5), in club's order; returns keys written."""
    base = f"{spec.package}/{spec.version}"
    keys = [f"{base}/artifacts/package.tar.gz"]
    store.put(keys[0], built.tarball)
    if sidecar_ms is not None:
        store.put_sidecar(spec.package, spec.version, built.tarball, sidecar_ms)
    for index, data in enumerate(built.shots):
        keys.append(f"{base}/screenshots/{index}")
        store.put(keys[-1], data)
    if republish:
        for key in store.keys_under(f"{base}/screenshots"):
            if int(key.rsplit("/", 1)[1]) >= len(built.shots):
                store.delete(key)
        store.delete_prefix(f"{base}/readme-assets")
    for index, (ext, data) in enumerate(zip(spec.asset_exts, built.assets)):
        keys.append(f"{base}/readme-assets/{index}.{ext}")
        store.put(keys[-1], data)
    return keys


def write_dartdoc(store: BlobStore, root: Path, package: str, job: DartdocJob,
                  members: list[dartdoc.Member] | None = None) -> int:
    """Store the docs pair (blob then index.json, §2.2) or the filesystem tree; returns bytes."""
    if members is None:
        members = dartdoc.build_members(package, job.version, list(job.libraries), job.target, job.scale)
    if job.mode == "filesystem":
        base = root / "cache" / "dartdoc" / package / "latest"
        for member in members:
            (base / member.path).parent.mkdir(parents=True, exist_ok=True)
            (base / member.path).write_bytes(member.raw)
        return sum(len(m.raw) for m in members)
    blob, index = dartdoc.pack_pair(package, members, job.generated_ms)
    store.put(f"{package}/dartdoc/latest/blob", blob)
    store.put(f"{package}/dartdoc/latest/index.json", index)
    return len(blob)
