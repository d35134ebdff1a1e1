"""Likes and daily download counts over the generated history.

Downloads are the hottest table in a real club DB (§1.6): one row per (package, version,
day) with at least one download, Zipf over packages, concentrated on the latest 1-3
versions. Rows are spread over each day so they interleave with other tables on disk.
"""

from __future__ import annotations

import bisect
import random

from .catalog import PackagePlan
from .people import User
from .profiles import Profile
from .rand import DAY_MS, EPOCH_MS, date_utc, zipf_weights
from .rows import Timed

VERSION_WEIGHTS = (70, 20, 10)  # latest, previous, the one before


def plan_likes(rng: random.Random, profile: Profile, users: list[User],
               packages: list[PackagePlan]) -> tuple[list[Timed], dict[str, int]]:
    """Distinct (user, package) likes and the resulting likes_count per package."""
    end = profile.history_end_ms
    pairs: set[tuple[int, int]] = set()
    for _ in range(profile.likes * 20):
        if len(pairs) >= min(profile.likes, len(users) * len(packages)):
            break
        pairs.add((rng.randrange(len(users)), rng.randrange(len(packages))))
    out, counts = [], {p.name: 0 for p in packages}
    for user_index, pkg_index in sorted(pairs):
        user, pkg = users[user_index], packages[pkg_index]
        start = max(user.created_at, pkg.created_at)
        at = start + rng.randrange(max(1, end - start))
        out.append(Timed(at, "package_likes", {"user_id": user.user_id, "package_name": pkg.name, "created_at": at}))
        counts[pkg.name] += 1
    return out, counts


def plan_downloads(rng: random.Random, profile: Profile, packages: list[PackagePlan]) -> list[Timed]:
    """About profile.download_rows rows, spread over days by how many pairs could be downloaded."""
    popularity = list(packages)
    rng.shuffle(popularity)
    weight = dict(zip((p.name for p in popularity), zipf_weights(len(popularity))))
    timeline = {p.name: ([v.published_at for v in p.versions], [v.spec.version for v in p.versions]) for p in packages}
    day_ends = [EPOCH_MS + (day + 1) * DAY_MS for day in range(profile.history_days)]
    pairs = [sum(min(3, bisect.bisect_left(times, end)) for times, _ in timeline.values()) for end in day_ends]
    total = sum(pairs) or 1
    out: list[Timed] = []
    for end, available in zip(day_ends, pairs):
        present = [p for p in packages if p.created_at < end]
        out += _day_rows(rng, end, present, weight, timeline, round(profile.download_rows * available / total))
    return out


def _day_rows(rng: random.Random, day_end: int, present: list[PackagePlan], weight: dict[str, float],
              timeline: dict[str, tuple[list[int], list[str]]], wanted: int) -> list[Timed]:
    """Up to ``wanted`` distinct (package, version) rows for one day.

    Weighted sampling without replacement by an exponential race (smallest E/w wins),
    over each package's latest three versions: one pass, no rejection loop, which keeps
    the medium profile's 360k rows cheap even where Zipf makes popular pairs repeat.
    """
    race = []
    for pkg in present:
        times, versions = timeline[pkg.name]
        published = bisect.bisect_left(times, day_end)
        for rank, index in enumerate(range(published - 1, max(-1, published - 4), -1)):
            key = rng.expovariate(1.0) / (weight[pkg.name] * VERSION_WEIGHTS[rank])
            race.append((key, pkg.name, versions[index], times[index]))
    race.sort()
    chosen = race[: min(wanted, int(len(race) * 0.9))]
    return [_download_row(rng, name, version, published, day_end, weight[name])
            for _, name, version, published in chosen]


def _download_row(rng: random.Random, package: str, version: str, published: int, day_end: int,
                  weight: float) -> Timed:
    at = rng.randrange(max(day_end - DAY_MS, published + 1), day_end)  # never before the publish
    count = min(200, max(1, int(rng.paretovariate(1.2) * 200 * weight**0.5)))
    return Timed(at, "package_download_counts", {"package_name": package, "version": version,
                                                 "date_utc": date_utc(at), "count": count})
