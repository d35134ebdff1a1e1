"""Promises of docs/cli.md that nothing else tests, through real processes: unlock,
snapshot --include-logs, restore --db-check, restore refusing an open database (exit 16)
and --force, exit 15, bytes_read_total, init --kdf-cost, and plain check catching a pack
of the wrong size."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import contextlib

import pytest

from .conftest import ROOT

Cli = Callable[..., subprocess.CompletedProcess[str]]
GUARD_S = 180  # turns a hang into a failure


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(_ok(result).stdout)


def _data_dir(root: Path, *, index_out_of_step: bool = False) -> Path:
    """A small club data dir; with ``index_out_of_step``, club.db has an index whose content
    does not match its table: integrity_check finds it, quick_check does not."""
    (root / "db").mkdir(parents=True)
    (root / "blobs" / "pkg" / "1.0.0").mkdir(parents=True)
    (root / "blobs" / "pkg" / "1.0.0" / "package.tar.gz").write_bytes(os.urandom(20_000))
    conn = sqlite3.connect(root / "db" / "club.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(x, y)")
    conn.execute("CREATE INDEX i ON t(x)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(n, -n) for n in range(300)])
    conn.commit()
    if index_out_of_step:
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql='CREATE INDEX i ON t(y)' WHERE name='i'")
        conn.commit()
    conn.close()
    return root


def _holder(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python process running ``code``; it prints "held" once it holds what it holds."""
    process = subprocess.Popen([sys.executable, "-c", code, *args], text=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None
    assert process.stdout.readline() == "held\n"
    return process


@contextlib.contextmanager
def _held(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    process = _holder(code, *args)
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=GUARD_S)


HOLD_LOCK = """
import os, sys
from pathlib import Path
from engine import Repository, open_backend
repo = Repository.open(open_backend(sys.argv[1]), Path(sys.argv[2]), lambda: os.environ["CLUBSNAP_PASSWORD"].encode())
with repo.lock("read"):
    print("held", flush=True)
    sys.stdin.read()
"""

HOLD_DATABASE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM t").fetchone()  # a read transaction, as club's readers hold
print("held", flush=True)
sys.stdin.read()
"""


def _locks(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "locks").rglob("*") if p.is_file())


def test_unlock_removes_the_dead_and_all_removes_every_lock(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    dead = _holder(HOLD_LOCK, str(repo), str(tmp_path / "cache-dead"))
    dead.send_signal(signal.SIGKILL)  # dies holding its lock: same host, no such pid
    dead.wait()
    assert len(_locks(repo)) == 1
    with _held(HOLD_LOCK, str(repo), str(tmp_path / "cache-live")):
        assert len(_locks(repo)) == 2
        assert _json(cli("unlock", "--json", repo=repo))["removed"] == 1
        live = _locks(repo)
        assert len(live) == 1, "the live process keeps its lock"
        assert _json(cli("unlock", "--json", repo=repo))["removed"] == 0
        assert _json(cli("unlock", "--all", "--json", repo=repo))["removed"] == 1
        assert _locks(repo) == []


def test_snapshot_include_logs(cli: Cli, tmp_path: Path) -> None:
    data, repo = _data_dir(tmp_path / "data"), tmp_path / "repo"
    (data / "logs").mkdir()
    (data / "logs" / "club.log").write_text("a log line\n")
    (data / "cache").mkdir()
    (data / "cache" / "c").write_text("never")
    _ok(cli("init", repo=repo))
    without = _json(cli("snapshot", str(data), "--json", repo=repo))["id"]
    with_logs = _json(cli("snapshot", str(data), "--include-logs", "--json", repo=repo))["id"]
    for snap, logs in ((without, False), (with_logs, True)):
        target = tmp_path / f"t-{snap[:8]}"
        _ok(cli("restore", snap, "--target", str(target), repo=repo))
        assert (target / "logs" / "club.log").exists() == logs
        assert not (target / "cache").exists()
        assert (target / "blobs" / "pkg" / "1.0.0" / "package.tar.gz").exists()
    assert (tmp_path / f"t-{with_logs[:8]}" / "logs" / "club.log").read_text() == "a log line\n"
    changes = _ok(cli("diff", without, with_logs, repo=repo)).stdout
    assert "+  logs/club.log" in changes


def test_restore_db_check_integrity_quick_and_none(cli: Cli, tmp_path: Path) -> None:
    data, repo = _data_dir(tmp_path / "data", index_out_of_step=True), tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))  # quick_check at capture passes: not suspect

    full = cli("restore", "latest", "--target", str(tmp_path / "a"), "--json", repo=repo)
    assert full.returncode == 18, full.stdout + full.stderr
    assert "missing from index" in json.loads(full.stdout)["db_checks"]["db/club.db"]
    default_text = cli("restore", "latest", "--target", str(tmp_path / "a2"), repo=repo)
    assert default_text.returncode == 18 and "integrity_check db/club.db: row" in default_text.stdout

    quick = _json(cli("restore", "latest", "--target", str(tmp_path / "b"), "--db-check", "quick", "--json",
                      repo=repo))
    assert quick["db_checks"] == {"db/club.db": "ok"}
    quick_text = _ok(cli("restore", "latest", "--target", str(tmp_path / "b2"), "--db-check", "quick", repo=repo))
    assert "quick_check db/club.db: ok" in quick_text.stdout

    none = _json(cli("restore", "latest", "--target", str(tmp_path / "c"), "--db-check", "none", "--json",
                     repo=repo))
    assert none["db_checks"] == {}
    none_text = _ok(cli("restore", "latest", "--target", str(tmp_path / "c2"), "--db-check", "none", repo=repo))
    assert "_check db/" not in none_text.stdout
    assert (tmp_path / "c" / "db" / "club.db").read_bytes() == (tmp_path / "b" / "db" / "club.db").read_bytes()


def test_restore_refuses_a_database_a_process_has_open_unless_forced(cli: Cli, tmp_path: Path) -> None:
    data, repo, target = _data_dir(tmp_path / "data"), tmp_path / "repo", tmp_path / "target"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))
    _ok(cli("restore", "latest", "--target", str(target), repo=repo))
    database = target / "db" / "club.db"
    conn = sqlite3.connect(database)  # the running club changed it since
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("INSERT INTO t VALUES (1000, -1000)")
    conn.commit()
    conn.close()
    with _held(HOLD_DATABASE, str(database)) as club:
        refused = cli("restore", "latest", "--target", str(target), repo=repo)
        assert refused.returncode == 16, refused.stdout + refused.stderr
        assert str(club.pid) in refused.stderr, refused.stderr
        check = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        assert check.execute("SELECT count(*) FROM t").fetchone() == (301,), "a refused restore changes nothing"
        check.close()
        forced = _json(cli("restore", "latest", "--target", str(target), "--force", "--json", repo=repo))
        assert forced["files_written"] >= 1 and forced["db_checks"] == {"db/club.db": "ok"}
    restored = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    assert restored.execute("SELECT count(*) FROM t").fetchone() == (300,)
    restored.close()


def test_exit_15_for_a_directory_that_is_not_a_club_data_dir(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("not club")
    result = cli("snapshot", str(tmp_path / "elsewhere"), repo=repo)
    assert result.returncode == 15 and "does not look like a club data directory" in result.stderr
    result = cli("snapshot", str(tmp_path / "missing"), repo=repo)
    assert result.returncode == 15 and "does not exist" in result.stderr
    assert _json(cli("snapshots", "--json", repo=repo)) == []


def test_restore_json_counts_every_byte_read(cli: Cli, tmp_path: Path) -> None:
    data, repo = _data_dir(tmp_path / "data"), tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))
    fresh = _json(cli("restore", "latest", "--target", str(tmp_path / "t"), "--json", repo=repo,
                      env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "cold")}))
    assert fresh["bytes_fetched"] >= 20_000
    assert fresh["bytes_read_total"] == fresh["requests"]["bytes_read"]
    index_bytes = sum(p.stat().st_size for p in (repo / "index").rglob("*") if p.is_file())
    assert fresh["bytes_read_total"] >= fresh["bytes_fetched"] + index_bytes  # a cold catalog reads the index
    again = _json(cli("restore", "latest", "--target", str(tmp_path / "t"), "--json", repo=repo,
                      env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "cold")}))
    assert again["bytes_fetched"] == 0 and again["bytes_read_total"] == again["requests"]["bytes_read"]
    assert again["bytes_read_total"] < fresh["bytes_read_total"] - 20_000


def test_init_kdf_cost_sets_scrypt_n(cli: Cli, tmp_path: Path) -> None:
    for cost in ("11", "12"):
        repo = tmp_path / f"repo-{cost}"
        _ok(cli("init", "--kdf-cost", cost, repo=repo))
        slots = _json(cli("key", "list", "--json", repo=repo))["slots"]
        assert [s["kdf"] for s in slots] == [f"scrypt N=2^{cost} r=8 p=1"]
    from_env = tmp_path / "repo-env"
    _ok(cli("init", repo=from_env, env={"CLUBSNAP_KDF_COST": "13"}))
    assert _json(cli("key", "list", "--json", repo=from_env))["slots"][0]["kdf"] == "scrypt N=2^13 r=8 p=1"


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_plain_check_catches_a_pack_of_the_wrong_size(cli: Cli, tmp_path: Path, change: str) -> None:
    data, repo = _data_dir(tmp_path / "data"), tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))
    _ok(cli("check", repo=repo))
    pack = max((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = pack.read_bytes()
    pack.write_bytes(raw + b"\0" * 10 if change == "append" else raw[:-10])
    result = cli("check", "--json", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "cold")})
    assert result.returncode == 18, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["packs_read"] == 0 and not report["ok"]
    assert any(pack.name in e for e in report["errors"]), report["errors"]
