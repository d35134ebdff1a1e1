"""Issue 16, items 7 and 8: a full file system under the local catalog is exit 17, a
missing S3 bucket exit 10, and what clubsnap writes on local disks is private (files
0600, directories 0700), older and looser repositories and catalogs tightened on open."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from engine import cli as cli_module
from engine.catalog import CachedFile, Catalog, catalog_error
from engine.errors import EngineError, StorageFull

from .test_cli_errors import _mini_data_dir

Cli = Callable[..., subprocess.CompletedProcess[str]]
NO_SPACE = "no space left on device (free space or use --cache-dir elsewhere)"


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit ``code``, one ``clubsnap:`` line on stderr holding ``words``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clubsnap: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _fill(directory: Path) -> None:
    """Write into ``directory`` until its file system says ENOSPC."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 512:
                    return
                block = block[:len(block) // 2]  # the last pages too
    finally:
        os.close(fd)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (CI runs as root); skipped only where mounting is refused."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazily if a catalog an in-process command left open still holds it.
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


# ---- 7. exit codes: a full catalog file system ------------------------------------------------

def test_full_file_system_under_the_catalog_at_open_is_exit_17(cli: Cli, tmp_path: Path, small_fs: Path) -> None:
    cache = small_fs / "cache"
    repo = tmp_path / "repo"
    assert cli("init", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "roomy")}).returncode == 0
    _fill(small_fs)
    for args, where in ((("snapshots",), repo), (("init",), tmp_path / "repo2")):
        result = cli(*args, repo=where, env={"CLUBSNAP_CACHE_DIR": str(cache)})
        _one_line_error(result, 17, NO_SPACE, f"local catalog {cache}/")
    assert not (tmp_path / "repo2" / "config").exists()  # init failed before writing anything


