"""Semver chains and club's latest-version pointers.

Versions look like what ``dart pub`` publishers write: mostly patch and minor bumps, some
``-dev.N``/``-beta.N`` prereleases, PR builds ``X.Y.Z-prN`` (club_cli pr_version.dart) and
an occasional ``+N`` build suffix, which matters because ``+`` appears in blob paths.
"""

from __future__ import annotations

import random
from typing import Iterable

PreKey = tuple[tuple[int, int | str], ...]


def _core_and_pre(version: str) -> tuple[tuple[int, int, int], str]:
    core = version.split("+", 1)[0]
    numbers, _, pre = core.partition("-")
    major, minor, patch = (int(part) for part in numbers.split("."))
    return (major, minor, patch), pre


def version_key(version: str) -> tuple[tuple[int, int, int], int, PreKey, str]:
    """Semver precedence; build metadata only breaks ties so the order is total."""
    core, pre = _core_and_pre(version)
    idents: PreKey = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split(".")) if pre else ()
    return core, 0 if pre else 1, idents, version


def is_prerelease(version: str) -> bool:
    """True for ``1.2.0-dev.3`` and ``1.2.0-pr4``; build suffixes do not count."""
    return bool(_core_and_pre(version)[1])


def latest_pointers(versions: Iterable[str]) -> tuple[str | None, str | None]:
    """(latest_version, latest_prerelease) over the non-retracted versions given.

    latest_version is the newest stable release, or the newest prerelease when a package
    has only prereleases; latest_prerelease is set only when a prerelease is newer still.
    """
    ordered = sorted(versions, key=version_key)
    if not ordered:
        return None, None
    stable = [v for v in ordered if not is_prerelease(v)]
    latest = stable[-1] if stable else ordered[-1]
    newest = ordered[-1]
    return latest, newest if newest != latest and is_prerelease(newest) else None


def version_chain(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct versions in publish order, starting at 0.1.0 or 1.0.0."""
    state = [0, 1, 0] if rng.random() < 0.6 else [1, 0, 0]
    out = [_fmt(state)]
    counters: dict[str, int] = {}
    pr_number = rng.randint(1, 30)
    while len(out) < count:
        roll = rng.random()
        if roll < 0.05:
            pr_number += rng.randint(1, 4)
            out.append(f"{state[0]}.{state[1]}.{state[2] + 1}-pr{pr_number}")
        elif roll < 0.15:
            out.append(_next_pre(rng, state, counters))
        else:
            _bump(rng, state)
            out.append(_fmt(state) + (f"+{rng.randint(1, 99)}" if rng.random() < 0.03 else ""))
    return out


def next_stable(rng: random.Random, existing: Iterable[str]) -> str:
    """The next release after the highest existing version (a day's new publish)."""
    highest = max(existing, key=version_key)
    core, _ = _core_and_pre(highest)
    state = list(core)
    if not is_prerelease(highest):
        _bump(rng, state)
    return _fmt(state)


def next_pr(existing: Iterable[str]) -> str:
    """A fresh PR build version above the highest existing one."""
    versions = list(existing)
    core, _ = _core_and_pre(max(versions, key=version_key))
    numbers = [int(v.split("-pr")[1].split("+")[0]) for v in versions if "-pr" in v]
    return f"{core[0]}.{core[1]}.{core[2] + 1}-pr{max(numbers, default=0) + 1}"


def _fmt(state: list[int]) -> str:
    return f"{state[0]}.{state[1]}.{state[2]}"


def _bump(rng: random.Random, state: list[int]) -> None:
    roll = rng.random()
    if roll < 0.75:
        state[2] += 1
    elif roll < 0.95:
        state[1:] = [state[1] + 1, 0]
    else:
        state[:] = [state[0] + 1, 0, 0]


def _next_pre(rng: random.Random, state: list[int], counters: dict[str, int]) -> str:
    base = f"{state[0]}.{state[1] + 1}.0"
    tag = rng.choice(("dev", "beta"))
    counters[base + tag] = counters.get(base + tag, 0) + 1
    return f"{base}-{tag}.{counters[base + tag]}"
