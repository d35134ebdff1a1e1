"""The backend contract (engine/backend.py docstring), run against every backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from engine.backend import Backend
from engine.backends.fs import FsBackend
from engine.backends.s3 import S3Backend, S3Settings
from engine.errors import BackendError, ObjectNotFound, RepositoryExists

BACKENDS = ("fs", "s3")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "fs":
        yield FsBackend(tmp_path / "store")
    else:  # a fresh bucket on the session's moto server, through real HTTP
        yield S3Backend(request.getfixturevalue("s3_url"), S3Settings.from_environ(os.environ))


def test_put_then_get_whole_and_ranges(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    backend.put("data/ab/abcdef", data)
    assert backend.get("data/ab/abcdef") == data
    assert backend.get("data/ab/abcdef", 100, 50) == data[100:150]
    assert backend.get("data/ab/abcdef", len(data) - 10) == data[-10:]
    assert backend.stat("data/ab/abcdef") == len(data)


def test_range_past_end_is_an_error(backend: Backend) -> None:
    backend.put("index/x", b"12345")
    with pytest.raises(BackendError):
        backend.get("index/x", 3, 10)


def test_missing_object_raises_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("index/nothing")
    with pytest.raises(ObjectNotFound):
        backend.stat("index/nothing")


def test_list_by_prefix_gives_complete_objects_with_sizes(backend: Backend) -> None:
    backend.put("snapshots/a", b"1")
    backend.put("snapshots/b", b"22")
    backend.put("index/c", b"333")
    assert sorted(backend.list("snapshots/")) == [("snapshots/a", 1), ("snapshots/b", 2)]
    assert list(backend.list("locks/")) == []


def test_exclusive_put_refuses_to_replace(backend: Backend) -> None:
    backend.put("config", b"first", exclusive=True)
    with pytest.raises(RepositoryExists):
        backend.put("config", b"second", exclusive=True)
    assert backend.get("config") == b"first"


def test_plain_put_replaces(backend: Backend) -> None:
    backend.put("index/k", b"old")
    backend.put("index/k", b"new")
    assert backend.get("index/k") == b"new"


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("index/gone", b"x")
    backend.delete("index/gone")
    backend.delete("index/gone")
    with pytest.raises(ObjectNotFound):
        backend.get("index/gone")


def test_invalid_keys_are_rejected(backend: Backend) -> None:
    for key in ("", "/abs", "data/../config"):
        with pytest.raises(BackendError):
            backend.put(key, b"x")


def test_fs_put_never_exposes_partial_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies mid-way leaves no object and no listed temporary."""
    store = FsBackend(tmp_path / "store")
    original = FsBackend._write_synced

    def dying_write(path: Path, data: bytes) -> None:
        original(path, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FsBackend, "_write_synced", staticmethod(dying_write))
    from engine.errors import StorageFull

    with pytest.raises(StorageFull):
        store.put("data/aa/aaaa", b"x" * 1000)
    assert list(store.list("data/")) == []
    assert list((tmp_path / "store" / "data" / "aa").iterdir()) == []  # no temporary left behind
    with pytest.raises(ObjectNotFound):
        store.get("data/aa/aaaa")


def test_large_object_round_trips(backend: Backend) -> None:
    """Above the S3 backend's part size a put is a multipart upload: same contract."""
    data = os.urandom(1 << 20) * 20
    backend.put("data/cd/large", data)
    assert backend.stat("data/cd/large") == len(data)
    assert backend.get("data/cd/large", 9 << 20, 100) == data[9 << 20:(9 << 20) + 100]
    assert backend.get("data/cd/large") == data
    assert sorted(backend.list("data/")) == [("data/cd/large", len(data))]


def test_empty_object_and_empty_range(backend: Backend) -> None:
    backend.put("index/empty", b"")
    assert backend.get("index/empty") == b""
    assert backend.stat("index/empty") == 0
    backend.put("index/five", b"12345")
    assert backend.get("index/five", 5, 0) == b""


def test_gcs_uploads_ask_for_create_only_the_gcs_way() -> None:
    """GCS ignores If-None-Match on uploads; a gs:// client turns it into GCS's own
    create-if-absent header before signing, and leaves other uploads alone."""
    from botocore.awsrequest import AWSRequest

    from engine.backends.s3 import gcs_create_only

    exclusive = AWSRequest(method="PUT", url="https://storage.googleapis.com/b/config", headers={"If-None-Match": "*"})
    gcs_create_only(exclusive)
    assert exclusive.headers.get("x-goog-if-generation-match") == "0" and "If-None-Match" not in exclusive.headers
    plain = AWSRequest(method="PUT", url="https://storage.googleapis.com/b/data/x")
    gcs_create_only(plain)
    assert "x-goog-if-generation-match" not in plain.headers
