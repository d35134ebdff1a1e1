"""A wrapper backend that counts requests and bytes: request counts are an S3 bill, and
"bytes fetched" is how a restore proves it reused local data."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Iterator

from ..backend import Backend

CALLS = ("put", "get", "head", "list", "delete", "retries")  # a stat is a HEAD on object stores


class MeteredBackend(Backend):
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_read = 0
        self.bytes_written = 0

    def _count(self, op: str, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.requests[op] += 1
            self.bytes_read += read
            self.bytes_written += written

    def snapshot(self) -> dict[str, int]:
        """Current counters as a plain dict, for stats and ``--json``: the HTTP requests
        of a backend that counts them (retries and list pages included), else the calls."""
        counted = self.inner.request_counts()
        with self._lock:
            requests = counted if counted is not None else {op: self.requests[op] for op in CALLS}
            return {**requests, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}

    @property
    def concurrency(self) -> int:
        return self.inner.concurrency

    def request_counts(self) -> dict[str, int] | None:
        return self.inner.request_counts()

    def prepare_for_init(self) -> None:
        self.inner.prepare_for_init()

    @property
    def location(self) -> str:
        return self.inner.location

    def put(self, key: str, data: bytes | bytearray, *, exclusive: bool = False) -> None:
        self.inner.put(key, data, exclusive=exclusive)
        self._count("put", written=len(data))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(key, offset, length)
        self._count("get", read=len(data))
        return data

    def stat(self, key: str) -> int:
        self._count("head")
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        self._count("list")
        yield from self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._count("delete")
        self.inner.delete(key)
