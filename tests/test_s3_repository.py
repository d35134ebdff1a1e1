"""S3 repositories end to end: the real ``clubsnap`` command against a real HTTP endpoint
(moto's server), through a proxy that injects network and service faults, with the
endpoint down, killed in the middle of an upload, and pointed at a missing bucket."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import pytest

from benchmarks import s3support
from benchmarks.clubgen import generate, one_day
from benchmarks.clubstate import club_state
from benchmarks.s3support import FaultProxy, MotoServer, free_port

from .conftest import ROOT, s3_client

Cli = Callable[..., subprocess.CompletedProcess[str]]
REQUEST_KEYS = ("put", "get", "head", "list", "delete", "retries", "bytes_read", "bytes_written")


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(_ok(result).stdout)


def _one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The CLI's contract for an engine error: its exit code and one ``clubsnap:`` line."""
    assert result.returncode == exit_code, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("clubsnap: "), lines[0]
    return lines[0]


def _bucket(url: str) -> str:
    return url[len("s3://"):].split("/", 1)[0]


def _listing(bucket: str) -> dict[str, tuple[int, str]]:
    """Every object in the bucket, as the service lists it: key -> (size, ETag)."""
    client = s3_client()
    out: dict[str, tuple[int, str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = (item["Size"], item["ETag"])
    return out


def _under(listing: dict[str, tuple[int, str]], prefix: str) -> dict[str, tuple[int, str]]:
    return {k: v for k, v in listing.items() if k.startswith(prefix)}


def _add_bulk(root: Path, seed: int, count: int, size: int) -> None:
    """Incompressible tarballs of extra package versions: packs above the multipart part
    size, and a snapshot that lasts long enough to be killed in the middle."""
    rng = random.Random(seed)
    for number in range(count):
        artifacts = root / "blobs" / f"bulk_{number:02d}" / "1.0.0" / "artifacts"
        artifacts.mkdir(parents=True)
        (artifacts / "package.tar.gz").write_bytes(rng.randbytes(size))


def _requests(result: dict[str, Any]) -> dict[str, int]:
    counts = result["requests"]
    assert set(REQUEST_KEYS) <= set(counts), counts
    return counts


# ---- 1. the whole cycle --------------------------------------------------------------------

def test_full_cycle_on_s3_through_the_cli(cli: Cli, s3_url: str, tmp_path: Path) -> None:
    repo = {"CLUBSNAP_REPO": s3_url}
    data = tmp_path / "data"
    generate(data, "tiny", seed=31)
    created = _json(cli("init", "--json", env=repo))
    assert created["repository"].startswith(s3_url)

    first = _json(cli("snapshot", str(data), "--json", env=repo))
    first_state = club_state(data, live=True)
    assert first["stats"]["files_new"] == first["stats"]["files"] > 0
    assert _requests(first)["bytes_written"] > 4_000_000  # the data really went up

    time.sleep(1.2)  # the unchanged snapshot is more than a second later than the first
    unchanged = _json(cli("snapshot", str(data), "--json", env=repo))
    stats, counts = unchanged["stats"], _requests(unchanged)
    assert stats["files_unmodified"] == stats["files"] and stats["bytes_read"] == 0
    # An unchanged data dir costs a handful of requests, not a listing or a read of the repository.
    assert counts["put"] <= 4, counts
    assert counts["list"] <= 4, counts  # keys/, index/, damage/ (recorded damage is stored again), snapshots/
    assert counts["get"] <= 8, counts
    assert counts["head"] <= 2, counts
    assert counts["delete"] == 1, counts  # the lock, released
    assert counts["retries"] == 0, counts
    assert counts["bytes_read"] < 200_000 and counts["bytes_written"] < 50_000, counts

    one_day(data, seed=31, day=1)
    third = _json(cli("snapshot", str(data), "--json", env=repo))
    assert third["stats"]["files_changed"] + third["stats"]["files_new"] > 0
    latest_state = club_state(data, live=True)
    assert latest_state != first_state

    listed = _json(cli("snapshots", "--json", env=repo))
    assert [s["id"] for s in listed] == [first["id"], unchanged["id"], third["id"]]
    assert [s["parent"] for s in listed] == [None, first["id"], unchanged["id"]]

    restored = _json(cli("restore", "latest", "--target", str(tmp_path / "latest"), "--json", env=repo))
    assert restored["snapshot"] == third["id"] and restored["db_checks"] == {"db/club.db": "ok"}
    assert club_state(tmp_path / "latest", live=False) == latest_state

    as_of = (datetime.fromisoformat(first["time"]) + timedelta(seconds=0.6)).astimezone().isoformat()
    old = _json(cli("restore", "--at", as_of, "--target", str(tmp_path / "first"), "--json", env=repo))
    assert old["snapshot"] == first["id"]
    assert club_state(tmp_path / "first", live=False) == first_state

    checked = _json(cli("check", "--read-data", "--json", env=repo))
    assert checked["ok"] and checked["errors"] == [] and checked["snapshots"] == 3
    assert checked["packs_read"] == checked["packs"] > 0
    assert "consistent" in _ok(cli("verify", "latest", env=repo)).stdout
    assert _json(cli("stats", "--json", env=repo))["snapshots"] == 3

    # Everything lives under the URL's prefix, and nothing else is in the bucket.
    keys = _listing(_bucket(s3_url))
    assert keys and all(k.startswith("repo/") for k in keys), sorted(keys)[:5]
    assert len(_under(keys, "repo/snapshots/")) == 3


# ---- 2. faults on the wire -----------------------------------------------------------------

def test_every_command_survives_injected_faults(cli: Cli, s3_url: str, moto_server: MotoServer,
                                                tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, "tiny", seed=32)
    _add_bulk(data, seed=32, count=3, size=5 << 20)  # a pack above the part size: multipart
    proxy = FaultProxy(moto_server.port, rate=0.10, seed=5, stall_s=2.5)
    faulty = {"CLUBSNAP_REPO": s3_url, "CLUBSNAP_S3_ENDPOINT": proxy.endpoint, "CLUBSNAP_S3_TIMEOUT": "1"}
    try:
        results = [_json(cli("init", "--json", env=faulty)),
                   _json(cli("snapshot", str(data), "--json", env=faulty))]
        one_day(data, seed=32, day=1)
        results.append(_json(cli("snapshot", str(data), "--json", env=faulty)))
        state = club_state(data, live=True)
        restored = _json(cli("restore", "latest", "--target", str(tmp_path / "t"), "--json", env=faulty))
        results.append(restored)
        assert restored["snapshot"] == results[2]["id"] and restored["db_checks"] == {"db/club.db": "ok"}
        assert club_state(tmp_path / "t", live=False) == state
        checked = _json(cli("check", "--read-data", "--json", env=faulty))
        results.append(checked)
        assert checked["ok"] and checked["snapshots"] == 2 and checked["packs_read"] == checked["packs"]
    finally:
        proxy.stop()

    # The proxy's fates are a seeded sequence (which request meets which fate depends on
    # thread timing); these commands make more than 50 requests, and seed 5's first 50
    # fates hold 7 faults of all 5 kinds.
    injected = sum(proxy.injected.values())
    assert injected >= 5 and len(proxy.injected) >= 4, proxy.injected
    # Every fault cost one failed attempt, counted as a retry; a cut_body fault on a
    # response without a body (a PUT's) is no fault at all.
    retries = sum(_requests(r)["retries"] for r in results)
    assert injected - proxy.injected["cut_body"] <= retries <= injected, (retries, proxy.injected)

    # Read back directly, with a cold cache: what the faulty runs stored is intact.
    direct = _json(cli("check", "--read-data", "--json", "--cache-dir", str(tmp_path / "cold"),
                       env={"CLUBSNAP_REPO": s3_url}))
    assert direct["ok"] and direct["snapshots"] == 2 and _requests(direct)["retries"] == 0


# ---- 3. failures that must fail fast and change nothing ------------------------------------

def test_unreachable_endpoint_fails_with_one_line(cli: Cli, s3_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, "tiny", seed=33)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"CLUBSNAP_REPO": s3_url, "CLUBSNAP_S3_ENDPOINT": down}
    for args in (("snapshots",), ("snapshot", str(data)), ("init",),
                 ("restore", "latest", "--target", str(tmp_path / "t"))):
        # How fast it gives up (under 20 s) is a benchmark's figure; `timeout` only stops a hang.
        result = cli(*args, env=env, timeout=300)
        line = _one_line_error(result, 13)
        assert "cannot reach" in line and down in line, line
    assert not (tmp_path / "t").exists()


class _FailAfter(FaultProxy):
    """Forward the first ``passes`` requests, answer every later one with 503 SlowDown."""

    def __init__(self, upstream_port: int, passes: int) -> None:
        super().__init__(upstream_port, rate=0.0, faults=("slowdown",))
        self.passes = passes

    def _fate(self) -> str | None:
        with self._lock:
            if self.forwarded < self.passes:
                self.forwarded += 1
                return None
            self.injected["slowdown"] += 1
            return "slowdown"


def test_failed_snapshot_leaves_the_repository_as_it_was(cli: Cli, s3_url: str, moto_server: MotoServer,
                                                         tmp_path: Path) -> None:
    repo = {"CLUBSNAP_REPO": s3_url}
    bucket = _bucket(s3_url)
    data = tmp_path / "data"
    generate(data, "tiny", seed=34)
    _ok(cli("init", env=repo))
    first = _json(cli("snapshot", str(data), "--json", env=repo))
    one_day(data, seed=34, day=1)

    # Every request throttled: the snapshot fails, with one line, and writes nothing.
    before = _listing(bucket)
    proxy = FaultProxy(moto_server.port, rate=1.0, faults=("slowdown",))
    try:
        result = cli("snapshot", str(data), env={**repo, "CLUBSNAP_S3_ENDPOINT": proxy.endpoint,
                                                 "CLUBSNAP_S3_ATTEMPTS": "3"}, timeout=60)
    finally:
        proxy.stop()
    line = _one_line_error(result, 13)
    assert "SlowDown" in line and "after 3 attempts" in line, line
    assert proxy.forwarded == 0 and proxy.injected["slowdown"] == 3
    assert _listing(bucket) == before

    # Throttled from the Nth request on, N = 1, 2, ...: the runs fail at every stage (reading
    # the index, uploading packs, writing the index, writing the snapshot record) until one
    # gets through. Whatever the failed runs uploaded, no snapshot record appears, nothing
    # is replaced or deleted, and the repository stays valid.
    failures = []
    for passes in range(1, 30):
        proxy = _FailAfter(moto_server.port, passes)
        try:
            result = cli("snapshot", str(data), "--json", env={**repo, "CLUBSNAP_S3_ENDPOINT": proxy.endpoint,
                                                               "CLUBSNAP_S3_ATTEMPTS": "2"}, timeout=60)
        finally:
            proxy.stop()
        if result.returncode == 0:
            break
        line = _one_line_error(result, 13)
        assert "SlowDown" in line, line
        failures.append(line)
        now = _listing(bucket)
        assert _under(now, "repo/snapshots/") == _under(before, "repo/snapshots/"), line
        assert all(now[k] == v for k, v in before.items()), line  # nothing replaced or deleted
    else:
        raise AssertionError("no snapshot got through the throttling proxy")
    assert any("repo/data/" in line for line in failures), failures
    assert any("repo/snapshots/" in line for line in failures), failures  # only the record failed
    second = _json(result)
    assert [s["id"] for s in _json(cli("snapshots", "--json", env=repo))] == [first["id"], second["id"]]
    checked = _json(cli("check", "--read-data", "--json", env=repo))
    assert checked["ok"] and checked["errors"] == [] and checked["snapshots"] == 2, checked

    state = club_state(data, live=True)
    _ok(cli("restore", "latest", "--target", str(tmp_path / "t"), env=repo))
    assert club_state(tmp_path / "t", live=False) == state


class _LostAnswers(FaultProxy):
    """Apply the server side of chosen requests and drop their answers (``reset_after``),
    each once: ``targets`` are (method, path fragment) pairs."""

    _current = threading.local()  # the request the proxy thread is deciding about

    def __init__(self, upstream_port: int, targets: list[tuple[str, str]]) -> None:
        super().__init__(upstream_port, rate=0.0, faults=("reset_after",))
        self.targets = list(targets)
        self.hit: list[str] = []

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch) -> None:
        read = s3support._read_request

        def recording(*args: Any) -> Any:
            cls._current.request = read(*args)
            return cls._current.request

        monkeypatch.setattr(s3support, "_read_request", recording)

    def _fate(self) -> str | None:
        method, path = self._current.request[:2]
        with self._lock:
            for target in self.targets:
                if method == target[0] and target[1] in path:
                    self.targets.remove(target)
                    self.hit.append(f"{method} {path}")
                    self.injected["reset_after"] += 1
                    return "reset_after"
            self.forwarded += 1
            return None


