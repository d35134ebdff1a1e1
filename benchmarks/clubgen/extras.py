"""The non-primary tiers: logs, cache, in-flight uploads and a stray temp blob.

They exist so the engine's tier handling is exercised: logs/ is optional, cache/ is
regenerable, tmp/ must never be restored, and ``*.tmp.<µs>`` files under blobs/ must be
skipped (club deletes them at boot, §2.1).
"""

from __future__ import annotations

import random
from pathlib import Path

from . import text
from .archive import build_tarball
from .build import PackageResult
from .catalog import PackagePlan
from .history import DARTDOC_DELAY, SCORE_DELAY
from .people import User
from .profiles import Profile
from .rand import MINUTE_MS, iso_utc
from .rows import Timed, upload_row
from .store import BlobStore

SDK_VERSIONS = ("3.24.5", "3.22.3")


def write_scoring_log(root: Path, plans: list[PackagePlan], results: list[PackageResult]) -> None:
    """logs/scoring.log as the scoring service appends it, one job after another."""
    lines: list[tuple[int, str]] = []
    for plan, result in zip(plans, results):
        for vplan, record in zip(plan.versions, result.records):
            start, end = vplan.published_at + 5_000, vplan.published_at + SCORE_DELAY
            lines.append((start, f"{iso_utc(start)} INFO scoring: started {plan.name} {record.version}"))
            lines.append((end, f"{iso_utc(end)} INFO scoring: {record.score.status} {plan.name} {record.version} "
                               f"points={record.score.granted}/{record.score.max_points}"))
        if plan.dartdoc_status:
            at = plan.versions[-1].published_at + DARTDOC_DELAY
            lines.append((at, f"{iso_utc(at)} INFO dartdoc: {plan.dartdoc_status} {plan.name}"))
    append_log(root, [line for _, line in sorted(lines)])


def append_log(root: Path, lines: list[str]) -> None:
    """Append-only, never rotated (club's behaviour)."""
    path = root / "logs" / "scoring.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        log.writelines(line + "\n" for line in lines)


def write_sdk_cache(root: Path, rng: random.Random, profile: Profile) -> None:
    """cache/sdks/flutter-<ver>/: a few big binaries and some text, per sdk_installs row."""
    per_sdk = profile.sdk_cache_bytes // profile.sdk_installs
    for version in SDK_VERSIONS[: profile.sdk_installs]:
        base = root / "cache" / "sdks" / f"flutter-{version}"
        files = {
            "version": f"{version}\n".encode(),
            "bin/flutter": b"#!/usr/bin/env bash\nexec \"$(dirname \"$0\")/cache/dart-sdk/bin/dart\" \"$@\"\n",
            "bin/cache/dart-sdk/bin/dart": rng.randbytes(per_sdk * 6 // 10),
            "bin/cache/artifacts/engine/linux-x64/libflutter_engine.so": rng.randbytes(per_sdk * 3 // 10),
            "packages/flutter/lib/material.dart": text.dart_source(rng, per_sdk // 10).encode(),
        }
        for name, data in files.items():
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_bytes(data)


def inflight_uploads(root: Path, rng: random.Random, users: list[User], end_ms: int, count: int) -> list[Timed]:
    """tmp/uploads/<id>.tar.gz files with their still-open upload_sessions rows."""
    out = []
    for index in range(count):
        at = end_ms - (index + 1) * MINUTE_MS
        row = upload_row(rng, rng.choice(users).user_id, at, rng.choice(("pending", "received")))
        path = root / "tmp" / "uploads" / f"{row['id']}.tar.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build_tarball([("pubspec.yaml", b"name: in_flight\nversion: 0.0.1\n"),
                                        ("lib/in_flight.dart", text.dart_source(rng, 20_000).encode())]))
        out.append(Timed(at, "upload_sessions", row))
    return out


def leave_stray_tmp(store: BlobStore, rng: random.Random, plans: list[PackagePlan]) -> str:
    """Half of a tarball under ``<final>.tmp.<µs>``: a write caught mid-flight."""
    plan = rng.choice(plans)
    version = rng.choice(plan.versions).spec.version
    key = f"{plan.name}/{version}/artifacts/package.tar.gz"
    data = store.read(key)
    return store.leave_stray(key, data[: len(data) // 2])
