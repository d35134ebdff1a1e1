"""A failed pack or index upload can never be followed by a saved snapshot, whichever
thread met the failure and whether or not it was caught there: the session's dedup
already counts that pack's blobs as stored."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine import Repository
from engine.backends.fs import FsBackend
from engine.errors import BackendError
from engine.format import BlobType


class FailingOnce(FsBackend):
    """A local backend that fails the first PUT under ``prefix`` and serves ``width``
    parallel requests (so uploads run in the background when it is above 1)."""

    def __init__(self, root: Path, prefix: str, width: int) -> None:
        super().__init__(root)
        self.prefix, self.width, self.failed = prefix, width, False

    @property
    def concurrency(self) -> int:
        return self.width

    def put(self, key: str, data: bytes | bytearray, *, exclusive: bool = False) -> None:
        if key.startswith(self.prefix) and not self.failed:
            self.failed = True
            raise BackendError(f"{key}: injected failure")
        super().put(key, data, exclusive=exclusive)


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("prefix", ["data/", "index/"])
def test_no_snapshot_after_a_swallowed_upload_failure(tmp_path: Path, width: int, prefix: str) -> None:
    now = lambda: datetime(2026, 4, 9, tzinfo=timezone.utc)  # noqa: E731
    backend = FailingOnce(tmp_path / "repo", prefix, width)
    repo = Repository.init(backend, tmp_path / "cache", now)
    repo.config = dataclasses.replace(repo.config, pack_size=64 << 10)
    blobs = [os.urandom(20 << 10) for _ in range(40)]
    for blob in blobs:
        try:
            repo.add_blob(BlobType.DATA, blob)
        except BackendError:
            pass  # a careless caller (a source reader reporting "unreadable") swallows it
    with pytest.raises(BackendError, match="injected failure"):
        repo.save_snapshot({"tree": b"\0" * 32}, now())
    assert list(backend.list("snapshots/")) == []
    # The same session retried after discard_unwritten stores everything for real.
    repo.discard_unwritten()
    ids = [repo.add_blob(BlobType.DATA, blob) for blob in blobs]
    repo.save_snapshot({"tree": b"\0" * 32}, now())
    assert all(repo.read_blob(i) == blob for i, blob in zip(ids, blobs))
    repo.close()