def test_catalog_filling_up_after_open_is_exit_17(tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The catalog opened fine; the disk fills while the snapshot runs, and its write of
    the files cache fails in SQLite ("database or disk is full"), which reaches the CLI's
    dispatch as a sqlite3.Error: still exit 17 and one line naming the catalog."""
    data = _mini_data_dir(tmp_path / "d")
    monkeypatch.setenv("CLUBSNAP_REPO", str(tmp_path / "repo"))
    monkeypatch.setenv("CLUBSNAP_CACHE_DIR", str(small_fs / "cache"))
    assert cli_module.main(["init"]) == 0
    real_update = Catalog.update_files
    failures: list[BaseException] = []

    def filling_update(self: Catalog, source: str, changed: dict[bytes, CachedFile], gone: object) -> None:
        # A checkpoint that truncates the WAL first: otherwise the write may land in WAL
        # space already allocated (after an earlier checkpoint) and need no new block. And
        # rows enough to need new pages: files younger than the racy window are not cached,
        # and a write of nothing needs no space at all.
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _fill(small_fs)
        padding = {f"pad/{number}".encode(): CachedFile(1, 1, 1, 1, []) for number in range(2000)}
        try:
            real_update(self, source, {**changed, **padding}, gone)  # type: ignore[arg-type]
        except BaseException as exc:
            failures.append(exc)
            raise

    monkeypatch.setattr(Catalog, "update_files", filling_update)
    capsys.readouterr()
    assert cli_module.main(["snapshot", str(data)]) == 17
    assert failures and isinstance(failures[0], sqlite3.Error), failures  # it failed after open, in SQLite
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and NO_SPACE in lines[0] and str(small_fs / "cache") in lines[0], lines


def test_a_disk_io_error_is_no_space_only_when_the_file_system_is_full(tmp_path: Path, small_fs: Path) -> None:
    roomy = Catalog(tmp_path / "cache" / "r" / "catalog.db")
    full = Catalog(small_fs / "cache" / "r" / "catalog.db")
    _fill(small_fs)
    io_error = sqlite3.OperationalError("disk I/O error")
    on_full = catalog_error(io_error, full.path)
    assert isinstance(on_full, StorageFull) and on_full.exit_code == 17 and str(full.path) in str(on_full)
    on_roomy = catalog_error(io_error, roomy.path)
    assert not isinstance(on_roomy, StorageFull) and on_roomy.exit_code == 1, on_roomy
    # No path given (the CLI's case): the opened catalog on the full file system is named.
    assert str(full.path) in str(catalog_error(io_error))
    # A locked catalog is no full disk, wherever it is.
    locked = catalog_error(sqlite3.OperationalError("database is locked"), full.path)
    assert type(locked) is EngineError and "database is locked" in str(locked)
    roomy.close()
    full.close()


# ---- 7. exit codes: a missing S3 bucket -------------------------------------------------------

def test_missing_bucket_is_no_repository(cli: Cli, s3_env: dict[str, str], tmp_path: Path) -> None:
    endpoint = s3_env["CLUBSNAP_S3_ENDPOINT"]
    missing = f"clubsnap-absent-{os.getpid()}"
    for args in (("snapshots",), ("check",), ("snapshot", str(_mini_data_dir(tmp_path / "d")))):
        line = _one_line_error(cli(*args, env={"CLUBSNAP_REPO": f"s3://{missing}/repo"}, timeout=60), 10)
        assert f"no S3 bucket {missing} at {endpoint} (create it first, or check --repo)" in line, line
    # init creates a missing bucket (docs/backends.md); one it cannot create (here a name
    # the service refuses) is a missing bucket too, with the reason.
    line = _one_line_error(cli("init", env={"CLUBSNAP_REPO": "s3://xy/repo"}, timeout=60), 10)
    assert f"no S3 bucket xy at {endpoint}" in line and "creating it failed: InvalidBucketName" in line, line


# ---- 8. permissions ----------------------------------------------------------------------------

def _loose_modes(root: Path) -> list[tuple[str, str]]:
    """Everything under ``root`` (itself included) that is not 0600 / 0700."""
    found = [] if _mode(root) == 0o700 else [(".", oct(_mode(root)))]
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            if _mode(Path(dirpath) / name) != 0o700:
                found.append((os.path.relpath(Path(dirpath) / name, root), oct(_mode(Path(dirpath) / name))))
        for name in files:
            if _mode(Path(dirpath) / name) != 0o600:
                found.append((os.path.relpath(Path(dirpath) / name, root), oct(_mode(Path(dirpath) / name))))
    return found


def test_a_new_local_repository_and_its_catalog_are_private(cli: Cli, tmp_path: Path) -> None:
    repo, cache = tmp_path / "repo", tmp_path / "cli-cache"
    assert cli("init", repo=repo).returncode == 0
    assert any((repo / "keys").iterdir())  # the key slot is among the files checked
    assert _loose_modes(repo) == []
    result = cli("snapshot", str(_mini_data_dir(tmp_path / "d")), repo=repo)
    assert result.returncode == 0, result.stderr
    assert any((repo / "data").rglob("*")) and any((repo / "snapshots").iterdir())
    assert _loose_modes(repo) == []
    assert _loose_modes(cache) == []
    assert (cache / "encrypted-locations").is_file()
    (catalog_db,) = cache.glob("*/catalog.db")
    # -wal and -shm exist while the catalog is open: SQLite gives them the database's mode.
    catalog = Catalog(catalog_db)
    catalog.set_meta("probe", "x")
    assert _mode(catalog_db.with_name("catalog.db-wal")) == 0o600
    assert _mode(catalog_db.with_name("catalog.db-shm")) == 0o600
    catalog.close()


def test_loose_repository_and_catalog_are_tightened_on_open(cli: Cli, tmp_path: Path) -> None:
    repo, cache = tmp_path / "repo", tmp_path / "cli-cache"
    assert cli("init", repo=repo).returncode == 0
    assert cli("snapshot", str(_mini_data_dir(tmp_path / "d")), repo=repo).returncode == 0
    (catalog_db,) = cache.glob("*/catalog.db")
    for root in (repo, cache):  # as a clubsnap before this change left them
        root.chmod(0o755)
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert cli("snapshots", repo=repo).returncode == 0
    for directory in [repo, repo / "keys", repo / "data", repo / "index", repo / "snapshots",
                      *(d for d in (repo / "data").iterdir())]:
        assert _mode(directory) == 0o700, directory
    for path in [repo / "config", *(repo / "keys").iterdir()]:
        assert _mode(path) == 0o600, path
    assert _mode(cache) == 0o700 and _mode(catalog_db.parent) == 0o700 and _mode(catalog_db) == 0o600


def test_a_directory_without_a_repository_keeps_its_modes(cli: Cli, tmp_path: Path) -> None:
    """A mistyped --repo (a home directory, say) is not chmod'ed: only a directory with a
    config is a repository."""
    elsewhere = tmp_path / "home"
    (elsewhere / "keys").mkdir(parents=True)
    elsewhere.chmod(0o755)
    (elsewhere / "notes").write_text("x")
    (elsewhere / "notes").chmod(0o644)
    assert cli("snapshots", repo=elsewhere).returncode == 10
    assert _mode(elsewhere) == 0o755 and _mode(elsewhere / "keys") == 0o755 and _mode(elsewhere / "notes") == 0o644


def test_a_shared_sticky_cache_dir_is_left_alone(tmp_path: Path) -> None:
    """``--cache-dir /tmp`` must not make /tmp private; the catalog dir inside still is."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    catalog = Catalog(shared / "repo-id" / "catalog.db")
    catalog.close()
    assert _mode(shared) == 0o1777
    assert _mode(shared / "repo-id") == 0o700 and _mode(shared / "repo-id" / "catalog.db") == 0o600
