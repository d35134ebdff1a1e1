"""A club blob store that lives in a bucket: `snapshot --blobs s3://…` and `restore
--target s3://…`, against the moto server through real HTTP, via the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from benchmarks.clubstate import club_state
from benchmarks.s3support import FaultProxy, MotoServer

from .conftest import ROOT, s3_client

Cli = Callable[..., subprocess.CompletedProcess[str]]
BIG = 24 << 20  # above the 8 MiB part size: a streamed read, a multipart upload


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _upload_tree(bucket: str, prefix: str, root: Path) -> None:
    client = s3_client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())


def _bucket_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def club_in_bucket(tmp_path: Path, s3_env: dict[str, str]) -> tuple[Path, str, str]:
    """A data dir whose blobs (with package.json sidecars) live in a bucket, as on an S3
    club instance; one large object on top. Returns (data dir, bucket, blob store URL)."""
    data = tmp_path / "data"
    generate(data, "tiny", seed=51, sidecars=True)
    assert list((data / "blobs").rglob("package.json")), "the generator made no sidecars"
    big = data / "blobs" / "bigpkg" / "1.0.0" / "artifacts" / "package.tar.gz"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(BIG))
    bucket = f"club-blobs-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    s3_client().create_bucket(Bucket=bucket)
    _upload_tree(bucket, "store", data / "blobs")
    shutil.rmtree(data / "blobs")  # the bucket is the only copy
    return data, bucket, f"s3://{bucket}/store"


def test_snapshot_from_a_bucket_is_incremental_and_restores(cli: Cli, tmp_path: Path,
                                                            club_in_bucket: tuple[Path, str, str]) -> None:
    data, bucket, store = club_in_bucket
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    first = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--verify", "--json", repo=repo)).stdout)
    objects = _bucket_objects(bucket, "store")
    assert first["stats"]["files_new"] == len(objects) + 1  # and club.db
    assert first["verified"]["consistent"] and not first["partial"]
    assert first["stats"]["blobs_requests"]["get"] >= len(objects)

    second = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--json", repo=repo)).stdout)
    bucket_requests = second["stats"]["blobs_requests"]
    assert bucket_requests["get"] == 0 and bucket_requests["list"] == 1  # nothing downloaded again
    assert second["stats"]["bytes_read"] <= (data / "db" / "club.db").stat().st_size

    # An object replaced (same size, new bytes): only it is read again.
    key = next(k for k in sorted(objects) if k.endswith("package.tar.gz") and not k.startswith("bigpkg"))
    changed = bytes(b ^ 0xFF for b in objects[key])
    s3_client().put_object(Bucket=bucket, Key=f"store/{key}", Body=changed)
    third = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--json", repo=repo)).stdout)
    assert third["stats"]["files_changed"] == 1
    assert third["stats"]["blobs_requests"]["get"] == 1

    target = tmp_path / "restored"
    _ok(cli("restore", first["id"], "--target", str(target), repo=repo))
    assert _local_files(target / "blobs") == objects
    assert club_state(target, live=False)["db"] == club_state(data, live=True)["db"]
    _ok(cli("restore", "latest", "--target", str(tmp_path / "latest"), "--include", "blobs", repo=repo))
    assert (tmp_path / "latest" / "blobs" / key).read_bytes() == changed
    _ok(cli("check", "--read-data", repo=repo))


def test_restore_into_a_bucket_round_trips_and_skips_what_is_there(
        cli: Cli, tmp_path: Path, club_in_bucket: tuple[Path, str, str]) -> None:
    data, bucket, store = club_in_bucket
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    snap = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--json", repo=repo)).stdout)
    original = _bucket_objects(bucket, "store")

    fresh = f"{bucket}-copy"
    s3_client().create_bucket(Bucket=fresh)
    out = json.loads(_ok(cli("restore", snap["id"], "--target", f"s3://{fresh}/again", "--json", repo=repo)).stdout)
    assert out["objects_written"] == len(original) and out["not_restored"] == ["db"]
    assert _bucket_objects(fresh, "again") == original

    # Back into the source bucket after a loss: only the lost and the damaged objects go up,
    # and --delete removes what the snapshot lacks.
    client = s3_client()
    lost = next(k for k in original if k.endswith("package.json"))
    client.delete_object(Bucket=bucket, Key=f"store/{lost}")
    client.put_object(Bucket=bucket, Key="store/stray/object", Body=b"not in the snapshot")
    plan = json.loads(_ok(cli("restore", snap["id"], "--target", store, "--delete", "--dry-run", "--json",
                              repo=repo)).stdout)
    assert plan["write"] == [lost] and plan["delete"] == ["stray/object"]
    done = json.loads(_ok(cli("restore", snap["id"], "--target", store, "--delete", "--json", repo=repo)).stdout)
    assert done["objects_written"] == 1 and done["deleted"] == 1
    assert _bucket_objects(bucket, "store") == original


def test_a_version_gone_from_the_bucket_is_carried_forward(cli: Cli, tmp_path: Path,
                                                          club_in_bucket: tuple[Path, str, str]) -> None:
    """The database still names a version whose objects are gone from the bucket (club
    deletes blobs before the row): the consistent-cut rule carries it from the parent."""
    data, bucket, store = club_in_bucket
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), "--blobs", store, repo=repo))
    objects = _bucket_objects(bucket, "store")
    version = next(k.rsplit("/", 2)[0] for k in sorted(objects)
                   if k.endswith("artifacts/package.tar.gz") and not k.startswith("bigpkg"))
    client = s3_client()
    for key in [k for k in objects if k.startswith(version + "/")]:
        client.delete_object(Bucket=bucket, Key=f"store/{key}")
    snap = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--verify", "--json", repo=repo)).stdout)
    assert f"blobs/{version}/artifacts/package.tar.gz" in snap["carried_forward"]
    assert snap["verified"]["consistent"]
    _ok(cli("verify", "latest", repo=repo))


def test_a_large_object_is_streamed_not_held_in_memory(tmp_path: Path, club_in_bucket: tuple[Path, str, str]) -> None:
    """A 192 MB tarball raises the snapshot's peak memory by well under its size: the
    object is streamed through the chunker (what stays is a pack buffer or two, ~20-40 MB
    measured whatever the object's size)."""
    data, bucket, store = club_in_bucket
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUBSNAP_CACHE_DIR": str(tmp_path / "cache")}
    huge_key, huge_size = "store/hugepkg/2.0.0/artifacts/package.tar.gz", 192 << 20

    def peak_rss_of_snapshot(repo: Path) -> int:
        script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                  "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        for args in (["init"], ["snapshot", str(data), "--blobs", store]):
            out = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "engine", "--repo", str(repo),
                                  *args], capture_output=True, text=True, env=env, check=True).stdout
        return int(out) * 1024

    without_huge = peak_rss_of_snapshot(tmp_path / "repo1")
    s3_client().put_object(Bucket=bucket, Key=huge_key, Body=os.urandom(huge_size))
    with_huge = peak_rss_of_snapshot(tmp_path / "repo2")
    assert with_huge - without_huge < huge_size // 2, (with_huge, without_huge)


