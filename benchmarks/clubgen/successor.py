"""What the next version of an existing package looks like, read back from club's state.

one_day and LiveWriter continue packages they did not plan: the new version keeps the
previous one's description, libraries, dependencies, screenshot slots and README-asset
kinds, and inherits its screenshot/asset bytes and changelog (``Carry``) from disk and DB.
"""

from __future__ import annotations

import json
from dataclasses import replace

from .catalog import tar_size
from .model import Carry, Dep, VersionSpec
from .rand import derive_seed, log_uniform_int
from .server import Server

HEAVY_SIZE = 1_500_000  # a previous archive above this marks an asset-heavy package


def load_carry(server: Server, package: str, before_ms: int | None) -> Carry:
    """Screenshots, README assets and changelog of the most recent earlier version."""
    rows = server.query("SELECT version, screenshots, changelog_content FROM package_versions WHERE package_name = ? "
                        "AND published_at < ? ORDER BY published_at DESC, version DESC LIMIT 1",
                        (package, before_ms if before_ms is not None else 2**62))
    if not rows:
        return Carry()
    version, shots_json, changelog = rows[0][0], rows[0][1], rows[0][2] or ""
    base = f"{package}/{version}"
    shots = [server.store.read(f"{base}/screenshots/{i}") for i in range(len(json.loads(shots_json)))
             if server.store.exists(f"{base}/screenshots/{i}")]
    assets = [server.store.read(key) for key in _asset_keys(server, base)]
    return Carry(shots, assets, changelog)


def _asset_keys(server: Server, base: str) -> list[str]:
    keys = server.store.keys_under(f"{base}/readme-assets")
    return sorted(keys, key=lambda k: int(k.rsplit("/", 1)[1].split(".")[0]))


def spec_from(server: Server, package: str, version: str, label: object, *,
              base: str | None = None) -> VersionSpec:
    """A spec for ``version`` continuing ``base`` (default: the most recently published version)."""
    (prev, pubspec_json, libraries, executables, shots_json, example, size), = server.query(
        "SELECT version, pubspec_json, libraries, bin_executables, screenshots, example_path, archive_size_bytes "
        "FROM package_versions WHERE package_name = ? AND version = coalesce(?, version) "
        "ORDER BY published_at DESC, version DESC LIMIT 1", (package, base))
    pubspec = json.loads(pubspec_json)
    profile = server.meta.profile
    return VersionSpec(
        package=package, version=version, description=pubspec.get("description", ""),
        flutter="flutter" in pubspec["environment"], topics=tuple(pubspec.get("topics", ())),
        libraries=tuple(json.loads(libraries)), deps=load_deps(server, package, prev),
        executables=tuple(json.loads(executables)), tar_bytes=tar_size(server.rng, profile),
        heavy_bytes=log_uniform_int(server.rng, *profile.heavy_range) if size > HEAVY_SIZE else 0,
        shots=tuple((e["path"], e["path"].rsplit(".", 1)[1]) for e in json.loads(shots_json)),
        asset_exts=tuple(k.rsplit(".", 1)[1] for k in _asset_keys(server, f"{package}/{prev}")),
        has_example=example is not None, image_scale=profile.image_scale, seed=derive_seed(label, package, version))


def load_deps(server: Server, package: str, version: str) -> tuple[Dep, ...]:
    """A version's dependencies, read back from package_version_dependencies in declared order."""
    rows = server.query("SELECT dep_name, kind, source, constraint_text, hosted_origin, is_local, is_ambiguous "
                        "FROM package_version_dependencies WHERE package_name = ? AND version = ? "
                        "ORDER BY rowid", (package, version))
    return tuple(Dep(n, k, s, c, h, bool(loc), bool(amb)) for n, k, s, c, h, loc, amb in rows)


def republish_spec(spec: VersionSpec, label: object) -> VersionSpec:
    """Same key, new bytes: a PR build pushed again."""
    return replace(spec, seed=derive_seed(label, spec.package, spec.version, "force"))
