"""The storage contract every repository backend fulfils, and ``open_backend(url)``.

A backend stores opaque objects under string keys (``data/ab/ab12…``). It knows nothing
of the format: the repository layer above it decides what the bytes and keys mean.

Contract (checked by ``tests/test_backend_contract.py`` for every backend):

- ``put`` is atomic: a reader sees the whole object or no object, never a prefix, even
  if the process dies mid-call. When ``put`` returns, the object is durable.
- With ``exclusive=True`` a ``put`` fails with ``RepositoryExists`` instead of replacing
  an existing object (used for the one mutable-looking object, ``config``).
  Otherwise replacing an object is allowed; clubsnap only does it with identical bytes,
  since every other key names its content.
- ``get`` returns ``length`` bytes from ``offset`` (to the end when ``length`` is None);
  a missing key raises ``ObjectNotFound``; a range past the end raises ``BackendError``.
- ``list(prefix)`` yields ``(key, size)`` of complete objects only, in no promised order;
  half-written temporaries are never listed.
- ``delete`` of a missing key is not an error (deletes are retried after crashes).
- Every failure is an ``EngineError``: ``ObjectNotFound``, ``StorageFull`` or
  ``BackendError``; never a bare ``OSError`` or client exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .backends.s3 import S3Settings


class Backend(ABC):
    """Abstract object store; see the module docstring for the contract."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Human-readable location for messages (a path or URL, no secrets)."""

    @abstractmethod
    def put(self, key: str, data: bytes | bytearray, *, exclusive: bool = False) -> None:
        """Store ``data`` under ``key`` atomically and durably."""

    @abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read an object or a byte range of it."""

    @abstractmethod
    def stat(self, key: str) -> int:
        """Size of the object in bytes; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Complete objects whose key starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; absent keys are ignored."""

    @property
    def concurrency(self) -> int:
        """How many requests at once serve this backend well (a remote store hides its
        latency behind parallel requests; a local disk gains nothing from them)."""
        return 1

    def request_counts(self) -> dict[str, int] | None:
        """HTTP requests made so far by class, for backends that bill per request."""
        return None

    def prepare_for_init(self) -> None:
        """Make the location ready for a new repository (a bucket is created if absent)."""


def open_backend(url: str, s3: "S3Settings | None" = None) -> Backend:
    """Backend for a repository URL: a local path, ``file://`` path, ``s3://bucket/prefix``
    or ``gs://bucket/prefix`` (Google Cloud Storage through its S3-interoperable API)."""
    from .backends.fs import FsBackend

    if url.startswith("file://"):
        return FsBackend(url[len("file://"):])
    if url.startswith(("s3://", "gs://")):
        from .backends.s3 import S3Backend

        return S3Backend(url, s3, repository=True)
    if "://" in url:
        from .errors import UsageError

        raise UsageError(f"unsupported repository URL scheme: {url.split('://', 1)[0]}://")
    return FsBackend(url)
