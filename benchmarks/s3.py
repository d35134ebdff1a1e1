"""Request economy and throughput of an S3 repository, against a local moto server.

Request counts are the bill on S3 (PUT/LIST cost ~12x a GET), so this counts the HTTP
requests of each command the issue names on the small data set: snapshot 1, an unchanged
snapshot, a one-day snapshot, restore latest (warm and cold local cache), ``snapshots``
with 500 snapshots (warm and cold), and the same for a blob store that is a bucket. It
also runs a snapshot and a restore through a proxy failing 10% of requests, and measures
upload/download MB/s, which against moto on loopback are functional figures only: they
say nothing about AWS.

Usage: ``python -m benchmarks.s3 [--size small] [--snapshots 500]`` (``make bench-s3``);
writes docs/benchmarks-s3.md and benchmarks/results/s3.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.clubgen import generate, one_day
from benchmarks.clubstate import club_state
from benchmarks.report import publish
from benchmarks.s3support import FaultProxy, MotoServer

ROOT = Path(__file__).resolve().parent.parent
REQUESTS_LINE = re.compile(r"requests: (\d+) PUT, (\d+) GET, (\d+) HEAD, (\d+) LIST, (\d+) DELETE(?: \((\d+) retried\))?")
CLASSES = ("put", "get", "head", "list", "delete", "retries")


class Runner:
    """Runs ``clubsnap`` against one S3 repository and records each command's requests."""

    def __init__(self, work: Path, endpoint: str, repo: str) -> None:
        self.work, self.endpoint = work, endpoint
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench", "CLUBSNAP_S3_ENDPOINT": endpoint,
                    "CLUBSNAP_S3_REGION": "us-east-1", "CLUBSNAP_S3_ADDRESSING": "path",
                    "CLUBSNAP_REPO": repo, "CLUBSNAP_CACHE_DIR": str(work / "cache"),
                    # encrypted (the default); a cheap key derivation, which makes no request
                    "CLUBSNAP_PASSWORD": "bench", "CLUBSNAP_KDF_COST": "10"}

    def run(self, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "engine", "--requests", *args], capture_output=True,
                                text=True, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"clubsnap {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        match = REQUESTS_LINE.search(result.stderr)
        assert match, result.stderr
        counts = {name: int(value or 0) for name, value in zip(CLASSES, match.groups())}
        output = json.loads(result.stdout) if "--json" in args else None
        return {"wall_s": round(wall, 3), "requests": counts, "output": output}


