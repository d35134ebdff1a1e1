"""Packages and their version histories (what gets published, when, by whom).

Planned in one pass in creation order, so local dependencies always point at packages
that already existed when the depending version was published.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from . import media, text
from .model import CLUB_ORIGIN, Dep, VersionSpec
from .people import User
from .profiles import Profile
from .rand import DAY_MS, EPOCH_MS, HOUR_MS, derive_seed, log_uniform_int, lognormal_int
from .semver import version_chain

TEAMS = ("mobile", "platform", "payments", "growth", "infra", "design", "data", "identity", "search", "checkout")
PUB_DEPS = ("http", "collection", "meta", "path", "intl", "provider", "riverpod", "json_annotation",
            "equatable", "dio", "rxdart", "logging", "async", "crypto", "uuid", "shared_preferences",
            "go_router", "flutter_bloc", "get_it", "url_launcher", "sqflite", "yaml", "args")
EXTRA_LIBS = ("testing.dart", "widgets.dart", "models.dart", "client.dart", "utils.dart", "extensions.dart")
SHOT_NAMES = ("home", "detail", "settings", "list", "profile", "search", "dark_mode", "onboarding")


@dataclass
class VersionPlan:
    """A version to publish: its content spec plus DB-only facts."""

    spec: VersionSpec
    published_at: int
    uploader_id: str
    retracted_at: int | None = None
    score_ok: bool = True
    failed_uploads: int = 0


@dataclass
class PackagePlan:
    """A package, its settings and its whole version history."""

    name: str
    created_at: int
    publisher_id: str | None
    visibility: str
    visibility_changed: tuple[int, str] | None
    is_unlisted: bool
    is_discontinued: bool
    uploaders: list[tuple[str, int]]
    versions: list[VersionPlan] = field(default_factory=list)
    dartdoc_status: str | None = None


def package_name(rng: random.Random, taken: set[str]) -> str:
    """A fresh snake_case name like ``acme_cache`` or ``payments_picker_ui``."""
    while True:
        a, b = text.words(rng, 2)
        name = rng.choice((f"acme_{a}", f"{rng.choice(TEAMS)}_{a}_ui", f"{a}_{b}", f"{rng.choice(TEAMS)}_{a}"))
        if name not in taken:
            taken.add(name)
            return name


def version_counts(rng: random.Random, profile: Profile) -> list[int]:
    """Geometric-like counts summing to profile.versions, with the profile's long tail."""
    raw = [1 + lognormal_int(rng, profile.versions_median - 1, 0.9, 0, profile.versions_max - 1)
           for _ in range(profile.packages)]
    tail = [rng.randint(101, profile.versions_max) for _ in range(profile.long_tail)] or [profile.versions_max]
    rest = profile.versions - sum(tail)
    body = raw[len(tail):]
    factor = rest / sum(body)
    body = [min(profile.versions_max, max(1, round(c * factor))) for c in body]
    while sum(body) != rest:
        index = rng.randrange(len(body))
        step = 1 if sum(body) < rest else -1
        if 1 <= body[index] + step <= profile.versions_max - 1:
            body[index] += step
    counts = tail + body
    rng.shuffle(counts)
    return counts


def plan_packages(rng: random.Random, profile: Profile, seed: int, users: list[User],
                  publishers: list[str], docs: bool) -> list[PackagePlan]:
    """All packages with versions, deps, screenshots, heavy tails and (if ``docs``) dartdoc status."""
    counts = version_counts(rng, profile)
    span = profile.history_days * DAY_MS
    starts = sorted(EPOCH_MS + int(span * rng.uniform(0.05, 0.85)) for _ in counts)
    taken: set[str] = set()
    plans: list[PackagePlan] = []
    for count, created in zip(counts, starts):
        plan = _package(rng, profile, users, publishers, package_name(rng, taken), created)
        flutter = rng.random() < 0.5
        deps = plan_deps(rng, [p.name for p in plans], flutter)
        plan.versions = _versions(rng, profile, seed, plan, count, flutter, deps)
        status = rng.choices(("completed", "failed", "pending"), (90, 7, 3))[0]
        plan.dartdoc_status = status if docs else None
        plans.append(plan)
    _assign_extras(rng, profile, seed, plans)
    return plans


