"""The on-disk format: docs/format.md and engine/format.py must agree, and readers must
refuse what they do not understand."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine import format as fmt
from engine import locks, packs, repository
from engine.prune import INDEX_ENTRIES_PER_OBJECT
from engine.backends.fs import FsBackend
from engine.errors import IntegrityError, UnsupportedFormat

SPEC = (Path(__file__).resolve().parent.parent / "docs" / "format.md").read_text()


def _spec_constants() -> dict[str, str]:
    section = SPEC.split("## 2. Constants", 1)[1].split("## 3.", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", section, re.MULTILINE))


def test_spec_constants_match_code() -> None:
    code = {
        "FORMAT_VERSION": str(fmt.FORMAT_VERSION), "ID_SIZE": str(fmt.ID_SIZE),
        "OLDEST_READABLE_VERSION": str(fmt.OLDEST_READABLE_VERSION),
        "OBJECT_MAGIC": fmt.OBJECT_MAGIC.decode(), "PACK_MAGIC": fmt.PACK_MAGIC.decode(),
        "PACK_FOOTER_MAGIC": fmt.PACK_FOOTER_MAGIC.decode(),
        "MIN_COMPRESSION_GAIN": str(fmt.MIN_COMPRESSION_GAIN),
        "TARGET_PACK_SIZE": str(packs.TARGET_PACK_SIZE),
        "PACKS_PER_INDEX": str(repository.PACKS_PER_INDEX),
        "INDEX_ENTRIES_PER_OBJECT": str(INDEX_ENTRIES_PER_OBJECT),
        "REFRESH_EVERY": str(int(locks.REFRESH_EVERY.total_seconds())),
        "STALE_AFTER": str(int(locks.STALE_AFTER.total_seconds())),
    }
    assert _spec_constants() == code


def test_spec_names_every_object_kind() -> None:
    for kind in fmt.Kind:
        assert f"{int(kind)} {kind.name.lower().replace('_', ' ')}" in SPEC


def test_sealed_object_round_trip_and_compression() -> None:
    record = {"a": b"\x00" * 1000, "b": [1, 2, 3], "c": "text"}
    sealed = fmt.seal_object(fmt.Kind.INDEX, record)
    assert sealed[:4] == b"CSNP" and sealed[4] == fmt.FORMAT_VERSION and sealed[6] & fmt.Flag.LZ4
    assert fmt.open_object(fmt.Kind.INDEX, sealed, "t") == record


def test_reader_refuses_unknown_version_flags_kind_and_magic() -> None:
    sealed = bytearray(fmt.seal_object(fmt.Kind.CONFIG, {"x": 1}))
    newer = bytes(sealed[:4]) + bytes([fmt.FORMAT_VERSION + 1]) + bytes(sealed[5:])
    with pytest.raises(UnsupportedFormat, match="format version"):
        fmt.open_object(fmt.Kind.CONFIG, newer, "t")
    unknown = bytes(sealed[:6]) + bytes([0x80]) + bytes(sealed[7:])
    with pytest.raises(UnsupportedFormat, match="flags"):
        fmt.open_object(fmt.Kind.CONFIG, unknown, "t")
    encrypted = bytes(sealed[:6]) + bytes([fmt.Flag.ENCRYPTED]) + bytes(sealed[7:])
    with pytest.raises(IntegrityError, match="without a key"):
        fmt.open_object(fmt.Kind.CONFIG, encrypted, "t")
    with pytest.raises(IntegrityError, match="expected a snapshot"):
        fmt.open_object(fmt.Kind.SNAPSHOT, bytes(sealed), "t")
    with pytest.raises(IntegrityError, match="magic"):
        fmt.open_object(fmt.Kind.CONFIG, b"XXXX" + bytes(sealed[4:]), "t")


def test_incompressible_blobs_are_stored_raw() -> None:
    import os

    raw = os.urandom(10_000)
    stored = fmt.encode_blob(raw)
    assert stored[0] == 0 and stored[1:] == raw
    text = b"dart package " * 1000
    assert fmt.encode_blob(text)[0] == fmt.Flag.LZ4


def test_blob_decode_checks_the_hash() -> None:
    raw = b"hello club" * 100
    stored = bytearray(fmt.encode_blob(raw))
    assert fmt.decode_blob(bytes(stored), fmt.ChunkId(fmt.digest(raw)), "t") == raw
    with pytest.raises(IntegrityError):
        fmt.decode_blob(bytes(stored), fmt.ChunkId(fmt.digest(b"other")), "t")


def test_pack_trailer_rebuilds_the_index(tmp_path: Path) -> None:
    builder = packs.PackBuilder(fmt.BlobType.DATA)
    raws = [bytes([i]) * (1000 + i) for i in range(5)]
    for raw in raws:
        builder.add(fmt.ChunkId(fmt.digest(raw)), fmt.encode_blob(raw), len(raw))
    pack_id, data, entries = builder.finish()
    backend = FsBackend(tmp_path)
    backend.put(fmt.pack_key(pack_id), data)
    assert packs.read_trailer(backend, pack_id, len(data)) == entries
    assert packs.verify_pack(data, pack_id) == entries


def test_snapshot_keys_sort_by_time() -> None:
    early = fmt.snapshot_key(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc), fmt.SnapshotId(b"\xff" * 32))
    late = fmt.snapshot_key(datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=timezone.utc), fmt.SnapshotId(b"\x00" * 32))
    assert early < late
    assert fmt.parse_snapshot_key(early)[0] == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)


def _table_keys(section_title: str) -> list[str]:
    section = SPEC.split(section_title, 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE)


def record_tree(record: dict[str, object]) -> "fmt.ChunkId":
    return fmt.ChunkId(record["tree"])  # type: ignore[arg-type]


def test_spec_tables_list_exactly_the_record_fields(tmp_path: Path) -> None:
    import sqlite3

    from engine import Repository, create_snapshot, open_backend
    from engine.snapshot import SnapshotOptions

    data = tmp_path / "data"
    (data / "db").mkdir(parents=True)
    sqlite3.connect(data / "db" / "club.db").execute("CREATE TABLE t(x)").connection.close()
    (data / "blobs").mkdir()
    (data / "blobs" / "f").write_bytes(b"x")
    now = lambda: datetime(2026, 1, 1, tzinfo=timezone.utc)  # noqa: E731
    repo = Repository.init(open_backend(str(tmp_path / "repo")), tmp_path / "cache", now)
    record = create_snapshot(repo, SnapshotOptions(source=data, host="h", now=now)).info.record
    section = SPEC.split("### 6.4 snapshot", 1)[1].split("\n#", 1)[0]
    optional = re.findall(r"^\| `(\w+)` \| [^|]+ \| optional", section, re.MULTILINE)
    assert optional == ["blobs_source", "suspect_databases", "carried_forward", "lost", "lost_count", "dangling",
                        "verified", "repaired"]
    assert sorted(set(_table_keys("### 6.4 snapshot")) - set(optional)) == sorted(record)
    assert sorted(_table_keys("### 6.1 config")) == sorted(repo.config.to_record())
    from engine.pagemap import _read
    from engine.tree import lookup

    entry = lookup(repo, record_tree(record), b"db/club.db")[-1]  # type: ignore[index]
    base = _read(repo, fmt.ChunkId(entry["page_map"]))
    pagemap_keys = set(_table_keys("### 6.5 SQLite"))
    assert set(base) <= pagemap_keys and pagemap_keys - set(base) == {"base", "ref", "changes", "delta_bytes"}
    stats_row = next(line for line in SPEC.splitlines() if line.startswith("| `stats` |"))
    bucket_only = {"blobs_requests"}  # present with a bucket source only
    assert sorted(set(re.findall(r"`(\w+)`", stats_row)[1:]) - bucket_only) == sorted(record["stats"])
    repo.close()


def test_encrypted_blobs_and_objects_are_bound_to_their_id_and_header() -> None:
    import os

    from engine.crypto import Cipher

    cipher = Cipher(os.urandom(32))
    raw = b"page " * 500
    blob_id = fmt.ChunkId(cipher.chunk_id(raw))
    assert blob_id != fmt.ChunkId(fmt.digest(raw))  # keyed ids
    stored = fmt.encode_blob(raw, blob_id, cipher)
    assert raw[:40] not in stored and fmt.decode_blob(stored, blob_id, "t", cipher) == raw
    other = fmt.ChunkId(cipher.chunk_id(b"another page"))
    with pytest.raises(IntegrityError, match="authentication failed"):
        fmt.decode_blob(stored, other, "t", cipher)  # moved under another id
    with pytest.raises(IntegrityError, match="authentication failed"):
        fmt.decode_blob(stored, blob_id, "t", Cipher(os.urandom(32)))  # another repository's key
    sealed = bytearray(fmt.seal_object(fmt.Kind.INDEX, {"packs": []}, cipher))
    assert fmt.open_object(fmt.Kind.INDEX, bytes(sealed), "t", cipher) == {"packs": []}
    sealed[5] = fmt.Kind.SNAPSHOT  # the kind is associated data: relabelling fails
    with pytest.raises(IntegrityError, match="authentication failed"):
        fmt.open_object(fmt.Kind.SNAPSHOT, bytes(sealed), "t", cipher)
    assert len({fmt.encode_blob(raw, blob_id, cipher) for _ in range(100)}) == 100  # a fresh key every time
