"""The reference pass: the data dir's state at each snapshot point, and the floor of each step.

Run once per size and seed, before the tools, on its own copy of the generated data dir:
the states are what every restore is checked against (clubgen's days are deterministic,
so each tool's own copy reaches the same states), and the floors are what each step
must at least move.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import floor
from benchmarks.clubgen import one_day
from benchmarks.clubstate import club_state

DAYS = (1, 2)
SNAPSHOT_STEPS = ("snapshot_1", "snapshot_2", "snapshot_3", "snapshot_4")


@dataclass
class Reference:
    states: list[dict[str, Any]] = field(default_factory=list)  # state 0 (generated), after day 1, after day 2
    floor_bytes: dict[str, int] = field(default_factory=dict)
    floor_s: dict[str, float] = field(default_factory=dict)
    machine: dict[str, float] = field(default_factory=dict)  # read/hash seconds and bytes of state 0


def build(template: Path, seed: int, work: Path) -> Reference:
    root = work / "reference"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root, symlinks=True)
    ref = Reference(machine=floor.read_and_hash_seconds(root))
    images, sizes = [], []
    for day in (0, *DAYS):
        if day:
            one_day(root, seed=seed, day=day)
        ref.states.append(club_state(root, live=True))
        images.append(floor.db_image(root / "db" / "club.db", work / f"reference-day{day}.db"))
        sizes.append(floor.blob_sizes(root))
    ref.floor_bytes = _floor_bytes(ref.states, images, sizes)
    ref.floor_s = _floor_seconds(ref.floor_bytes, ref.machine)
    shutil.rmtree(root)
    for image in images:
        image.unlink()
    return ref


def _floor_bytes(states: list[dict[str, Any]], images: list[Path], sizes: list[dict[str, int]]) -> dict[str, int]:
    def full(i: int) -> int:
        return images[i].stat().st_size + sum(sizes[i][p] for p in states[i]["blobs"])

    def changed(old: int, new: int) -> int:
        return (floor.changed_db_bytes(images[old], images[new])
                + floor.changed_blob_bytes(states[old]["blobs"], states[new]["blobs"], sizes[new]))

    return {"snapshot_1": full(0), "snapshot_2": 0, "snapshot_3": changed(0, 1), "snapshot_4": changed(1, 2),
            "restore_latest": full(2), "restore_at": full(0), "rollback": changed(2, 0),
            "restore_db": images[2].stat().st_size}


def _floor_seconds(floor_bytes: dict[str, int], machine: dict[str, float]) -> dict[str, float]:
    """A snapshot must at least hash what changed; a restore must at least read what it writes."""
    hash_rate = machine["bytes"] / max(machine["hash_s"], 1e-6)
    read_rate = machine["bytes"] / max(machine["read_s"], 1e-6)
    return {step: round(n / (hash_rate if step in SNAPSHOT_STEPS else read_rate), 3)
            for step, n in floor_bytes.items()}