def _package(rng: random.Random, profile: Profile, users: list[User], publishers: list[str],
             name: str, created: int) -> PackagePlan:
    present = [u for u in users if u.created_at < created and u.role != "viewer"]
    extra = profile.uploaders / profile.packages - 1  # mean uploaders per package, minus the first
    wanted = 1 + (rng.random() < extra) + (rng.random() < extra / 3)
    uploaders = rng.sample(present, min(len(present), wanted))
    public = rng.random() < 0.2
    admin = next(u for u in users if u.role == "owner")
    return PackagePlan(
        name=name, created_at=created, publisher_id=rng.choice(publishers) if rng.random() < 0.6 else None,
        visibility="public" if public else "private",
        visibility_changed=(created + rng.randrange(1, 30) * DAY_MS // 4, admin.user_id) if public else None,
        is_unlisted=rng.random() < 0.05, is_discontinued=rng.random() < 0.04,
        uploaders=[(u.user_id, created) for u in uploaders])


def plan_deps(rng: random.Random, earlier: list[str], flutter: bool) -> tuple[Dep, ...]:
    """About 8 dependencies: local club packages, pub.dev names, SDK and dev tools."""
    deps: list[Dep] = []
    for name in rng.sample(earlier, min(len(earlier), rng.choice((0, 1, 1, 2, 2, 3)))):
        hosted = rng.random() < 0.9
        deps.append(Dep(name, "direct", "hosted" if hosted else "bare", f"^{rng.randint(0, 2)}.{rng.randint(0, 9)}.0",
                        CLUB_ORIGIN if hosted else None, is_local=hosted, is_ambiguous=not hosted))
    for name in rng.sample(PUB_DEPS, rng.randint(2, 5)):
        deps.append(Dep(name, "direct", "bare", f"^{rng.randint(0, 4)}.{rng.randint(0, 12)}.0"))
    if flutter:
        deps += [Dep("flutter", "direct", "sdk"), Dep("flutter_test", "dev", "sdk")]
    else:
        deps.append(Dep("test", "dev", "bare", "^1.25.0"))
    deps.append(Dep("lints", "dev", "bare", "^4.0.0"))
    if rng.random() < 0.3:
        deps.append(Dep("build_runner", "dev", "bare", "^2.4.0"))
    if rng.random() < 0.03:
        deps.append(Dep("shared_utils", "direct", "git"))
    if rng.random() < 0.02:
        deps.append(Dep("patched_http", "override", "path"))
    return tuple(deps)


def base_spec(rng: random.Random, profile: Profile, name: str, flutter: bool, deps: tuple[Dep, ...]) -> VersionSpec:
    """Package-level content choices shared by all its versions (version and seed unset)."""
    return VersionSpec(
        package=name, version="", description=text.prose(rng, rng.randint(60, 180)), flutter=flutter,
        topics=tuple(text.words(rng, rng.randint(1, 3))) if rng.random() < 0.6 else (),
        libraries=(f"{name}.dart", *rng.sample(EXTRA_LIBS, rng.randint(0, 5))), deps=deps,
        executables=(name,) if rng.random() < 0.05 else (), tar_bytes=0, heavy_bytes=0, shots=(),
        asset_exts=(), has_example=rng.random() < 0.7, image_scale=profile.image_scale, seed=0)


def tar_size(rng: random.Random, profile: Profile) -> int:
    """Lognormal tarball target (median 45 KB, sigma 1.3 for small/medium)."""
    return lognormal_int(rng, profile.tar_median, profile.tar_sigma, 3_000, 4_000_000)


def _versions(rng: random.Random, profile: Profile, seed: int, plan: PackagePlan, count: int,
              flutter: bool, deps: tuple[Dep, ...]) -> list[VersionPlan]:
    end = profile.history_end_ms - HOUR_MS
    times = [plan.created_at] + sorted(rng.randrange(plan.created_at, end) for _ in range(count - 1))
    base = base_spec(rng, profile, plan.name, flutter, deps)
    out = []
    for index, (version, at) in enumerate(zip(version_chain(rng, count), times)):
        spec = replace(base, version=version, seed=derive_seed(seed, "version", plan.name, version),
                       tar_bytes=tar_size(rng, profile))
        retracted = at + rng.randrange(1, 72) * HOUR_MS if index and rng.random() < 0.01 else None
        out.append(VersionPlan(spec, at, rng.choice(plan.uploaders)[0], retracted, rng.random() > 0.05,
                               failed_uploads=int(rng.random() < 0.1)))
    return out


def _assign_extras(rng: random.Random, profile: Profile, seed: int, plans: list[PackagePlan]) -> None:
    """Pick the few packages with screenshots, README assets and asset-heavy tarballs."""
    by_size = sorted(plans, key=lambda p: (-len(p.versions), p.name))
    for plan in by_size[: profile.heavy_packages]:
        _make_heavy(rng, profile, plan)
    if profile.outlier_range:
        last = by_size[0].versions[-1]
        last.spec = replace(last.spec, heavy_bytes=log_uniform_int(rng, *profile.outlier_range))
    flutter = [p for p in plans if p.versions[0].spec.flutter and 1 < len(p.versions) <= 60] or plans
    for plan in _weighted_sample(rng, flutter, profile.screenshot_packages):
        _add_screenshots(rng, plan)
    budget = profile.versions * profile.readme_asset_share
    for plan in rng.sample(plans, len(plans)):
        if budget <= 0:
            break
        exts = tuple(media.pick(rng, media.ASSET_MIX) for _ in range(rng.choice((1, 1, 2, 3))))
        for vplan in plan.versions:
            vplan.spec = replace(vplan.spec, asset_exts=exts)
        budget -= len(plan.versions)


def _weighted_sample(rng: random.Random, plans: list[PackagePlan], count: int) -> list[PackagePlan]:
    """Packages drawn by version count (capped at 20): UI packages with screenshots are long-lived."""
    pool, out = list(plans), list[PackagePlan]()
    while pool and len(out) < count:
        pick = rng.choices(range(len(pool)), [min(20, len(p.versions)) for p in pool])[0]
        out.append(pool.pop(pick))
    return out


def _make_heavy(rng: random.Random, profile: Profile, plan: PackagePlan) -> None:
    for vplan in plan.versions[-profile.heavy_versions:]:
        vplan.spec = replace(vplan.spec, heavy_bytes=log_uniform_int(rng, *profile.heavy_range))


def _add_screenshots(rng: random.Random, plan: PackagePlan) -> None:
    """1 to 6 screenshots (mode 3), mostly the same set version after version."""
    slots = [(f"screenshots/{name}.{ext}", ext) for name, ext in
             ((name, media.pick(rng, media.SCREENSHOT_MIX)) for name in rng.sample(SHOT_NAMES, 6))]
    count = round(rng.triangular(1, 6, 3))
    for vplan in plan.versions:
        if rng.random() < 0.1:
            count = min(6, max(1, count + rng.choice((-1, 1))))
        vplan.spec = replace(vplan.spec, shots=tuple(slots[:count]))


def expected_cost(plan: PackagePlan) -> float:
    """Rough build cost, to hand the biggest packages to workers first."""
    return sum(v.spec.tar_bytes + v.spec.heavy_bytes + 300_000 * len(v.spec.shots) for v in plan.versions)
