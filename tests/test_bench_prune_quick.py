"""`make bench-prune` on the tiny data set with a few snapshots, and a small synthetic
repository: the benchmark runs end to end, its checks hold and its report is complete."""

from __future__ import annotations

from pathlib import Path

from benchmarks import prune


def test_prune_benchmark_runs_and_reports(tmp_path: Path) -> None:
    result = prune.measure("tiny", 45, 1, tmp_path / "work")
    assert result["build"]["simulated_days"] == 2 and result["removed"] > 0
    assert result["kept"] == result["planned_kept"] == result["verified_snapshots"]
    assert result["after"]["packs"] < result["before"]["packs"]
    assert abs(result["prediction_error"]) <= 0.05, result
    result["scale"] = prune.measure_scale(9600, tmp_path / "scale")
    assert result["scale"]["used_blobs"] >= 6000 and result["scale"]["prune"]["packs_deleted"] > 0
    text = prune.report(result)
    for step in ("forget --dry-run", "prune --dry-run", "check --read-data", "Millions of chunks"):
        assert step in text
