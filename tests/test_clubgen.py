"""Tests for the synthetic club data generator (benchmarks/clubgen).

They pin what the engine's benchmarks rely on: byte-for-byte determinism, club's schema
v3, DB rows that agree with the blobs, one_day's effects (including the -wal it leaves),
and a LiveWriter that keeps committing while another connection reads consistently.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.clubgen import LiveWriter, generate, one_day

KEY_TABLES = ("users", "api_tokens", "publishers", "packages", "package_versions", "package_version_dependencies",
              "package_scores", "dartdoc_status", "package_download_counts", "audit_log", "upload_sessions",
              "server_settings")
ALL_TABLES = {"club_schema", "users", "api_tokens", "user_invites", "publishers", "publisher_verifications",
              "publisher_members", "packages", "package_versions", "package_version_dependencies",
              "package_uploaders", "package_likes", "upload_sessions", "audit_log", "package_fts",
              "package_scores", "server_settings", "sdk_installs", "dartdoc_status", "package_download_counts"}
ASSET_URL = re.compile(r"/api/packages/([^/]+)/versions/([^/)]+)/(readme-assets|screenshots)/(\d+)\.(\w+)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(root, "tiny", seed=7)
    return root


def _connect(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "db" / "club.db")


def _blob_digests(root: Path) -> dict[str, str]:
    base = root / "blobs"
    return {p.relative_to(base).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


def _dump(root: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = _connect(root)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() for t in KEY_TABLES}
    finally:
        conn.close()


def test_generate_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, "tiny", seed=7)
    assert _blob_digests(again) == _blob_digests(tiny)
    assert _dump(again) == _dump(tiny)
    other = tmp_path / "other"
    generate(other, "tiny", seed=8)
    assert _blob_digests(other) != _blob_digests(tiny)


def test_generate_refuses_non_empty_root(tiny: Path) -> None:
    with pytest.raises(FileExistsError):
        generate(tiny, "tiny")


def test_tiny_is_small(tmp_path: Path) -> None:
    # Its speed (target: well under 2 s) is a benchmark's figure (docs/benchmarks-analysis.md).
    summary = generate(tmp_path / "t", "tiny", seed=1)
    sizes = summary["bytes"]
    assert 0.5e6 < sizes["db"] < 4e6
    assert 2e6 < sizes["blobs"] < 8e6
    assert summary["tables"]["package_versions"] == 40
    assert summary["tables"]["packages"] == 8


def test_schema_v3(tiny: Path) -> None:
    conn = _connect(tiny)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert ALL_TABLES <= names
        assert conn.execute("SELECT value FROM club_schema WHERE key = 'schema_version'").fetchone() == (3,)
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"idx_download_counts_version", "idx_pvd_dep_name", "idx_sdk_installs_version"} <= indexes
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE packages SET visibility = 'internal'")
    finally:
        conn.close()


def _check_blobs_match_rows(root: Path) -> int:
    """The §6.5 'missing' checks: tarballs, screenshots, README links, dartdoc pairs."""
    blobs = root / "blobs"
    conn = _connect(root)
    try:
        rows = conn.execute("SELECT package_name, version, archive_size_bytes, archive_sha256, screenshots, "
                            "readme_content FROM package_versions").fetchall()
        for package, version, size, sha, shots, readme in rows:
            data = (blobs / package / version / "artifacts" / "package.tar.gz").read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), (package, version)
            for index, entry in enumerate(json.loads(shots)):
                shot = (blobs / package / version / "screenshots" / str(index)).read_bytes()
                assert (len(shot), hashlib.sha256(shot).hexdigest()) == (entry["sizeBytes"], entry["sha256"])
            for match in ASSET_URL.finditer(readme):
                assert match.group(1, 2) == (package, version)
                name = f"{match[4]}.{match[5]}" if match[3] == "readme-assets" else match[4]
                assert (blobs / package / version / match[3] / name).is_file(), match[0]
        for (package,) in conn.execute("SELECT package_name FROM dartdoc_status WHERE status = 'completed'"):
            _check_dartdoc_pair(blobs / package / "dartdoc" / "latest", package)
        return len(rows)
    finally:
        conn.close()


def _check_dartdoc_pair(folder: Path, package: str) -> None:
    index = json.loads((folder / "index.json").read_bytes())
    blob = (folder / "blob").read_bytes()
    assert list(index) == ["version", "blobId", "index"] and index["version"] == 1
    assert index["blobId"].startswith(f"{package}:latest:")
    ranges: list[tuple[int, int]] = []
    stack = [index["index"]]
    while stack:
        for value in stack.pop().values():
            if isinstance(value, dict):
                stack.append(value)
            else:
                start, end = value.split(":")
                ranges.append((int(start), int(end)))
    ranges.sort()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(blob)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert gzip.decompress(blob)  # a valid multi-member gzip file


def test_every_row_has_matching_blobs(tiny: Path) -> None:
    assert _check_blobs_match_rows(tiny) == 40


def test_tarballs_are_real_packages(tiny: Path) -> None:
    conn = _connect(tiny)
    package, version = conn.execute("SELECT package_name, version FROM package_versions LIMIT 1").fetchone()
    conn.close()
    data = (tiny / "blobs" / package / version / "artifacts" / "package.tar.gz").read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\x00\x00\x00\x00"  # gzip, mtime pinned to 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        pubspec = tar.extractfile("pubspec.yaml").read().decode()  # type: ignore[union-attr]
    assert {"pubspec.yaml", "README.md", "CHANGELOG.md"} <= set(names)
    assert any(n.startswith("lib/") and n.endswith(".dart") for n in names)
    assert f"name: {package}" in pubspec


def test_static_assets_identical_across_packages(tiny: Path) -> None:
    members = []
    for folder in sorted((tiny / "blobs").glob("*/dartdoc/latest")):
        index = json.loads((folder / "index.json").read_bytes())["index"]
        start, end = map(int, index["static-assets"]["styles.css"].split(":"))
        members.append((folder / "blob").read_bytes()[start:end])
    assert len(members) >= 2 and len(set(members)) == 1


def test_layout_extras(tiny: Path) -> None:
    assert (tiny / "logs" / "scoring.log").stat().st_size > 0
    assert 1 <= len(list((tiny / "tmp" / "uploads").glob("*.tar.gz"))) <= 2
    assert len([p for p in (tiny / "blobs").rglob("*") if re.search(r"\.tmp\.\d+$", p.name)]) == 1
    assert list((tiny / "cache" / "sdks").iterdir())


DayOne = tuple[Path, dict[str, Any], int]


@pytest.fixture()
def day_one(tiny: Path, tmp_path: Path) -> DayOne:
    """A copy of the tiny instance after one day, its report, and the deleted version's
    download rows before the day (they must survive the version delete)."""
    root = tmp_path / "day"
    shutil.copytree(tiny, root)
    report = one_day(root, seed=3, day=1)
    deleted = report["deleted_version"]
    before = _one(tiny, "SELECT count(*) FROM package_download_counts WHERE package_name = ? AND version = ?",
                  deleted["package"], deleted["version"])[0]
    return root, report, before


def _one(root: Path, sql: str, *args: object) -> tuple[Any, ...]:
    conn = _connect(root)
    try:
        row: tuple[Any, ...] = conn.execute(sql, args).fetchone()
        return row
    finally:
        conn.close()


def test_one_day_leaves_a_wal(day_one: DayOne) -> None:
    root, report, _ = day_one
    wal = root / "db" / "club.db-wal"
    assert wal.stat().st_size > 1000 * 4096 and (root / "db" / "club.db-shm").exists()
    assert report["wal_frames"] >= 1000
    conn = _connect(root)  # recovery from the abandoned WAL
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


def test_one_day_publishes_and_deletes(day_one: DayOne) -> None:
    root, report, _ = day_one
    new = [p for p in report["published"] if p["new_package"]]
    assert len(new) == 1 and _one(root, "SELECT count(*) FROM packages WHERE name = ?", new[0]["package"]) == (1,)
    forced = report["forced_republish"]
    assert len(set(forced["sha256"])) == 3
    assert _one(root, "SELECT archive_sha256 FROM package_versions WHERE package_name = ? AND version = ?",
                forced["package"], forced["version"]) == (forced["sha256"][-1],)
    gone = report["deleted_package"]
    assert _one(root, "SELECT count(*) FROM packages WHERE name = ?", gone) == (0,)
    assert [p.name for p in (root / "blobs" / gone).iterdir()] == ["dartdoc"]  # club leaves the docs behind
    deleted = report["deleted_version"]
    assert not (root / "blobs" / deleted["package"] / deleted["version"]).exists()
    retracted = report["retracted"]
    assert _one(root, "SELECT is_retracted FROM package_versions WHERE package_name = ? AND version = ?",
                retracted["package"], retracted["version"]) == (1,)
    assert _one(root, "SELECT latest_version FROM packages WHERE name = ?", retracted["package"]) != (
        retracted["version"],)
    assert report["dartdoc_regenerated"] and report["rescored"] and report["visibility_flip"]


def test_one_day_traffic_and_leftovers(day_one: DayOne) -> None:
    root, report, version_downloads = day_one
    count, total = _one(root, "SELECT count(*), sum(count) FROM package_download_counts WHERE date_utc = ?",
                        report["date"])
    assert count == report["download_rows_new"] > 0 and total == report["downloads"]
    deleted = report["deleted_version"]
    assert _one(root, "SELECT count(*) FROM package_download_counts WHERE package_name = ? AND version = ?",
                deleted["package"], deleted["version"]) == (version_downloads,)
    assert report["logins"] >= 1 and report["token_touches"] >= 1
    assert (root / report["tmp_upload"]).is_file()
    assert (root / "blobs" / report["stray_tmp"]).is_file()


def test_one_day_blob_changes_are_reported(day_one: DayOne) -> None:
    root, report, _ = day_one
    changes = report["blobs"]
    assert changes["added"] and changes["replaced"] and changes["removed"]
    assert all((root / "blobs" / key).is_file() for key in changes["added"] + changes["replaced"])
    assert not any((root / "blobs" / key).exists() for key in changes["removed"])
    assert _check_blobs_match_rows(root) > 0


def test_one_day_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    reports, digests = [], []
    for name in ("a", "b"):
        root = tmp_path / name
        shutil.copytree(tiny, root)
        reports.append(one_day(root, seed=5, day=1))
        digests.append(_blob_digests(root))
    assert reports[0] == reports[1]
    assert digests[0] == digests[1]
    assert _dump(tmp_path / "a") == _dump(tmp_path / "b")


def test_live_writer_commits_while_reader_sees_consistent_snapshots(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "live"
    shutil.copytree(tiny, root)
    reader = _connect(root)
    last_total = -1
    with LiveWriter(root, interval=0.002, publish_every=20) as writer:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            reader.execute("BEGIN")
            total = reader.execute("SELECT sum(count) FROM package_download_counts").fetchone()[0]
            time.sleep(0.01)  # the writer commits meanwhile; the read transaction must not see it
            assert reader.execute("SELECT sum(count) FROM package_download_counts").fetchone()[0] == total
            reader.execute("COMMIT")
            assert total >= last_total
            last_total = total
    reader.close()
    assert writer.commits > 0 and writer.publishes >= 1 and writer.busy == 0
    assert _check_blobs_match_rows(root) > 40