def measure(size: str, snapshot_count: int, work: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "data"
    generate(data, size, seed=1)
    server = MotoServer()
    try:
        return _scenario(size, snapshot_count, work, data, server)
    finally:
        server.stop()


def _create_bucket(endpoint: str, bucket: str) -> Any:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.create_bucket(Bucket=bucket)
    return client


def _scenario(size: str, snapshot_count: int, work: Path, data: Path, server: MotoServer) -> dict[str, Any]:
    _create_bucket(server.endpoint, "bench-repo")
    bench = Runner(work, server.endpoint, "s3://bench-repo/clubsnap")
    steps: dict[str, dict[str, Any]] = {}
    bench.run("init")
    time.sleep(2.1)  # file times older than the racy window, as in a real data dir
    steps["snapshot 1"] = bench.run("snapshot", str(data), "--json")
    # Snapshot 1's read transaction made SQLite create club.db-wal/-shm (club has them
    # whenever it runs), so db/'s directory time changed once: one new tree.
    steps["snapshot 2 (only db/'s mtime changed)"] = bench.run("snapshot", str(data), "--json")
    steps["unchanged snapshot"] = bench.run("snapshot", str(data), "--json")
    one_day(data, seed=1, day=1)
    time.sleep(2.1)
    steps["one-day snapshot"] = bench.run("snapshot", str(data), "--json")
    reference = club_state(data, live=True)
    steps["restore latest"] = bench.run("restore", "latest", "--target", str(work / "restore-warm"),
                                        "--db-check", "none", "--json")
    shutil.rmtree(work / "cache")
    steps["restore latest, empty local cache"] = bench.run("restore", "latest", "--target", str(work / "restore-cold"),
                                                           "--db-check", "none", "--json")
    for target in ("restore-warm", "restore-cold"):
        if club_state(work / target, live=False) != reference:
            raise RuntimeError(f"{target} differs from the data dir")

    started = time.perf_counter()
    for _ in range(snapshot_count - 4):
        bench.run("snapshot", str(data))
    filling_s = time.perf_counter() - started
    steps[f"snapshots ({snapshot_count} snapshots)"] = bench.run("snapshots")
    shutil.rmtree(work / "cache")
    steps[f"snapshots ({snapshot_count}), empty local cache"] = bench.run("snapshots")
    steps[f"restore --at (among {snapshot_count})"] = bench.run(
        "restore", "--at", datetime.now(timezone.utc).isoformat(), "--target", str(work / "restore-at"),
        "--include", "db", "--db-check", "none")

    faults = _faulty_run(work, server, data)
    bucket = _bucket_source(work, server, data)
    throughput = _throughput(steps)
    return {"size": size, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data_bytes": sum(p.stat().st_size for p in data.rglob("*") if p.is_file()),
            "steps": {name: {k: v for k, v in step.items() if k != "output"} for name, step in steps.items()},
            "filling_s_per_snapshot": round(filling_s / max(1, snapshot_count - 4), 3),
            "faults": faults, "bucket_source": bucket, "throughput": throughput}


def _throughput(steps: dict[str, dict[str, Any]]) -> dict[str, float]:
    first = steps["snapshot 1"]
    cold = steps["restore latest, empty local cache"]
    up = first["output"]["requests"]["bytes_written"] / first["wall_s"] / 1e6
    down = cold["output"]["requests"]["bytes_read"] / cold["wall_s"] / 1e6
    return {"upload_mb_s": round(up, 1), "download_mb_s": round(down, 1)}


def _faulty_run(work: Path, server: MotoServer, data: Path) -> dict[str, Any]:
    """A full snapshot and a cold restore with 10% of requests failing (503, resets,
    cut bodies, stalls past a 1 s read timeout): both must succeed, the restore match."""
    _create_bucket(server.endpoint, "bench-faults")
    proxy = FaultProxy(server.port, rate=0.10, seed=7, stall_s=2.0)
    faulty = Runner(work / "faulty", proxy.endpoint, "s3://bench-faults/clubsnap")
    env = {"CLUBSNAP_S3_TIMEOUT": "1"}
    try:
        faulty.run("init", env=env)
        snapshot = faulty.run("snapshot", str(data), "--json", env=env)
        shutil.rmtree(work / "faulty" / "cache")
        restore = faulty.run("restore", "latest", "--target", str(work / "faulty-restore"), "--json", env=env)
    finally:
        proxy.stop()
    if club_state(work / "faulty-restore", live=False) != club_state(data, live=True):
        raise RuntimeError("the restore made through failing requests differs from the data dir")
    return {"rate": 0.10, "injected": dict(proxy.injected), "forwarded": proxy.forwarded,
            "snapshot": {k: v for k, v in snapshot.items() if k != "output"},
            "restore": {k: v for k, v in restore.items() if k != "output"}}


def _bucket_source(work: Path, server: MotoServer, data: Path) -> dict[str, Any]:
    """The blobs in a bucket (an S3 club): requests to that bucket per snapshot."""
    client = _create_bucket(server.endpoint, "bench-club-blobs")
    blobs = data / "blobs"
    for path in sorted(p for p in blobs.rglob("*") if p.is_file()):
        client.put_object(Bucket="bench-club-blobs", Key=path.relative_to(blobs).as_posix(), Body=path.read_bytes())
    objects = sum(1 for p in blobs.rglob("*") if p.is_file())
    _create_bucket(server.endpoint, "bench-repo-2")
    runner = Runner(work / "bucket", server.endpoint, "s3://bench-repo-2/clubsnap")
    runner.run("init")
    results = {}
    for name in ("snapshot 1", "unchanged snapshot"):
        step = runner.run("snapshot", str(data), "--blobs", "s3://bench-club-blobs", "--json")
        results[name] = {"wall_s": step["wall_s"], "repository": step["requests"],
                         "blob_bucket": step["output"]["stats"]["blobs_requests"]}
    _create_bucket(server.endpoint, "bench-club-restored")
    step = runner.run("restore", "latest", "--target", "s3://bench-club-restored", "--json")
    results["restore into an empty bucket"] = {"wall_s": step["wall_s"], "repository": step["requests"],
                                               "blob_bucket": step["output"]["target_requests"]}
    return {"objects": objects, "steps": results}


def report(result: dict[str, Any]) -> str:
    lines = [
        "# S3 request counts and throughput",
        "",
        f"Generated by `python -m benchmarks.s3` (`make bench-s3`) on {result['date']}: {result['size']} data set "
        f"({result['data_bytes'] / 1e6:,.0f} MB), repository on a local moto server (S3 API over HTTP on loopback). "
        "Counts are HTTP requests as the S3 backend sends them, retries included. "
        "**Throughput against moto is functional, not representative of AWS** (no network, an in-memory "
        "Python server).",
        "",
        "| command | PUT | GET | HEAD | LIST | DELETE | wall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, step in result["steps"].items():
        r = step["requests"]
        lines.append(f"| {name} | {r['put']} | {r['get']} | {r['head']} | {r['list']} | {r['delete']} | "
                     f"{step['wall_s']:.2f} s |")
    lines += ["", f"Filling the repository to the snapshot count took {result['filling_s_per_snapshot']:.2f} s per "
                  "unchanged snapshot (command start included).", "",
              "## Throughput (functional)", "",
              f"- upload (snapshot 1, pack bytes written / wall time): {result['throughput']['upload_mb_s']} MB/s",
              f"- download (restore with an empty cache, bytes read / wall time): "
              f"{result['throughput']['download_mb_s']} MB/s", ""]
    faults = result["faults"]
    injected = ", ".join(f"{k} {v}" for k, v in sorted(faults["injected"].items()))
    lines += ["## 10% of requests failing", "",
              f"Through a proxy failing {faults['rate']:.0%} of requests ({injected}; {faults['forwarded']} "
              "forwarded), with a 1 s read timeout:", "",
              "| command | PUT | GET | LIST | retried | wall | result |", "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("snapshot", "restore"):
        step = faults[name]
        r = step["requests"]
        lines.append(f"| {name} | {r['put']} | {r['get']} | {r['list']} | {r['retries']} | {step['wall_s']:.2f} s | "
                     f"{'ok, restore identical' if name == 'restore' else 'ok'} |")
    bucket = result["bucket_source"]
    lines += ["", f"## Blob store in a bucket ({bucket['objects']} objects)", "",
              "| command | repository PUT/GET/LIST | blob bucket PUT/GET/HEAD/LIST | wall |", "|---|---|---|---:|"]
    for name, step in bucket["steps"].items():
        repo, blobs = step["repository"], step["blob_bucket"]
        lines.append(f"| {name} | {repo['put']}/{repo['get']}/{repo['list']} | "
                     f"{blobs['put']}/{blobs['get']}/{blobs['head']}/{blobs['list']} | {step['wall_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.s3", description=__doc__)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "medium"))
    parser.add_argument("--snapshots", type=int, default=500)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work" / "s3")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-s3.md")
    parser.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "s3.json")
    args = parser.parse_args()
    result = measure(args.size, args.snapshots, args.work)
    publish(result, report(result), args.out, args.json_out)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