def test_bucket_source_errors_are_one_line(cli: Cli, tmp_path: Path, club_in_bucket: tuple[Path, str, str]) -> None:
    data, bucket, _ = club_in_bucket
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    for url, code, words in ((f"s3://{bucket}-missing/x", 13, "does not exist"),
                             ("/not/a/bucket", 2, "bucket URL")):
        result = cli("snapshot", str(data), "--blobs", url, repo=repo)
        assert result.returncode == code, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_bucket_source_survives_failing_requests(cli: Cli, tmp_path: Path, moto_server: MotoServer,
                                                 club_in_bucket: tuple[Path, str, str]) -> None:
    """The blob bucket behind a proxy failing 15% of requests (bodies cut mid-object
    among them): the snapshot completes and restores every object byte for byte."""
    data, bucket, store = club_in_bucket
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    proxy = FaultProxy(moto_server.port, rate=0.15, seed=3, stall_s=2.0)
    try:
        env = {"CLUBSNAP_BLOBS_S3_ENDPOINT": proxy.endpoint, "CLUBSNAP_BLOBS_S3_TIMEOUT": "1"}
        snap = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--json", repo=repo, env=env)).stdout)
    finally:
        proxy.stop()
    assert sum(proxy.injected.values()) >= 5, proxy.injected
    assert snap["stats"]["blobs_requests"]["retries"] >= 1 and not snap["partial"]
    _ok(cli("restore", "latest", "--target", str(tmp_path / "out"), "--include", "blobs", repo=repo))
    assert _local_files(tmp_path / "out" / "blobs") == _bucket_objects(bucket, "store")


