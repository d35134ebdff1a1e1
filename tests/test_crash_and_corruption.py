"""Nothing lost: SIGKILL a real `clubsnap snapshot` at many points, then the repository
checks clean and the next snapshot works; a flipped byte is caught and named."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from engine import Repository, check, create_snapshot
from engine.backends.fs import FsBackend
from engine.errors import BackendError
from engine.format import DATA_PREFIX, PackId
from engine.packs import read_trailer
from engine.snapshot import SnapshotOptions

from benchmarks.clubstate import club_state
from .conftest import ROOT, Clock, TEST_PASSWORD

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _bulky_data_dir(root: Path) -> Path:
    """The tiny club plus ~48 MB of incompressible tarballs, so a snapshot lasts long
    enough to be killed at many distinct moments."""
    generate(root, "tiny", seed=5)
    rng = random.Random(5)
    for number in range(12):
        artifacts = root / "blobs" / f"bulk_{number:02d}" / "1.0.0" / "artifacts"
        artifacts.mkdir(parents=True)
        (artifacts / "package.tar.gz").write_bytes(rng.randbytes(4 << 20))
    return root


def _spawn_snapshot(repo: Path, data: Path, cache: Path, kill_at: int | None = None) -> subprocess.Popen[bytes]:
    """A real `clubsnap snapshot`; with ``kill_at`` N, SIGKILLed just before its N-th change
    to the repository (tests/kill_at.py)."""
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    module = "engine"
    if kill_at is not None:
        env["CLUBSNAP_TEST_KILL_AT"] = str(kill_at)
        module = "tests.kill_at"
    return subprocess.Popen([sys.executable, "-m", module, "snapshot", str(data)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def test_sigkill_at_many_points_leaves_a_valid_repository(cli: Cli, tmp_path: Path) -> None:
    """Killed before each of its changes to the repository in turn (a put or a delete: the
    moments a kill can leave a different repository), each time into a repository that
    already holds an earlier, killed attempt; after each: check passes, a new run
    completes. The kill points are counted, not timed: a loaded machine kills at the same ones."""
    data = _bulky_data_dir(tmp_path / "data")
    probe_repo = tmp_path / "probe"
    assert cli("init", repo=probe_repo).returncode == 0
    probe = _spawn_snapshot(probe_repo, data, tmp_path / "probe-cache", kill_at=0)
    _, err = probe.communicate()
    assert probe.returncode == 0, err
    changes = int(re.findall(rb"changes: (\d+)", err)[-1])
    assert changes >= 8, "the run must make enough changes to be killed at many distinct points"

    for point in range(1, changes + 1):
        repo = tmp_path / f"repo-{point}"
        cache = tmp_path / f"cache-{point}"
        assert cli("init", repo=repo).returncode == 0
        killed = _spawn_snapshot(repo, data, cache, kill_at=point)
        assert killed.wait() == -signal.SIGKILL, f"kill point {point}: the run was not killed"
        # A second attempt, killed at the same count into what the first left (it reuses
        # what the first uploaded, so it may make fewer changes and finish).
        assert _spawn_snapshot(repo, data, cache, kill_at=point).wait() in (0, -signal.SIGKILL)
        result = cli("check", repo=repo)
        assert result.returncode == 0, f"kill point {point}: {result.stdout}{result.stderr}"
        assert _spawn_snapshot(repo, data, cache if point % 2 else tmp_path / f"cold-{point}").wait() == 0
        result = cli("check", "--read-data" if point % 4 == 0 else "--read-data-subset=50%", repo=repo)
        assert result.returncode == 0, f"after kill point {point}: {result.stdout}{result.stderr}"

    assert cli("restore", "latest", "--target", str(tmp_path / "restored"), repo=tmp_path / f"repo-{changes // 2}").returncode == 0
    assert club_state(tmp_path / "restored", live=False) == club_state(data, live=True)


def test_killed_runs_upload_is_reused(cli: Cli, tmp_path: Path, clock: Clock) -> None:
    """Chunks indexed before a kill are not uploaded again by the next run."""
    data = _bulky_data_dir(tmp_path / "data")
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    process = _spawn_snapshot(repo, data, tmp_path / "cache")
    deadline = time.monotonic() + 60
    while not list((repo / "index").glob("[0-9a-f]*")) and time.monotonic() < deadline:  # not a .tmp-
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = Repository.open(FsBackend(repo), tmp_path / "inspect-1", lambda: TEST_PASSWORD.encode())
    before.sync_index()
    indexed = {e.id for p in before.catalog.packs() for e in before.catalog.blobs_in_pack(p)}
    before.close()
    assert indexed

    assert cli("snapshot", str(data), repo=repo).returncode == 0
    after = Repository.open(FsBackend(repo), tmp_path / "inspect-2", lambda: TEST_PASSWORD.encode())
    stored = [e.id for key, size in after.backend.list(DATA_PREFIX)
              for e in read_trailer(after.backend, PackId.from_hex(key.rsplit("/", 1)[-1]), size, after.cipher)]
    after.close()
    assert all(stored.count(chunk) == 1 for chunk in indexed)


class _DyingBackend(FsBackend):
    """Fault injection on the real local backend: the process 'dies' at the Nth put."""

    def __init__(self, root: Path, die_at: int) -> None:
        super().__init__(root)
        self.left = die_at

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        self.left -= 1
        if self.left < 0:
            raise BackendError("injected crash")
        super().put(key, data, exclusive=exclusive)


def test_crash_at_every_write_leaves_a_valid_repository(tmp_path: Path, clock: Clock) -> None:
    data = tmp_path / "data"
    generate(data, "tiny", seed=3)
    store = tmp_path / "repo"
    Repository.init(FsBackend(store), tmp_path / "c0", clock).close()
    writes = 0
    while True:
        repo = Repository.open(_DyingBackend(store, writes), tmp_path / f"c{writes % 3}")
        options = SnapshotOptions(source=data, host="h", now=clock)
        try:
            create_snapshot(repo, options)
            break
        except BackendError:
            pass
        finally:
            repo.close()
        verifier = Repository.open(FsBackend(store), tmp_path / "verify-cache")
        report = check(verifier, read_data=True)
        verifier.close()
        assert report.ok, (writes, report.errors)
        writes += 1
        clock.advance(seconds=1)
    assert writes >= 3


def test_flipped_byte_fails_check_and_restore_naming_the_file(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, "tiny", seed=9)
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    assert cli("snapshot", str(data), repo=repo).returncode == 0
    # Damage the largest data pack in the middle of its content.
    packs = sorted((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim = packs[-1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(raw))

    result = cli("check", "--read-data", repo=repo)
    assert result.returncode == 18
    assert victim.name in result.stdout and "blobs/" in result.stdout
    assert "Traceback" not in result.stderr
    # Structure alone cannot see it, but the damage is recorded now: every check reports it.
    structural = cli("check", repo=repo)
    assert structural.returncode == 18 and "recorded as damaged" in structural.stdout

    restored = cli("restore", "latest", "--target", str(tmp_path / "t"), repo=repo)
    assert restored.returncode == 12
    assert victim.name in restored.stderr and "blobs/" in restored.stderr
    assert len(restored.stderr.strip().splitlines()) == 1


def test_a_catalog_upgrade_stopped_halfway_is_done_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop request (Ctrl-C at start-up) in the middle of upgrading a version-2 local
    catalog leaves it at version 2, whole: the next start upgrades it, rather than adding a
    column twice and calling the catalog unusable."""
    import sqlite3
    from engine.catalog import SCHEMA_VERSION, Catalog
    path = tmp_path / "catalog.db"
    Catalog(path).close()
    with sqlite3.connect(path) as old:  # as version 2 made it
        old.execute("ALTER TABLE snapshots DROP COLUMN sealed")
        old.execute("DROP TABLE condemned_packs")
        old.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    old.close()

    def interrupted(self: Catalog) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Catalog, "_create_garbage_tables", interrupted)
        with pytest.raises(KeyboardInterrupt):
            Catalog(path)
    catalog = Catalog(path)
    assert catalog.meta("schema") == str(SCHEMA_VERSION)
    assert catalog._conn.execute("SELECT sealed FROM snapshots").fetchall() == []
    catalog.close()
