"""Nothing lost: SIGKILL a real `clubsnap prune` before each of its repository changes in
turn. After every kill, `check --read-data` passes and every kept snapshot restores to
the state it had; the next prune then finishes the work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.clubgen import generate, one_day
from benchmarks.clubstate import club_state
from engine import PruneOptions, Repository, apply_restore, check, open_backend, plan_restore, prune
from engine.format import GARBAGE_PREFIX, BlobType, encode_blob, pack_key
from engine.locks import Lock
from engine.packs import PackBuilder

from .conftest import ROOT, TEST_PASSWORD

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _prune(repo: Path, cache: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT),
           "CLUBSNAP_TEST_KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-m", "tests.kill_at", "prune", "--wait", "0s", "--max-unused", "0%"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _open(repo: Path, cache: Path) -> Repository:
    return Repository.open(open_backend(str(repo)), cache, lambda: TEST_PASSWORD.encode())


def _template(cli: Cli, tmp_path: Path) -> tuple[Path, dict[str, dict[str, object]]]:
    """A repository with every kind of work for prune: forgotten snapshots (whole packs
    to delete, packs to repack), a pack no index names, and a garbage record of an
    earlier prune whose waiting is over. Returns it and the kept snapshots' states."""
    data, repo = tmp_path / "data", tmp_path / "template"
    generate(data, "tiny", seed=31)
    time.sleep(0.1)
    assert cli("init", repo=repo).returncode == 0
    for day in range(1, 5):
        assert cli("snapshot", str(data), repo=repo).returncode == 0
        one_day(data, seed=31, day=day)
    ids = [line.split()[0] for line in cli("snapshots", repo=repo).stdout.splitlines()[1:-1]]
    assert cli("forget", ids[0], repo=repo).returncode == 0
    # An earlier prune that could not sweep: a reader held a lock while it ran.
    setup = _open(repo, tmp_path / "setup-cache")
    reader = Lock(setup.backend, setup.cipher, "read").acquire()
    first = prune(setup, PruneOptions(wait_s=0))
    reader.release()
    assert first.pending_packs > 0
    assert cli("forget", ids[1], repo=repo).returncode == 0
    builder = PackBuilder(BlobType.DATA, setup.cipher)  # what a killed snapshot leaves
    raw = os.urandom(70_000)
    chunk = setup.chunk_id(raw)
    builder.add(chunk, encode_blob(raw, chunk, setup.cipher), len(raw))
    pack_id, pack, _ = builder.finish()
    setup.backend.put(pack_key(pack_id), pack)
    states = {}
    for snap in setup.snapshots():
        target = tmp_path / f"expected-{snap.id.hex()[:8]}"
        apply_restore(setup, plan_restore(setup, snap, target))
        states[snap.id.hex()] = club_state(target, live=False)
    setup.close()
    return repo, states


def test_sigkill_before_every_change_of_a_prune(cli: Cli, tmp_path: Path) -> None:
    template, states = _template(cli, tmp_path)
    assert len(states) == 2
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    clean = _prune(probe, tmp_path / "probe-cache", 0)
    assert clean.returncode == 0, clean.stderr
    changes = int(re.findall(r"changes: (\d+)", clean.stderr)[-1])
    assert changes >= 12, clean.stderr  # lock, repack, index, garbage, deletions, release
    clean_size = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())

    for point in range(1, changes + 1):
        repo, cache = tmp_path / f"repo-{point}", tmp_path / f"cache-{point}"
        shutil.copytree(template, repo)
        killed = _prune(repo, cache, point)
        assert killed.returncode == -9, f"kill point {point}: {killed.stderr}"
        reader = _open(repo, cache)  # the killed prune's own catalog, as on its host
        report = check(reader, read_data=True)
        assert report.ok, f"kill point {point}: {report.errors}"
        for snap in reader.snapshots():
            target = tmp_path / f"restore-{point}-{snap.id.hex()[:8]}"
            apply_restore(reader, plan_restore(reader, snap, target))
            assert club_state(target, live=False) == states[snap.id.hex()], f"kill point {point}"
            shutil.rmtree(target)
        assert {s.id.hex() for s in reader.snapshots()} == set(states)
        reader.close()
        # The lock of the killed prune is stale at once (same host, dead pid): the next
        # prune runs, and finishes the work.
        finished = _prune(repo, cache, 0)
        assert finished.returncode == 0, f"kill point {point}: {finished.stderr}"
        after = _open(repo, tmp_path / f"cold-{point}")
        report = check(after, read_data=True)
        assert report.ok and not report.warnings, f"kill point {point}: {report}"
        assert not list(after.backend.list(GARBAGE_PREFIX)), f"kill point {point}"
        size = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
        assert size <= clean_size * 1.02, f"kill point {point}: {size} bytes left, a clean prune leaves {clean_size}"
        after.close()
        shutil.rmtree(repo)
