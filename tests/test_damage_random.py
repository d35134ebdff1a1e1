"""Thirty random injections of damage (a flipped byte, a truncation or a deletion of a data
pack, a tree pack, an index object or a snapshot record), each followed by what an
operator does: `check --read-data`, a snapshot of the intact source, `repair packs`,
`repair index`, `repair snapshots`. Afterwards `check --read-data` is clean, every
snapshot restores exactly what it held, less only what no copy anywhere still had, and
all that is lost is named by a repair."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

from benchmarks.clubgen import generate
from benchmarks.clubstate import blob_digests, club_state
from engine import Repository, apply_restore, check, create_snapshot, plan_restore
from engine.backends.fs import FsBackend
from engine.format import DATA_PREFIX, INDEX_PREFIX, SNAPSHOT_PREFIX, BlobType, PackId
from engine.packs import read_trailer
from engine.repair import repair_index, repair_packs, repair_snapshots
from engine.snapshot import SnapshotOptions

from .conftest import Clock

INJECTIONS = 30
TARGETS = ("data pack", "tree pack", "index object", "snapshot record")


def _states(root: Path, work: Path) -> list[Path]:
    """Three states of a club data dir (kept as copies): the tiny set, then a day of
    uploads and a removal, then the current one the source keeps."""
    data = work / "data"
    generate(data, "tiny", seed=21)
    states = []
    rng = random.Random(21)
    for number in range(3):
        if number:
            extra = data / "blobs" / f"upload_{number}" / "1.0.0" / "artifacts" / "package.tar.gz"
            extra.parent.mkdir(parents=True)
            extra.write_bytes(rng.randbytes(300_000))
            tarballs = sorted(data.glob("blobs/*/*/artifacts/package.tar.gz"))
            tarballs[number].unlink()
        copy = root / f"state-{number}"
        shutil.copytree(data, copy, symlinks=True)
        states.append(copy)
    return states


def _kind_of_pack(repo: Repository, key: str, size: int) -> BlobType:
    return read_trailer(repo.backend, PackId.from_hex(key.rsplit("/", 1)[-1]), size, repo.cipher)[0].type


def _inject(repo: Repository, rng: random.Random) -> str:
    target = rng.choice(TARGETS)
    root = Path(repo.backend.location)
    if target.endswith("pack"):
        want = BlobType.TREE if target == "tree pack" else BlobType.DATA
        keys = sorted(k for k, size in repo.backend.list(DATA_PREFIX) if _kind_of_pack(repo, k, size) == want)
    else:
        keys = sorted(k for k, _ in repo.backend.list(INDEX_PREFIX if target == "index object" else SNAPSHOT_PREFIX))
    key = rng.choice(keys)
    # A deleted record leaves nothing to find: damage, not forgetting, is what is tested.
    how = rng.choice(("flip", "truncate") if target == "snapshot record" else ("flip", "truncate", "delete"))
    path = root / key
    raw = bytearray(path.read_bytes())
    path.chmod(0o600)
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(raw[:rng.randrange(1, len(raw))]))
    else:
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
    return f"{how} {target} {key}"


def _contents(root: Path) -> dict[str, str]:
    return blob_digests(root)


def test_random_damage_is_healed_or_named(tmp_path: Path, clock: Clock) -> None:
    states = _states(tmp_path, tmp_path / "work")
    base = tmp_path / "base"
    repo = Repository.init(FsBackend(base), tmp_path / "base-cache", clock)
    taken = []
    for state in states:
        taken.append(create_snapshot(repo, SnapshotOptions(source=state, host="h", now=clock)).info.id)
        clock.advance(hours=1)
    repo.close()
    source_digests = set(hashlib.sha256(p.read_bytes()).hexdigest() for p in (states[-1] / "blobs").rglob("*")
                         if p.is_file())
    rng = random.Random(16)
    outcomes: dict[str, int] = {"restored whole": 0, "replaced": 0, "removed": 0}
    for number in range(INJECTIONS):
        store = tmp_path / f"repo-{number}"
        shutil.copytree(base, store)
        cache = tmp_path / ("base-cache" if number % 2 else f"cold-{number}")  # warm and fresh hosts
        repo = Repository.open(FsBackend(store), cache)
        what = _inject(repo, rng)
        check(repo, read_data=True)
        create_snapshot(repo, SnapshotOptions(source=states[-1], host="h", now=clock))
        clock.advance(minutes=10)
        packs = repair_packs(repo)
        repair_index(repo)
        records = repair_snapshots(repo)
        final = check(repo, read_data=True)
        assert final.ok, (what, final.errors)
        named = set(packs.unrecoverable)
        replaced = {r["id"]: r for r in records.records_replaced}
        removed = " ".join(records.records_removed)
        listed = {snap.record.get("repaired", {}).get("original", bytes(snap.id)): snap for snap in repo.snapshots()}
        for state, snap_id in zip(states, taken):
            target = tmp_path / f"restore-{number}-{snap_id.short()}"
            if snap_id not in listed:
                assert snap_id.hex() in removed, (what, "a snapshot vanished unnamed")
                outcomes["removed"] += 1
                continue
            snap = listed[snap_id]
            apply_restore(repo, plan_restore(repo, snap, target), set_owner=False)
            if snap.id == snap_id:
                assert club_state(target, live=False) == club_state(state, live=True), what
                outcomes["restored whole"] += 1
                continue
            lost = set(replaced[snap_id.hex()]["removed"])
            outcomes["replaced"] += 1
            # What is gone is named by repair packs, and was in no copy the source still had.
            assert all(f"snapshot {snap_id.short()} {path}" in named or path.endswith("(directory unreadable)")
                       for path in lost), (what, lost, named)
            for path in lost:
                if not path.endswith("(directory unreadable)") and path.startswith("blobs/"):
                    assert hashlib.sha256((state / path).read_bytes()).hexdigest() not in source_digests, (what, path)
            expected = {k: v for k, v in _contents(state).items() if k not in lost
                        and not any(k.startswith(p.split(" (")[0]) for p in lost if p.endswith("unreadable)"))}
            assert _contents(target) == expected, what
        latest = repo.snapshots()[-1]
        apply_restore(repo, plan_restore(repo, latest, tmp_path / f"latest-{number}"), set_owner=False)
        assert club_state(tmp_path / f"latest-{number}", live=False) == club_state(states[-1], live=True), what
        repo.close()
        shutil.rmtree(store)
    print(f"outcomes over {INJECTIONS} injections: {outcomes}")
    assert outcomes["restored whole"] > 0
