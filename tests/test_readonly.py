"""Snapshots of a data directory mounted read-only, as a Docker sidecar sees club's volume
(`-v club-data:/data:ro`), while club keeps writing through its own read-write mount.

The snapshot runs in a private mount namespace where the data dir is a read-only bind
mount (root, with `unshare`); without root, the data dir is made unwritable instead."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.clubgen import LiveWriter, generate
from benchmarks.clubstate import db_dump

from .conftest import ROOT


def _read_only_snapshot(data: Path, repo: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "engine", "snapshot", str(data)]
    if os.geteuid() == 0:
        script = f'mount --bind -o ro "{data}" "{data}" && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def _can_bind_read_only(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f'mount --bind -o ro "{probe}" "{probe}" && ! touch "{probe}/x"'], capture_output=True)
    return result.returncode == 0


def _until_commits(writer: LiveWriter, count: int) -> None:
    """Wait on the writer's commit count (a guard turns a stalled writer into a failure)."""
    deadline = time.monotonic() + 180
    while writer.live_commits < count:
        assert time.monotonic() < deadline, f"the writer made {writer.live_commits} of {count} commits"
        time.sleep(0.01)


def test_snapshots_of_a_read_only_data_dir_while_club_writes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, repo, cache = tmp_path / "data", tmp_path / "repo", tmp_path / "cache"
    generate(data, "tiny", seed=8)
    if os.geteuid() == 0:
        assert shutil.which("unshare") and _can_bind_read_only(tmp_path), "no read-only bind mount possible here"
    assert cli("init", repo=repo).returncode == 0
    ids = []
    with LiveWriter(data, interval=0.003, publish_every=15) as writer:
        for n in range(3):
            _until_commits(writer, 20 * (n + 1))  # club has written (and published) since the last one
            result = _read_only_snapshot(data, repo, cache)
            assert result.returncode == 0, result.stderr  # not partial: every file read, the WAL too
            ids.append(result.stdout.split()[1])
    assert writer.commits > 0 and writer.publishes > 0
    for snap in ids:  # each one consistent: restored, every row's blob there, integrity_check ok
        verified = cli("verify", snap, "--temp-dir", str(tmp_path), repo=repo)
        assert verified.returncode == 0, verified.stdout + verified.stderr

    # Club stopped: its last connection checkpointed and removed -wal and -shm. SQLite
    # cannot open a WAL database read-only without an -shm; the file alone then holds
    # every commit, and it is read as immutable (checked unchanged afterwards).
    assert not (data / "db" / "club.db-shm").exists()
    stopped = _read_only_snapshot(data, repo, cache)
    assert stopped.returncode == 0, stopped.stderr
    restored = tmp_path / "restored"
    assert cli("restore", "latest", "--target", str(restored), repo=repo).returncode == 0
    assert db_dump(restored / "db" / "club.db", live=False) == db_dump(data / "db" / "club.db", live=False)
    assert cli("verify", "latest", "--temp-dir", str(tmp_path), repo=repo).returncode == 0

    # A crashed club's -wal without its -shm index cannot be read on a read-only mount:
    # one clear line says so (and the snapshot is partial).
    conn = sqlite3.connect(data / "db" / "club.db")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE crash_probe (x INTEGER)")
    conn.commit()
    crashed = tmp_path / "crashed"
    shutil.copytree(data, crashed, ignore=shutil.ignore_patterns("club.db-shm"))
    conn.close()
    assert (crashed / "db" / "club.db-wal").stat().st_size > 0
    result = _read_only_snapshot(crashed, repo, cache)
    assert result.returncode == 3
    assert "its -wal holds transactions but there is no -shm index" in result.stderr


NOBODY = 65534  # uid and gid of an unprivileged user, for the test run as root (as CI is)


def test_snapshot_of_an_unwritable_data_dir(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A data dir the snapshot's user cannot write (permissions, not a mount): as root,
    which ignores permissions, the snapshot runs as an unprivileged user (setpriv)."""
    import tempfile

    from benchmarks.clubstate import club_state

    # Outside tmp_path: pytest's base directory is private to root.
    work = Path(tempfile.mkdtemp(prefix="clubsnap-unwritable-"))
    try:
        work.chmod(0o755)
        data, repo, cache = work / "data", work / "repo", work / "cache"
        generate(data, "tiny", seed=9)
        assert cli("init", repo=repo).returncode == 0
        expected = club_state(data, live=False)
        command = [sys.executable, "-m", "engine", "snapshot", str(data)]
        if os.geteuid() == 0:
            cache.mkdir()
            for path in [repo, *repo.rglob("*"), cache]:
                os.chown(path, NOBODY, NOBODY)
            command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *command]
        for path in [data, *data.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        env = {**os.environ, "CLUBSNAP_REPO": str(repo), "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT),
               "HOME": str(work)}
        probe = subprocess.run([*command[:command.index(sys.executable)], "touch", str(data / "db" / "probe")],
                               capture_output=True)
        assert probe.returncode != 0, "the data dir must be unwritable for the snapshot's user"
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr  # not partial: every file read
        assert sorted(p.name for p in (data / "db").iterdir()) == ["club.db"], "nothing written to the data dir"
        restored = work / "restored"
        assert cli("restore", "latest", "--target", str(restored), repo=repo).returncode == 0
        assert club_state(restored, live=False) == expected
    finally:
        for path in [work, *work.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        shutil.rmtree(work)
