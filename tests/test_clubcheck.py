"""`clubsnap verify`: a restored club data dir is consistent, and damage is named."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from engine.clubcheck import check_club

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated club, snapshotted and restored through the real command."""
    import os
    import sys

    base = tmp_path_factory.mktemp("club")
    generate(base / "data", "tiny", seed=31)
    env = {**os.environ, "CLUBSNAP_REPO": str(base / "repo"), "CLUBSNAP_CACHE_DIR": str(base / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for args in (["init"], ["snapshot", str(base / "data")], ["restore", "latest", "--target", str(base / "restored")]):
        subprocess.run([sys.executable, "-m", "engine", *args], env=env, check=True, capture_output=True)
    return base / "restored"


def _copy(restored: Path, tmp_path: Path) -> Path:
    shutil.copytree(restored, tmp_path / "copy")
    return tmp_path / "copy"


def test_restored_club_is_consistent(restored: Path, cli: Cli) -> None:
    report = check_club(restored)
    assert report.ok, report.missing + report.database
    assert report.checked["versions"] > 10 and report.checked["dartdoc"] > 0
    result = cli("verify", "--data", str(restored), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["ok"]


def test_missing_and_altered_blobs_are_named(restored: Path, tmp_path: Path, cli: Cli) -> None:
    club = _copy(restored, tmp_path)
    tarballs = sorted(club.glob("blobs/*/*/artifacts/package.tar.gz"))
    tarballs[0].unlink()
    altered = bytearray(tarballs[1].read_bytes())
    altered[len(altered) // 2] ^= 0xFF  # same size, different bytes: only the hash can tell
    tarballs[1].write_bytes(bytes(altered))
    shots = sorted(club.glob("blobs/*/*/screenshots/0"))
    if shots:
        shots[0].unlink()
    report = check_club(club)
    keys = [m.split(":")[0] for m in report.missing]
    assert str(tarballs[0].relative_to(club / "blobs")) in keys
    assert str(tarballs[1].relative_to(club / "blobs")) in keys
    assert not shots or str(shots[0].relative_to(club / "blobs")) in keys
    result = cli("verify", "--data", str(club))
    assert result.returncode == 18 and "missing" in result.stdout


def test_dartdoc_index_out_of_range_and_orphans(restored: Path, tmp_path: Path) -> None:
    club = _copy(restored, tmp_path)
    blob = sorted(club.glob("blobs/*/dartdoc/latest/blob"))[0]
    blob.write_bytes(blob.read_bytes()[:-10])
    (club / "blobs" / "stray_pkg" / "9.9.9" / "artifacts").mkdir(parents=True)
    (club / "blobs" / "stray_pkg" / "9.9.9" / "artifacts" / "package.tar.gz").write_bytes(b"x")
    report = check_club(club)
    assert any("dartdoc" in m for m in report.missing)
    assert "stray_pkg/9.9.9/artifacts/package.tar.gz" in report.orphans


def test_database_problems_are_reported(restored: Path, tmp_path: Path) -> None:
    club = _copy(restored, tmp_path)
    conn = sqlite3.connect(club / "db" / "club.db")
    conn.execute("PRAGMA user_version=4")
    conn.commit()
    conn.close()
    assert any("differs from user_version" in d for d in check_club(club).database)
