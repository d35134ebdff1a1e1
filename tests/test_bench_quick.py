"""The benchmark runner's --quick mode, once, so the runner cannot silently rot.

No timing thresholds: it checks that the run completes, that every restore was
verified and that the outputs exist, not how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("init", "snapshot_1", "snapshot_2", "snapshot_3", "snapshot_4",
         "restore_latest", "restore_at", "rollback", "restore_db")
RESTORES = ("restore_latest", "restore_at", "rollback", "restore_db")


def test_quick_run_verifies_every_restore(tmp_path: Path) -> None:
    work = tmp_path / "bench"
    docs_before = (ROOT / "docs" / "benchmarks.md").read_bytes()
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--work", str(work)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    result = json.loads((work / "results" / "tiny-seed1.json").read_text())
    steps = result["tools"]["clubsnap"]["steps"]
    assert list(result["tools"]) == ["clubsnap"]  # quick skips the peers
    assert set(STEPS) <= set(steps)
    for name in RESTORES:
        assert steps[name]["verified"] is True, name
    assert steps["snapshot_1"]["repo_bytes_added"] > 0
    assert steps["snapshot_2"]["repo_bytes_added"] < steps["snapshot_3"]["repo_bytes_added"]
    assert steps["rollback"]["detail"]["bytes_reused"] > 0  # the rollback reused local data
    assert result["floor"]["bytes"]["snapshot_3"] > 0

    frequent = json.loads((work / "results" / "frequent.json").read_text())
    assert len(frequent["snapshots"]) == frequent["count"] == 5
    assert frequent["restore_middle"]["verified"] is True
    assert frequent["listing"]["snapshots_listed"] == 6  # the uncounted full one, then 5

    for name in ("benchmarks.md", "benchmarks-frequent-repo.png", "benchmarks-frequent-time.png"):
        assert (work / name).stat().st_size > 0, name
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == docs_before  # quick leaves docs alone
