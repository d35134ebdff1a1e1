"""The command line end to end, through real subprocesses, as an operator uses it."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from benchmarks.clubgen import generate, one_day
from benchmarks.clubstate import club_state

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_snapshot_day_snapshot_restore_by_at(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=21)
    _ok(cli("init", repo=repo))
    time.sleep(0.1)
    first_state = club_state(data, live=True)
    _ok(cli("snapshot", str(data), "--tag", "nightly", repo=repo))
    time.sleep(1.2)
    one_day(data, seed=21, day=1)
    _ok(cli("snapshot", str(data), repo=repo))

    listed = json.loads(_ok(cli("--json", "snapshots", repo=repo)).stdout)
    assert [s["tags"] for s in listed] == [["nightly"], []]
    assert json.loads(_ok(cli("snapshots", "--json", repo=repo)).stdout) == listed
    first_time = datetime.fromisoformat(listed[0]["time"])
    as_of = (first_time + timedelta(seconds=0.6)).astimezone().isoformat()

    plan = json.loads(_ok(cli("restore", "--at", as_of, "--target", str(tmp_path / "t"), "--dry-run",
                              "--json", repo=repo)).stdout)
    assert plan["snapshot"] == listed[0]["id"] and plan["bytes_to_fetch"] > 0
    assert not (tmp_path / "t").exists()  # a dry run writes nothing
    restored = _ok(cli("restore", "--at", as_of, "--target", str(tmp_path / "t"), repo=repo)).stdout
    assert "integrity_check db/club.db: ok" in restored
    assert club_state(tmp_path / "t", live=False) == first_state

    changes = _ok(cli("diff", listed[0]["id"][:8], listed[1]["id"][:8], repo=repo)).stdout
    assert "M  db/club.db" in changes and "blobs/" in changes
    stats = json.loads(_ok(cli("stats", "--json", repo=repo)).stdout)
    assert stats["snapshots"] == 2 and stats["dedup_ratio"] > 1.5
    _ok(cli("check", "--read-data-subset", "50%", repo=repo))


def test_cache_rebuild_from_packs_recovers_a_lost_index(cli: Cli, tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=22)
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))
    for index in (repo / "index").iterdir():
        index.unlink()
    broken = cli("check", repo=repo)
    assert broken.returncode == 18
    _ok(cli("cache", "--rebuild", "--from-packs", repo=repo))
    _ok(cli("check", "--read-data", repo=repo))
    _ok(cli("restore", "latest", "--target", str(tmp_path / "t"), repo=repo))
    assert club_state(tmp_path / "t", live=False) == club_state(data, live=True)


def test_odd_file_names_and_symlinks_round_trip(cli: Cli, tmp_path: Path) -> None:
    import os

    data, repo = tmp_path / "data", tmp_path / "repo"
    (data / "db").mkdir(parents=True)
    odd = os.path.join(os.fsencode(data / "blobs"), b"caf\xe9 \xff.bin")
    os.makedirs(os.path.dirname(odd))
    with open(odd, "wb") as handle:
        handle.write(b"bytes of a file whose name is not UTF-8")
    os.symlink("caf\udce9 \udcff.bin", data / "blobs" / "link")
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))
    plan = _ok(cli("restore", "latest", "--target", str(tmp_path / "t"), "--dry-run", repo=repo))
    assert "caf\\udce9" in plan.stdout  # shown escaped, never a crash
    _ok(cli("restore", "latest", "--target", str(tmp_path / "t"), repo=repo))
    restored = os.path.join(os.fsencode(tmp_path / "t" / "blobs"), b"caf\xe9 \xff.bin")
    with open(restored, "rb") as handle:
        assert handle.read() == b"bytes of a file whose name is not UTF-8"
    assert os.readlink(tmp_path / "t" / "blobs" / "link") == "caf\udce9 \udcff.bin"


def test_latest_and_at_pick_by_host_path_and_tag(cli: Cli, tmp_path: Path) -> None:
    """One repository shared by two hosts: ``latest`` and ``--at`` answer per host, path
    and tag, so a rollback restores the pre-upgrade snapshot, not the newest of all."""
    data, other, repo = tmp_path / "data", tmp_path / "other", tmp_path / "repo"
    generate(data, "tiny", seed=23)
    generate(other, "tiny", seed=24)
    _ok(cli("init", repo=repo))
    before = _ok(cli("snapshot", str(data), "--host", "alpha", "--tag", "pre-upgrade", "--json", repo=repo))
    one_day(data, seed=23, day=1)
    _ok(cli("snapshot", str(data), "--host", "alpha", repo=repo))
    newest = _ok(cli("snapshot", str(other), "--host", "beta", "--json", repo=repo))

    def ids(*options: str) -> list[str]:
        return [s["id"] for s in json.loads(_ok(cli("snapshots", "--json", *options, repo=repo)).stdout)]

    assert len(ids()) == 3 and len(ids("--host", "alpha")) == 2
    assert ids("--path", str(other)) == [json.loads(newest.stdout)["id"]]
    assert ids("--host", "alpha", "--tag", "pre-upgrade") == [json.loads(before.stdout)["id"]]
    plan = json.loads(_ok(cli("restore", "latest", "--tag", "pre-upgrade", "--target", str(tmp_path / "t"),
                              "--dry-run", "--json", repo=repo)).stdout)
    assert plan["snapshot"] == json.loads(before.stdout)["id"]
    verified = _ok(cli("verify", "latest", "--host", "beta", repo=repo))
    assert json.loads(newest.stdout)["id"][:8] in verified.stdout
    missing = cli("restore", "latest", "--host", "gamma", "--target", str(tmp_path / "t"), repo=repo)
    assert missing.returncode == 14 and missing.stderr.strip() == "clubsnap: no snapshot of host gamma"


def test_diff_marks_every_kind_of_change(cli: Cli, tmp_path: Path) -> None:
    import os

    data, repo = tmp_path / "data", tmp_path / "repo"
    blobs = data / "blobs"
    (data / "db").mkdir(parents=True)
    for name in ("same", "removed", "content", "mode", "mtime"):
        (blobs / name).mkdir(parents=True)
        (blobs / name / "f").write_bytes(name.encode() * 100)
    (blobs / "removed" / "g").write_bytes(b"g")
    os.utime(blobs / "mtime" / "f", ns=(10**18, 10**18))
    _ok(cli("init", repo=repo))
    first = json.loads(_ok(cli("snapshot", str(data), "--json", repo=repo)).stdout)["id"]
    for path in (blobs / "removed" / "f", blobs / "removed" / "g"):
        path.unlink()
    (blobs / "removed").rmdir()
    (blobs / "content" / "f").write_bytes(b"other content, other size")
    (blobs / "mode" / "f").chmod(0o600)
    os.utime(blobs / "mtime" / "f", ns=(2 * 10**18, 2 * 10**18))
    (blobs / "added").mkdir()
    (blobs / "added" / "h").write_bytes(b"new")
    second = json.loads(_ok(cli("snapshot", str(data), "--json", repo=repo)).stdout)["id"]

    text = _ok(cli("diff", first[:8], second[:8], repo=repo)).stdout.splitlines()
    expected = ["+  blobs/added", "+  blobs/added/h", "M  blobs/content/f", "m  blobs/mode/f", "m  blobs/mtime/f",
                "-  blobs/removed", "-  blobs/removed/f", "-  blobs/removed/g"]
    changes = [line for line in text if not line.endswith("change(s)")]
    assert sorted(changes) == sorted(expected), text
    assert text[-1] == f"{len(expected)} change(s)"
    as_json = json.loads(_ok(cli("diff", first, second, "--json", repo=repo)).stdout)
    by_path = {c["path"]: (c["change"], c["size_delta"]) for c in as_json}
    assert by_path["blobs/content/f"] == ("M", len(b"other content, other size") - 700)
    assert by_path["blobs/added/h"] == ("+", 3) and by_path["blobs/removed/g"] == ("-", -1)
    assert not [c for c in as_json if "same" in c["path"]]
    reverse = _ok(cli("diff", second, first, repo=repo)).stdout
    assert "-  blobs/added/h" in reverse and "+  blobs/removed/f" in reverse


def test_stats_and_read_data_subset_match_the_repository(cli: Cli, tmp_path: Path) -> None:
    import random

    data, repo = tmp_path / "data", tmp_path / "repo"
    (data / "db").mkdir(parents=True)
    rng = random.Random(3)
    for n in range(5):  # incompressible and over the pack size in total: several packs
        (data / "blobs" / f"p{n}").mkdir(parents=True)
        (data / "blobs" / f"p{n}" / "t.tar.gz").write_bytes(rng.randbytes(5 << 20))
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(data), repo=repo))
    (data / "blobs" / "p0" / "u.tar.gz").write_bytes(rng.randbytes(1000))
    _ok(cli("snapshot", str(data), repo=repo))
    packs = [p for p in (repo / "data").rglob("*") if p.is_file()]
    assert len(packs) >= 3
    listed = json.loads(_ok(cli("snapshots", "--json", repo=repo)).stdout)
    stats = json.loads(_ok(cli("stats", "--json", repo=repo)).stdout)
    assert stats["snapshots"] == 2
    assert stats["packs"] == len(packs) and stats["pack_bytes"] == sum(p.stat().st_size for p in packs)
    assert stats["latest_snapshot_bytes"] == listed[-1]["size"] >= 25 << 20
    assert stats["all_snapshots_bytes"] == sum(s["size"] for s in listed)
    assert stats["dedup_ratio"] == round(stats["all_snapshots_bytes"] / stats["pack_bytes"], 2) > 1.5
    assert stats["chunk_bytes_raw"] >= 25 << 20 and stats["chunk_bytes_stored"] <= stats["pack_bytes"]
    assert stats["chunks"] > 25 << 20 >> 21  # CDC chunks of at most 2 MiB

    for percent, wanted in (("50%", round(len(packs) * 0.5)), ("1%", 1), ("100%", len(packs))):
        checked = json.loads(_ok(cli("check", "--read-data-subset", percent, "--json", repo=repo)).stdout)
        assert checked["ok"] and checked["packs"] == len(packs)
        assert checked["packs_read"] == max(1, wanted), (percent, checked)
    plain = json.loads(_ok(cli("check", "--json", repo=repo)).stdout)
    assert plain["packs_read"] == 0