def test_lost_answers_to_committing_requests_are_recognised(cli: Cli, s3_url: str, moto_server: MotoServer,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server applied the request, the client never heard: the exclusive config PUT
    (its retry meets If-None-Match), a multipart Complete (retried on an upload already
    completed) and the snapshot record's PUT must count as done, not fail the command."""
    data = tmp_path / "data"
    generate(data, "tiny", seed=36)
    _add_bulk(data, seed=36, count=1, size=12 << 20)  # one pack above the part size
    _LostAnswers.install(monkeypatch)
    proxy = _LostAnswers(moto_server.port, [("PUT", "/repo/config"), ("POST", "?uploadId="),
                                            ("PUT", "/repo/snapshots/")])
    env = {"CLUBSNAP_REPO": s3_url, "CLUBSNAP_S3_ENDPOINT": proxy.endpoint}
    try:
        _ok(cli("init", env=env))
        snap = _json(cli("snapshot", str(data), "--json", env=env))
    finally:
        proxy.stop()
    assert proxy.targets == [], f"not every lost answer was staged: {proxy.hit}"
    assert _requests(snap)["retries"] == 2, snap["requests"]  # the Complete and the record

    repo = {"CLUBSNAP_REPO": s3_url}
    assert [s["id"] for s in _json(cli("snapshots", "--json", env=repo))] == [snap["id"]]
    checked = _json(cli("check", "--read-data", "--json", env=repo))
    assert checked["ok"] and checked["errors"] == [] and checked["packs_read"] == checked["packs"], checked
    state = club_state(data, live=True)
    _ok(cli("restore", "latest", "--target", str(tmp_path / "t"), env=repo))
    assert club_state(tmp_path / "t", live=False) == state


# ---- 4. killed in the middle of an upload --------------------------------------------------

def _spawn_snapshot(url: str, data: Path, cache: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CLUBSNAP_REPO": url, "CLUBSNAP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "engine", "snapshot", str(data)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert process.poll() is None, "the snapshot finished before the moment it was to be killed at"
        assert time.monotonic() < deadline, "the moment to kill at never came"
        time.sleep(0.02)


def test_sigkill_mid_upload_leaves_a_valid_repository(cli: Cli, s3_url: str, tmp_path: Path) -> None:
    bucket = _bucket(s3_url)
    data = tmp_path / "data"
    generate(data, "tiny", seed=35)
    _add_bulk(data, seed=35, count=10, size=4 << 20)  # ~47 MB: packs of 16 MB, each a multipart upload
    client = s3_client()

    def listed(prefix: str) -> dict[str, tuple[int, str]]:
        return _under(_listing(bucket), prefix)

    def uploading(prefix: str) -> bool:
        return bool(client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads"))

    # Three moments, each in a repository of its own: half a second in (starting up,
    # reading the data dir), while a pack's multipart upload is in flight, and once the
    # first pack is listed.
    moments: list[tuple[str, Callable[[str], bool]]] = [
        ("early", lambda prefix: time.sleep(0.5) or True),
        ("multipart upload in flight", uploading),
        ("first pack listed", lambda prefix: bool(listed(f"{prefix}data/")))]
    for number, (moment, reached) in enumerate(moments):
        url = f"{s3_url}-{number}"
        prefix = url[len(f"s3://{bucket}/"):] + "/"
        repo = {"CLUBSNAP_REPO": url}
        _ok(cli("init", env=repo))
        process = _spawn_snapshot(url, data, tmp_path / f"cache-{number}")
        try:
            _wait_for(lambda: reached(prefix), process)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.returncode == -signal.SIGKILL, moment
        assert listed(f"{prefix}snapshots/") == {}, f"a run killed {moment} left a snapshot record"
        assert _json(cli("snapshots", "--json", env=repo)) == [], moment
        checked = _json(cli("check", "--read-data", "--json", env=repo))
        assert checked["ok"] and checked["errors"] == [], (moment, checked)

    # After the last kill (a pack uploaded, the snapshot not recorded), the next run
    # completes, with the killed run's cache, and restores the data as it is.
    done = _json(cli("snapshot", str(data), "--json", "--cache-dir", str(tmp_path / "cache-2"), env=repo))
    state = club_state(data, live=True)
    assert len(listed(f"{prefix}snapshots/")) == 1
    restored = _json(cli("restore", "latest", "--target", str(tmp_path / "t"), "--json", env=repo))
    assert restored["snapshot"] == done["id"]
    assert club_state(tmp_path / "t", live=False) == state
    checked = _json(cli("check", "--read-data", "--json", env=repo))
    assert checked["ok"] and checked["snapshots"] == 1, checked


# ---- 5. the wrong bucket ------------------------------------------------------------------

def test_missing_bucket_and_missing_repository_are_named(cli: Cli, s3_url: str, tmp_path: Path) -> None:
    missing = f"clubsnap-absent-{os.getpid()}-{free_port()}"
    # No bucket is no repository (exit 10), not an outage worth retrying (13).
    for args in (("snapshots",), ("check",)):
        line = _one_line_error(cli(*args, env={"CLUBSNAP_REPO": f"s3://{missing}/repo"}, timeout=60), 10)
        assert f"no S3 bucket {missing} at http://127.0.0.1:" in line and "create it first" in line, line

    # A bucket that exists but holds no repository under the prefix.
    line = _one_line_error(cli("snapshots", env={"CLUBSNAP_REPO": s3_url}, timeout=60), 10)
    assert "no clubsnap repository" in line and s3_url in line, line

    # `init` creates a missing bucket, as restic does.
    created = f"s3://{missing}-new/repo"
    _ok(cli("init", env={"CLUBSNAP_REPO": created}))
    assert _json(cli("snapshots", "--json", env={"CLUBSNAP_REPO": created})) == []
