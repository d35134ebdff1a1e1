"""Bad input gets one line on stderr and a documented exit code, never a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Callable

import pytest

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("clubsnap: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def _mini_data_dir(root: Path) -> Path:
    (root / "db").mkdir(parents=True)
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts").mkdir(parents=True)
    conn = sqlite3.connect(root / "db" / "club.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts" / "package.tar.gz").write_bytes(b"tar" * 1000)
    return root


def test_missing_data_dir(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    _one_line_error(cli("snapshot", str(tmp_path / "nope"), repo=repo), 15, "does not exist")


def test_repository_not_initialised(cli: Cli, tmp_path: Path) -> None:
    _one_line_error(cli("snapshots", repo=tmp_path / "empty"), 10, "no clubsnap repository")
    _one_line_error(cli("snapshot", str(_mini_data_dir(tmp_path / "d")), repo=tmp_path / "empty"), 10)


def test_init_twice_is_refused(cli: Cli, tmp_path: Path) -> None:
    assert cli("init", repo=tmp_path / "repo").returncode == 0
    _one_line_error(cli("init", repo=tmp_path / "repo"), 10, "already exists")


def test_no_repository_given(cli: Cli) -> None:
    result = cli("snapshots", env={"CLUBSNAP_REPO": ""})
    _one_line_error(result, 2, "--repo")


def test_unknown_format_version(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    config = bytearray((repo / "config").read_bytes())
    config[4] = 99
    (repo / "config").write_bytes(bytes(config))
    _one_line_error(cli("snapshots", repo=repo), 11, "format version 99")


def test_at_before_first_snapshot(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    assert cli("snapshot", str(_mini_data_dir(tmp_path / "d")), repo=repo).returncode == 0
    result = cli("restore", "--at", "2001-01-01", "--target", str(tmp_path / "t"), repo=repo)
    _one_line_error(result, 14, "no snapshot at or before")


def test_unknown_snapshot_id_and_bad_time(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", repo=repo)
    cli("snapshot", str(_mini_data_dir(tmp_path / "d")), repo=repo)
    _one_line_error(cli("restore", "deadbeef", "--target", str(tmp_path / "t"), repo=repo), 14)
    _one_line_error(cli("restore", "--at", "last tuesday", "--target", str(tmp_path / "t"), repo=repo), 2)


def test_unreadable_file_gives_partial_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The unreadable file is reported, the rest is saved, exit code 3 says partial.

    As root, file modes do not stop reads, so the refusal is injected on that one path.
    """
    from engine import cli as cli_module
    from engine import snapshot as snapshot_module

    data = _mini_data_dir(tmp_path / "d")
    secret = data / "blobs" / "pkg" / "1.0.0" / "artifacts" / "secret.bin"
    secret.write_bytes(b"x" * 100)
    secret.chmod(0)
    if os.geteuid() == 0:
        def refusing_open(path: object, *args: object, **kwargs: object) -> object:
            if os.fsdecode(path).endswith("secret.bin"):  # type: ignore[arg-type]
                raise PermissionError(13, "Permission denied")
            return open(path, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(snapshot_module, "open", refusing_open, raising=False)
    monkeypatch.setenv("CLUBSNAP_REPO", str(tmp_path / "repo"))
    monkeypatch.setenv("CLUBSNAP_CACHE_DIR", str(tmp_path / "cache"))
    assert cli_module.main(["init"]) == 0
    assert cli_module.main(["snapshot", str(data)]) == 3
    err = capsys.readouterr().err
    assert "secret.bin" in err and "Permission denied" in err
    assert cli_module.main(["snapshots"]) == 0
    assert "PARTIAL" in capsys.readouterr().out
    assert cli_module.main(["restore", "latest", "--target", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "blobs" / "pkg" / "1.0.0" / "artifacts" / "package.tar.gz").read_bytes() == b"tar" * 1000
    assert not (tmp_path / "t" / "blobs" / "pkg" / "1.0.0" / "artifacts" / "secret.bin").exists()


def test_unusable_cache_dir(cli: Cli, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = cli("init", repo=tmp_path / "repo", env={"CLUBSNAP_CACHE_DIR": str(blocker)})
    _one_line_error(result, 1, "local catalog")
    assert not (tmp_path / "repo" / "config").exists()


def test_repository_path_that_is_a_file(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    _one_line_error(cli("snapshots", repo=tmp_path / "file"), 13, "Not a directory")


@pytest.mark.parametrize("buffered", [True, False])
def test_output_nobody_can_take_keeps_the_exit_code(cli: Cli, tmp_path: Path, buffered: bool) -> None:
    """stdout closed, cut off by its reader, or on a full disk: a command's own exit code
    stands (a probe must see status's 22), a success cut short is 141, and output lost to a
    full disk is an error of its own; never "Exception ignored" and exit 120 at exit. The
    write fails at the flush when output is buffered, inside the command when it is not
    (PYTHONUNBUFFERED, as containers often set it, or output larger than the buffer)."""
    import sys
    from engine.errors import EXIT_BROKEN_PIPE, StorageFull, Unhealthy
    from .conftest import ROOT
    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    env.update(CLUBSNAP_CACHE_DIR=str(tmp_path / "cli-cache"), PYTHONPATH=str(ROOT), CLUBSNAP_REPO=str(repo))

    def clubsnap(stdout: int | object, *args: str, closed: bool = False) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "engine", *args]
        if closed:  # started with fd 1 closed, as a daemon launched with >&-
            command = ["bash", "-c", 'exec "$@" >&-', "clubsnap", *command]
        return subprocess.run(command, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)

    assert clubsnap(subprocess.DEVNULL, "snapshots", closed=True).returncode == 0
    assert clubsnap(subprocess.DEVNULL, "status", "--max-age", "1h", closed=True).returncode == Unhealthy.exit_code
    reader, writer = os.pipe()
    os.close(reader)
    cut = clubsnap(writer, "status", "--max-age", "1h")
    assert cut.returncode == Unhealthy.exit_code and "Exception" not in cut.stderr, cut.stderr
    assert clubsnap(writer, "status").returncode == EXIT_BROKEN_PIPE
    os.close(writer)
    with open("/dev/full", "w") as full:
        _one_line_error(clubsnap(full, "status", "--max-age", "1h"), Unhealthy.exit_code, "no snapshot")
        _one_line_error(clubsnap(full, "status"), StorageFull.exit_code, "cannot write the output")


RUN_LOG_ON_A_FILLING_DISK = """
import os, resource, signal, sys
from engine.cli import _StdoutLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead
log = _StdoutLog()
log("first line")
resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))  # the disk fills mid-line
log("second line that does not fit")
log("third line, nothing of it fits")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)  # space is freed
log("fourth line")
"""


def test_a_run_log_line_cut_by_a_full_disk_is_ended_before_the_next(tmp_path: Path) -> None:
    """A line half written when the disk filled must not swallow the next one: each
    ``--log-json`` record stays a line of its own."""
    import sys
    from .conftest import ROOT
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-c", RUN_LOG_ON_A_FILLING_DISK], stdout=out, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "first line\nsecond li\nfourth line\n"  # 20 bytes, then space again
