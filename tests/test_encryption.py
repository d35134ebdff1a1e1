"""Encryption at rest through the real command line: nothing readable in the repository,
every modified byte detected and named, passwords and key slots."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate

from .conftest import TEST_PASSWORD

Cli = Callable[..., subprocess.CompletedProcess[str]]
MARKER = b"clubsnap-marker-7f3a9c2e51d04b8e"


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clubsnap: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def marked_data(tmp_path: Path) -> Path:
    """A club data dir with a marker in a database row and in a tarball."""
    data = tmp_path / "data"
    generate(data, "tiny", seed=61)
    with sqlite3.connect(data / "db" / "club.db") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS marker_test (secret TEXT)")
        conn.execute("INSERT INTO marker_test VALUES (?)", [MARKER.decode() + " password hash"])
    tarball = next((data / "blobs").rglob("package.tar.gz"))
    tarball.write_bytes(tarball.read_bytes() + MARKER * 3)
    time.sleep(0.1)
    return data


def _repository_bytes(repo: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(repo.rglob("*")) if p.is_file()]


def test_marker_is_nowhere_in_an_encrypted_repository(cli: Cli, tmp_path: Path, marked_data: Path) -> None:
    encrypted, plain = tmp_path / "encrypted", tmp_path / "plain"
    _ok(cli("init", repo=encrypted))
    _ok(cli("init", "--encryption", "none", repo=plain))
    for repo in (encrypted, plain):
        _ok(cli("snapshot", str(marked_data), repo=repo))
    # The same check finds the marker in a plain repository (so it can fail) ...
    assert any(MARKER in data for _, data in _repository_bytes(plain))
    # ... and nowhere in the encrypted one, in any object (packs, index, records, config, keys).
    assert all(MARKER not in data for _, data in _repository_bytes(encrypted))
    # Nor the tarball's plaintext chunk ids: keyed ids differ from the plain repository's.
    plain_index = {p.name for p in (plain / "index").iterdir()}
    assert plain_index and all(name not in plain_index for name in os.listdir(encrypted / "index"))
    restored = tmp_path / "restored"
    _ok(cli("restore", "latest", "--target", str(restored), repo=encrypted))
    with sqlite3.connect(restored / "db" / "club.db") as conn:
        assert conn.execute("SELECT secret FROM marker_test").fetchone()[0].startswith(MARKER.decode())


def test_init_without_encryption_says_so_loudly(cli: Cli, tmp_path: Path) -> None:
    out = _ok(cli("init", "--encryption", "none", repo=tmp_path / "plain")).stdout
    assert "encryption: NONE" in out and "trusted" in out
    out = _ok(cli("init", repo=tmp_path / "encrypted")).stdout
    assert "encryption: aes-256-gcm" in out


def test_a_flipped_byte_in_any_object_fails_its_read_naming_it(cli: Cli, tmp_path: Path,
                                                               marked_data: Path) -> None:
    """One byte flipped inside any object (past its 8-byte header): the command that reads
    it fails with an authentication error naming the object; the untouched copy reads."""
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(marked_data), repo=repo))
    objects = [p for p in sorted(repo.rglob("*")) if p.is_file() and p.parent.name != "keys"]
    assert {p.relative_to(repo).parts[0] for p in objects} == {"config", "data", "index", "snapshots"}
    for number, path in enumerate(objects):
        original = path.read_bytes()
        damaged = bytearray(original)
        position = 8 + (len(original) - 8) * (number + 1) // (len(objects) + 1)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        try:
            fresh = {"CLUBSNAP_CACHE_DIR": str(tmp_path / f"cache-{number}")}  # nothing cached: read it all
            result = cli("restore", "latest", "--target", str(tmp_path / f"out-{number}"), repo=repo, env=fresh)
            # A damaged record is passed over (then there is no snapshot: 14); an index
            # object too (the restore finds the blobs in the packs): check reads every byte.
            assert result.returncode in (0, 12, 14), (path, result.stderr)
            if result.returncode == 0:
                result = cli("check", "--read-data", repo=repo, env=fresh)
                assert result.returncode == 18, (path, result.stderr)
            name = path.relative_to(repo).as_posix()
            assert name in result.stdout + result.stderr, (name, result.stdout + result.stderr)
            assert ("authentication failed" in result.stdout + result.stderr
                    or "does not match its name" in result.stdout + result.stderr), result.stderr
        finally:
            path.write_bytes(original)
            for record in (repo / "damage").glob("*"):  # what the reads recorded: a repair's to remove
                record.unlink()
    _ok(cli("check", "--read-data", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "final")}))


def test_wrong_password_is_one_line(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo, env={"CLUBSNAP_KDF_COST": "14"}))
    # How long the refusal takes (about one KDF) is a benchmark's figure, not a unit test's.
    line = _one_line(cli("snapshots", repo=repo, env={"CLUBSNAP_PASSWORD": "not the password"}), 20)
    assert "wrong password" in line
    line = _one_line(cli("snapshots", repo=repo, env={"CLUBSNAP_PASSWORD": ""}), 2)
    assert "password is needed" in line  # no password at all, no terminal
    password_file = tmp_path / "password"
    password_file.write_text(TEST_PASSWORD + "\n")
    _ok(cli("snapshots", "--password-file", str(password_file), repo=repo, env={"CLUBSNAP_PASSWORD": ""}))
    _one_line(cli("snapshots", "--password-file", str(tmp_path / "missing"), repo=repo), 2)


def test_key_slots_add_passwd_remove_round_trip(cli: Cli, tmp_path: Path, marked_data: Path) -> None:
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(marked_data), repo=repo))

    def slots(password: str) -> list[dict[str, object]]:
        out = _ok(cli("key", "list", "--json", repo=repo, env={"CLUBSNAP_PASSWORD": password})).stdout
        return list(json.loads(out)["slots"])

    first = slots(TEST_PASSWORD)
    assert len(first) == 1 and first[0]["current"]
    added = json.loads(_ok(cli("key", "add", "--json", repo=repo,
                               env={"CLUBSNAP_NEW_PASSWORD": "second password"})).stdout)["added"]
    assert {s["id"] for s in slots("second password")} == {first[0]["id"], added}
    # Refuses to remove the slot that opened it; another password can.
    _one_line(cli("key", "remove", str(first[0]["id"]), repo=repo), 2)
    _ok(cli("key", "remove", str(first[0]["id"])[:6], repo=repo, env={"CLUBSNAP_PASSWORD": "second password"}))
    _one_line(cli("snapshots", repo=repo), 20)  # the removed slot's password no longer opens it
    # passwd: a new slot replaces the current one; the data stays readable with it.
    _ok(cli("key", "passwd", repo=repo, env={"CLUBSNAP_PASSWORD": "second password",
                                             "CLUBSNAP_NEW_PASSWORD": "third password"}))
    _one_line(cli("snapshots", repo=repo, env={"CLUBSNAP_PASSWORD": "second password"}), 20)
    assert len(slots("third password")) == 1
    _ok(cli("restore", "latest", "--target", str(tmp_path / "out"), repo=repo,
            env={"CLUBSNAP_PASSWORD": "third password"}))
    _ok(cli("check", "--read-data", repo=repo, env={"CLUBSNAP_PASSWORD": "third password"}))


def test_a_plain_object_in_an_encrypted_repository_is_refused(cli: Cli, tmp_path: Path, marked_data: Path) -> None:
    """Write access to the bucket does not let an attacker swap in an unencrypted record."""
    from engine import Repository
    from engine.backends.fs import FsBackend
    from engine.format import Kind, digest, seal_object, snapshot_key

    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(marked_data), repo=repo))
    opened = Repository.open(FsBackend(repo), tmp_path / "c", lambda: TEST_PASSWORD.encode())
    snap = opened.snapshots()[-1]
    opened.close()
    forged = seal_object(Kind.SNAPSHOT, {**snap.record, "tags": ["forged"]})  # no cipher: plain
    from engine.format import SnapshotId

    key = snapshot_key(snap.time, SnapshotId(digest(forged)))
    (repo / key).write_bytes(forged)
    result = cli("snapshots", "--json", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh")})
    # Passed over with a warning, never listed: it blocks no backup, and is never used.
    assert result.returncode == 0 and "not encrypted" in result.stderr and key in result.stderr, result.stderr
    assert [s["id"] for s in json.loads(result.stdout)] == [snap.id.hex()]
    assert cli("check", repo=repo).returncode == 18


def test_a_plain_config_replacing_an_encrypted_one_is_refused(cli: Cli, tmp_path: Path, marked_data: Path) -> None:
    """Downgrade: with write access, an attacker swaps in a plain config (and hides the
    snapshots); the next snapshot must not be stored in the clear."""
    from engine.format import Kind, seal_object

    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(marked_data), repo=repo))
    config = {"version": 3, "id": "0" * 32, "created": "2026-01-01T00:00:00+00:00", "pack_size": 16 << 20,
              "encryption": "none", "chunker": {"cdc_min": 131072, "cdc_avg": 524288, "cdc_max": 2097152,
                                                "page_chunk": 16384}}
    (repo / "config").write_bytes(seal_object(Kind.CONFIG, config))
    before = _repository_bytes(repo)
    line = _one_line(cli("snapshot", str(marked_data), repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "c2")}), 12)
    assert "not encrypted" in line
    # Even with the key slots deleted too, a host that knew the repository as encrypted refuses.
    for slot in (repo / "keys").iterdir():
        slot.unlink()
    line = _one_line(cli("snapshot", str(marked_data), repo=repo), 12)
    assert "not encrypted" in line
    assert all(MARKER not in data for _, data in _repository_bytes(repo)) and len(before) > 0


def test_a_snapshot_copied_under_a_later_time_is_refused(cli: Cli, tmp_path: Path, marked_data: Path) -> None:
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    _ok(cli("snapshot", str(marked_data), repo=repo))
    (record,) = (repo / "snapshots").iterdir()
    stamp, snap_id = record.name.split("_")
    (repo / "snapshots" / f"20991231T000000.000000Z_{snap_id}").write_bytes(record.read_bytes())
    listed = cli("snapshots", "--json", repo=repo, env={"CLUBSNAP_CACHE_DIR": str(tmp_path / "fresh")})
    assert listed.returncode == 0 and "time in the name differs" in listed.stderr
    assert [s["time"][:4] for s in json.loads(listed.stdout)] == ["2026"]  # the copy is never listed
    result = cli("check", repo=repo)
    assert result.returncode == 18 and "time in the name differs" in result.stdout


def test_a_damaged_key_slot_neither_blocks_the_others_nor_stays(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _ok(cli("init", repo=repo))
    (repo / "keys" / "0000000000000000").write_bytes(b"not a key slot at all")
    _ok(cli("snapshots", repo=repo))
    listed = json.loads(_ok(cli("key", "list", "--json", repo=repo)).stdout)["slots"]
    damaged = [s for s in listed if str(s["kdf"]).startswith("DAMAGED")]
    assert [s["id"] for s in damaged] == ["0000000000000000"]
    _ok(cli("key", "remove", "0000000000000000", repo=repo))
    line = _one_line(cli("init", repo=repo, env={"CLUBSNAP_KDF_COST": "25"}), 10)  # exists: checked first
    assert "already exists" in line
    line = _one_line(cli("init", repo=tmp_path / "other", env={"CLUBSNAP_KDF_COST": "25"}), 2)
    assert "scrypt cost" in line
