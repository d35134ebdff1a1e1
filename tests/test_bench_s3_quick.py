"""`make bench-s3` on the tiny data set with a few snapshots: the request-count benchmark
runs end to end, and the counts it reports hold what docs/backends.md promises."""

from __future__ import annotations

from pathlib import Path

from benchmarks import s3


def test_s3_benchmark_runs_and_its_counts_hold(tmp_path: Path) -> None:
    result = s3.measure("tiny", 6, tmp_path / "work")
    steps = result["steps"]
    unchanged = steps["unchanged snapshot"]["requests"]
    # the snapshot lock and the record; config and the key slot; keys/, index/, damage/
    # (damage a check recorded must be stored again), snapshots/; the lock's release
    assert (unchanged["put"], unchanged["get"], unchanged["list"], unchanged["delete"]) == (2, 2, 4, 1)
    assert steps["snapshots (6 snapshots)"]["requests"]["list"] == 2
    cold = steps["snapshots (6), empty local cache"]["requests"]
    assert cold["get"] <= 2 + 6 and cold["list"] == 3  # config, slot, records (no summary below 50 snapshots)
    assert sum(result["faults"]["injected"].values()) > 0
    bucket = result["bucket_source"]["steps"]["unchanged snapshot"]["blob_bucket"]
    assert bucket["get"] == 0 and bucket["list"] == 1
    report = s3.report(result)
    assert "| unchanged snapshot | 2 | 2 | 0 | 4 | 1 |" in report
