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
    repo.close()
    # A host with an empty catalog finds every blob through the index objects alone.
    fresh = Repository.open(FsBackend(tmp_path / "repo"), tmp_path / "fresh-cache")
    fresh.sync_index()
    assert all(fresh.read_blob(i) == blob for i, blob in zip(ids, blobs))
    fresh.close()


def test_a_failing_tree_cache_costs_nothing_but_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local tree cache is a cache: when writing to it fails, the pack is still
    indexed and the snapshot saved."""
    import sqlite3

    from engine.catalog import Catalog

    def broken(self: Catalog, blobs: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Catalog, "cache_trees", broken)
    now = lambda: datetime(2026, 4, 9, tzinfo=timezone.utc)  # noqa: E731
    repo = Repository.init(FsBackend(tmp_path / "repo"), tmp_path / "cache", now)
    tree = repo.add_blob(BlobType.TREE, b"a tree record")
    repo.save_snapshot({"tree": bytes(tree)}, now())
    repo.close()
    fresh = Repository.open(FsBackend(tmp_path / "repo"), tmp_path / "fresh-cache")
    fresh.sync_index()
    assert fresh.read_blob(tree) == b"a tree record"
    fresh.close()
