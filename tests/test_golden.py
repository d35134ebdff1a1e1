"""A repository written by format version 1 (tests/golden/) must restore forever."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from benchmarks.clubstate import club_state
from engine import Repository, apply_restore, check, open_backend, plan_restore

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_golden_repository_restores_and_checks(tmp_path: Path) -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    store = tmp_path / "repo"
    shutil.copytree(GOLDEN / "repo", store)
    repo = Repository.open(open_backend(str(store)), tmp_path / "cache")
    report = check(repo, read_data=True)
    assert report.ok, report.errors
    snap = repo.snapshot_at(datetime.fromisoformat(expected["time"]))
    assert snap.id.hex() == expected["snapshot"]
    apply_restore(repo, plan_restore(repo, snap, tmp_path / "restored"))
    assert club_state(tmp_path / "restored", live=False) == expected["state"]
    repo.close()