def test_a_bucket_that_holds_the_repository_is_refused(cli: Cli, tmp_path: Path, s3_url: str,
                                                       club_in_bucket: tuple[Path, str, str]) -> None:
    """Blobs in the repository's bucket around its prefix: a snapshot would back the
    repository up into itself, a restore with --delete would delete it."""
    data, _, store = club_in_bucket
    repo_bucket = s3_url.split("/")[2]
    _ok(cli("init", env={"CLUBSNAP_REPO": s3_url}))
    snap = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--json", env={"CLUBSNAP_REPO": s3_url})).stdout)
    for args in (("snapshot", str(data), "--blobs", f"s3://{repo_bucket}"),
                 ("restore", snap["id"], "--target", f"s3://{repo_bucket}/repo/inside", "--delete")):
        result = cli(*args, env={"CLUBSNAP_REPO": s3_url})
        assert result.returncode == 2 and "overlaps the repository" in result.stderr, result.stderr
    _ok(cli("check", env={"CLUBSNAP_REPO": s3_url}))


def test_delete_into_a_bucket_follows_the_includes(cli: Cli, tmp_path: Path,
                                                   club_in_bucket: tuple[Path, str, str]) -> None:
    data, bucket, store = club_in_bucket
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    snap = json.loads(_ok(cli("snapshot", str(data), "--blobs", store, "--json", repo=repo)).stdout)
    s3_client().put_object(Bucket=bucket, Key="store/stray/object", Body=b"x")

    def planned_deletions(*includes: str) -> list[str]:
        args = [arg for include in includes for arg in ("--include", include)]
        out = _ok(cli("restore", snap["id"], "--target", store, "--delete", "--dry-run", "--json", *args, repo=repo))
        return list(json.loads(out.stdout)["delete"])

    assert planned_deletions("blobs") == ["stray/object"]
    assert planned_deletions("./blobs/") == ["stray/object"]
    assert planned_deletions("blobs/bigpkg") == []
    assert planned_deletions("db", "blobs/bigpkg") == []


def test_a_key_that_is_also_a_prefix_is_reported_not_taken(cli: Cli, tmp_path: Path,
                                                           club_in_bucket: tuple[Path, str, str]) -> None:
    data, bucket, store = club_in_bucket
    client = s3_client()
    client.put_object(Bucket=bucket, Key="store/odd/name", Body=b"a file")
    client.put_object(Bucket=bucket, Key="store/odd/name/inside", Body=b"and a file below it")
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    result = cli("snapshot", str(data), "--blobs", store, repo=repo)
    assert result.returncode == 3 and "also a prefix of other keys" in result.stderr, result.stderr
    _ok(cli("restore", "latest", "--target", str(tmp_path / "out"), repo=repo))
    assert (tmp_path / "out" / "blobs" / "odd" / "name" / "inside").read_bytes() == b"and a file below it"


def test_unusable_s3_settings_are_one_line(cli: Cli, tmp_path: Path, s3_env: dict[str, str]) -> None:
    for env in ({"CLUBSNAP_S3_ENDPOINT": "127.0.0.1:5077"}, {"CLUBSNAP_S3_PROFILE": "no-such-profile"},
                {"CLUBSNAP_S3_CONNECTIONS": "many"}):
        result = cli("snapshots", env={"CLUBSNAP_REPO": "s3://some-bucket/repo", **env})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("clubsnap: "), result.stderr


def test_the_endpoint_can_come_from_boto3s_own_variable(cli: Cli, tmp_path: Path, s3_url: str,
                                                        moto_server: MotoServer) -> None:
    """AWS_ENDPOINT_URL (boto3's standard variable) alone, no clubsnap variable, no region."""
    env = {"CLUBSNAP_S3_ENDPOINT": "", "CLUBSNAP_S3_REGION": "", "AWS_ENDPOINT_URL": moto_server.endpoint,
           "CLUBSNAP_REPO": s3_url}
    _ok(cli("init", env=env))
    assert "0 snapshot(s)" in _ok(cli("snapshots", env=env)).stdout
