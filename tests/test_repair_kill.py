"""A repair killed anywhere leaves the repository as readable as before, and the same
repair run again finishes it: SIGKILL of the real `clubsnap repair packs|index|snapshots`
before each of its writes, then the rest of the repair, then the outcome must equal that
of a repair never interrupted (the same snapshots, restoring the same data) and
`check --read-data` must be clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from benchmarks.clubgen import generate
from benchmarks.clubstate import club_state

from .conftest import ROOT

Cli = Callable[..., subprocess.CompletedProcess[str]]
STEPS = ("packs", "index", "snapshots")
KILL_POINTS = 5  # per step, spread over its writes


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
    doomed.write_bytes(os.urandom(200_000))
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    shutil.rmtree(data / "blobs" / "doomed")
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    largest = max((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _flip(largest, largest.stat().st_size // 2)
    _flip(sorted((repo / "index").iterdir())[0], 40)
    cli("check", "--read-data", repo=repo)
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    return repo


def _outcome(cli: Cli, repo: Path, cache: Path, target: Path) -> tuple[list[str], dict[str, object]]:
    result = cli("check", "--read-data", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [s["id"] for s in json.loads(cli("snapshots", "--json", repo=repo,
                                            env={"CLUBSNAP_CACHE_DIR": str(cache)}).stdout)]
    assert cli("restore", ids[0], "--target", str(target), repo=repo,
               env={"CLUBSNAP_CACHE_DIR": str(cache)}).returncode == 0
    return ids, club_state(target, live=False)


def test_a_killed_repair_run_again_ends_as_an_uninterrupted_one(cli: Cli, tmp_path: Path) -> None:
    damaged = _damaged(cli, tmp_path / "setup")
    reference = tmp_path / "reference"
    shutil.copytree(damaged, reference)
    for step in STEPS:
        assert _repair(reference, tmp_path / "ref-cache", step).returncode == 0
    expected = _outcome(cli, reference, tmp_path / "ref-check", tmp_path / "ref-restore")
    assert len(expected[0]) == 3  # the oldest snapshot was replaced, without the lost file

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
        points = sorted({1 + (writes - 1) * k // (KILL_POINTS - 1) for k in range(KILL_POINTS)} if writes else set())
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
    assert killed >= 6
