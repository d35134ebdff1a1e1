"""The whole generated history as data, before any byte is written."""

from __future__ import annotations

from dataclasses import dataclass

from . import activity, catalog, people
from .catalog import PackagePlan
from .profiles import Meta
from .rand import rng_for
from .rows import Timed


@dataclass
class World:
    """Everything generate will write: people rows, packages, likes and downloads."""

    users: list[people.User]
    packages: list[PackagePlan]
    likes_count: dict[str, int]
    timed: list[Timed]


def plan_world(meta: Meta) -> World:
    """Plan users first, then packages (which need uploaders), then activity on them."""
    profile = meta.profile
    rng = rng_for(meta.seed, "people")
    users, timed = people.plan_users(rng, profile)
    timed += people.plan_invites(rng, profile, users)
    publishers, publisher_rows = people.plan_publishers(rng, profile, users)
    timed += publisher_rows + people.plan_verifications(rng, profile, users)
    timed += people.plan_tokens(rng, profile, users)
    timed += people.plan_settings(rng, profile, meta.scoring_enabled)
    docs = meta.scoring_enabled and meta.dartdoc_mode != "none"  # dartdoc runs inside scoring jobs
    packages = catalog.plan_packages(rng_for(meta.seed, "catalog"), profile, meta.seed, users, publishers, docs)
    likes, counts = activity.plan_likes(rng_for(meta.seed, "likes"), profile, users, packages)
    timed += likes + activity.plan_downloads(rng_for(meta.seed, "downloads"), profile, packages)
    return World(users, packages, counts, timed)
