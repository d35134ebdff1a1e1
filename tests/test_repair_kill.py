"""A repair killed anywhere leaves the repository as readable as before, and the same
repair run again finishes it: SIGKILL of the real `clubsnap repair packs|index|snapshots`
before each of its writes (a put or a delete), then the rest of the repair, then the outcome must equal that
of a repair never interrupted (the same snapshots, restoring the same data) and
`check --read-data` must be clean."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from benchmarks.clubgen import generate
from benchmarks.clubstate import club_state

from engine import Repository
from engine.backends.fs import FsBackend
from engine.chunker import CDC, chunk_stream

from .conftest import ROOT, TEST_PASSWORD

Cli = Callable[..., subprocess.CompletedProcess[str]]
STEPS = ("packs", "index", "snapshots")
MAX_KILL_POINTS = 12  # per step: before each write, or spread over them when there are more


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _env(repo: Path, cache: Path, kill_at: int = 0) -> dict[str, str]:
    return {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT),
            "CLUBSNAP_TEST_KILL_AT": str(kill_at)}


def _repair(repo: Path, cache: Path, step: str, kill_at: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at.py"), "repair", step], capture_output=True,
                          text=True, env=_env(repo, cache, kill_at), stdin=subprocess.DEVNULL, timeout=300)


def _writes(repo: Path, cache: Path, step: str) -> int:
    result = _repair(repo, cache, step)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.rsplit("changes: ", 1)[1].split()[0])


def _damaged(cli: Cli, root: Path) -> Path:
    """A repository with a damaged data pack, a damaged index object and a file lost
    with it, after the check that records the damage and a snapshot that heals the rest."""
    data = root / "data"
    generate(data, "tiny", seed=12)
    repo = root / "repo"
    assert cli("init", repo=repo).returncode == 0
    doomed = data / "blobs" / "doomed" / "1.0.0" / "artifacts" / "package.tar.gz"
    doomed.parent.mkdir(parents=True)
    content = os.urandom(200_000)
    doomed.write_bytes(content)
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    shutil.rmtree(data / "blobs" / "doomed")
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    inspect = Repository.open(FsBackend(repo), root / "inspect", lambda: TEST_PASSWORD.encode())
    inspect.sync_index()
    # a byte inside the lost file's first chunk: the one copy of it there is
    first_chunk = next(chunk_stream(io.BytesIO(content), CDC, inspect.config.chunker))
    where = inspect.catalog.lookup(inspect.chunk_id(first_chunk))
    inspect.close()
    assert where is not None
    _flip(repo / "data" / where.pack.hex()[:2] / where.pack.hex(), where.offset + where.length // 2)
    _flip(sorted((repo / "index").iterdir())[0], 40)
    cli("check", "--read-data", repo=repo)
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    return repo


def _outcome(cli: Cli, repo: Path, cache: Path, target: Path) -> tuple[list[tuple[str, list[str]]], object]:
    """The snapshots (time and tags: a replacement's id differs from run to run, as every
    encrypted object's does) and what the oldest restores, after a clean check."""
    env = {"CLUBSNAP_CACHE_DIR": str(cache)}
    result = cli("check", "--read-data", repo=repo, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    listing = json.loads(cli("snapshots", "--json", repo=repo, env=env).stdout)
    assert cli("restore", listing[0]["id"], "--target", str(target), repo=repo, env=env).returncode == 0
    return [(s["time"], s["tags"]) for s in listing], club_state(target, live=False)


def test_a_killed_repair_run_again_ends_as_an_uninterrupted_one(cli: Cli, tmp_path: Path) -> None:
    damaged = _damaged(cli, tmp_path / "setup")
    reference = tmp_path / "reference"
    shutil.copytree(damaged, reference)
    for step in STEPS:
        assert _repair(reference, tmp_path / "ref-cache", step).returncode == 0
    expected = _outcome(cli, reference, tmp_path / "ref-check", tmp_path / "ref-restore")
    # the oldest snapshot was replaced by one without the lost file, tagged repaired
    listing = json.loads(cli("snapshots", "--json", repo=reference).stdout)
    assert len(listing) == 3 and "repaired" in listing[0]["tags"]

    killed = 0
    for number, step in enumerate(STEPS):
        stage = tmp_path / f"stage-{step}"  # the repository as the steps before left it
        shutil.copytree(damaged, stage)
        for earlier in STEPS[:number]:
            assert _repair(stage, tmp_path / f"stage-cache-{step}", earlier).returncode == 0
        probe = tmp_path / f"probe-{step}"
        shutil.copytree(stage, probe)
        writes = _writes(probe, tmp_path / f"probe-cache-{step}", step)
        print(f"repair {step}: {writes} writes")
        points = (list(range(1, writes + 1)) if writes <= MAX_KILL_POINTS
                  else sorted({1 + (writes - 1) * k // (MAX_KILL_POINTS - 1) for k in range(MAX_KILL_POINTS)}))
        for point in points:
            trial = tmp_path / f"trial-{step}-{point}"
            shutil.copytree(stage, trial)
            cache = tmp_path / f"trial-cache-{step}-{point}"
            assert _repair(trial, cache, step, kill_at=point).returncode == -9, (step, point)
            killed += 1
            for again in STEPS[number:]:
                result = _repair(trial, cache, again)
                assert result.returncode == 0, (step, point, again, result.stderr)
            outcome = _outcome(cli, trial, tmp_path / f"check-{step}-{point}", tmp_path / f"restore-{step}-{point}")
            assert outcome == expected, (step, point)
            shutil.rmtree(trial)
    assert killed >= 15
