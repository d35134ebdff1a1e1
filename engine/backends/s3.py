"""S3 and S3-compatible object storage (AWS S3, GCS through its interoperability API,
MinIO) through boto3.

Atomicity comes from S3 itself: an object becomes visible only when its PUT, or a
multipart upload's final Complete, succeeds; a killed upload leaves nothing listed (an
unfinished multipart upload is invisible; docs/backends.md gives the lifecycle rule that
reclaims its parts). ``exclusive`` puts are conditional writes (``If-None-Match: *``).
Every upload carries a Content-MD5, so the service rejects a body damaged in transit.

Retries are ours, not botocore's (its retries are switched off): a GET's body is read
inside the retried call, so a connection reset halfway through a pack is retried like a
503, which botocore alone would not do; and an endpoint that refuses connections fails
the command after a few quick attempts instead of minutes of backoff. Every HTTP request,
retries included, is counted by class: request counts are the bill.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import io
import random
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from ..backend import Backend
from ..errors import BackendError, ObjectNotFound, RepositoryExists, RepositoryNotFound, StorageFull, UsageError

T = TypeVar("T")

GCS_ENDPOINT = "https://storage.googleapis.com"
PART_SIZE = 8 << 20  # multipart part size; objects above it are uploaded in parts
LIST_PAGE = 1000     # keys per LIST request (the S3 maximum)
CONNECT_ATTEMPTS = 4  # an endpoint that refuses connections this often is down
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.2, 8.0
# Error codes that mean "try again later" whatever the HTTP status says.
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                             "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                             "RequestLimitExceeded", "TooManyRequests", "OperationAborted"})
DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                          "InvalidToken", "ExpiredToken", "AllAccessDisabled"})
FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "StorageQuotaExceeded"})
# HTTP requests are reported in these classes (AWS bills HEAD as a GET, DELETE is free).
REQUEST_CLASSES = ("put", "get", "head", "list", "delete", "retries")


@dataclass(frozen=True)
class S3Settings:
    """Everything an S3 repository or bucket needs besides its URL. Credentials left
    unset come from boto3's usual chain (environment, shared files, instance roles);
    an endpoint left unset from ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, else AWS."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    profile: str | None = None
    storage_class: str | None = None  # for data packs only (keys under ``data/``)
    connections: int = 8              # parallel requests, and the HTTP connection pool
    timeout_s: float = 30.0           # read timeout per request
    connect_timeout_s: float = 5.0
    attempts: int = 8                 # per request, for throttling, 5xx, resets, timeouts
    addressing: str = "auto"          # "path" for MinIO without virtual-host DNS

    ENV = {"endpoint": "ENDPOINT", "region": "REGION", "access_key_id": "ACCESS_KEY_ID",
           "secret_access_key": "SECRET_ACCESS_KEY", "profile": "PROFILE", "storage_class": "STORAGE_CLASS",
           "connections": "CONNECTIONS", "timeout_s": "TIMEOUT", "connect_timeout_s": "CONNECT_TIMEOUT",
           "attempts": "ATTEMPTS", "addressing": "ADDRESSING"}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *prefixes: str) -> "S3Settings":
        """Settings from ``CLUBSNAP_S3_<NAME>`` variables; with ``prefixes``, the first of
        ``<prefix><NAME>`` that is set wins (a bucket source may live on another service
        than the repository: ``CLUBSNAP_BLOBS_S3_ENDPOINT``...)."""
        values: dict[str, Any] = {}
        for name, suffix in cls.ENV.items():
            variable, text = next(((p + suffix, environ[p + suffix]) for p in (*prefixes, "CLUBSNAP_S3_")
                                   if environ.get(p + suffix)), ("", ""))
            if not text:
                continue
            kind = type(getattr(cls(), name))
            try:
                values[name] = kind(text) if kind in (int, float) else text
            except ValueError as exc:
                raise UsageError(f"{variable}={text!r} is not a valid number") from exc
        settings = cls(**values)
        if settings.connections < 1 or settings.attempts < 1:
            raise UsageError("CLUBSNAP_S3_CONNECTIONS and CLUBSNAP_S3_ATTEMPTS must be at least 1")
        if settings.addressing not in ("auto", "path", "virtual"):
            raise UsageError("CLUBSNAP_S3_ADDRESSING must be auto, path or virtual")
        return settings


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: what a bucket source needs to tell whether it changed."""

    key: str      # relative to the backend's prefix
    size: int
    etag: str     # quotes stripped; an MD5 only for single-part uploads, a version token always
    mtime_ns: int


def parse_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/prefix`` or ``gs://bucket/prefix`` -> (scheme, bucket, prefix)."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme not in ("s3", "gs") or not bucket:
        raise UsageError(f"not a bucket URL: {url!r} (expected s3://bucket[/prefix] or gs://bucket[/prefix])")
    return scheme, bucket, prefix.strip("/")


def is_bucket_url(url: str) -> bool:
    return url.startswith(("s3://", "gs://"))


class S3Backend(Backend):
    """Objects under ``prefix/`` in one bucket; see the module docstring.

    ``repository``: the bucket holds (or is to hold) a repository. A missing bucket is
    then ``RepositoryNotFound`` (exit 10: nothing to retry, there is no repository
    there) rather than the ``BackendError`` (exit 13, an outage) a missing club blob
    bucket stays."""

    def __init__(self, url: str, settings: S3Settings | None = None, *, client: Any = None,
                 repository: bool = False) -> None:
        scheme, self.bucket, self.prefix = parse_url(url)
        self.repository = repository
        settings = settings or S3Settings()
        if scheme == "gs" and not settings.endpoint:
            settings = replace(settings, endpoint=GCS_ENDPOINT)
        self.settings = settings
        self._url = f"{scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._client = client or _make_client(settings, gcs=scheme == "gs")
        # Parts in flight across every multipart upload of this backend (bounded memory
        # however many objects upload at once).
        self._part_slots = threading.BoundedSemaphore(settings.connections)
        self._counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._parts_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ---- the Backend contract ----------------------------------------------------------------

    @property
    def location(self) -> str:
        endpoint = self._client.meta.endpoint_url
        shown = "" if endpoint.endswith(".amazonaws.com") else f" at {endpoint}"
        return self._url + shown

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` (or ``gs://``): the location without the endpoint."""
        return self._url

    @property
    def concurrency(self) -> int:
        return self.settings.connections

    def request_counts(self) -> dict[str, int]:
        with self._count_lock:
            return {name: self._counts[name] for name in REQUEST_CLASSES}

    def put(self, key: str, data: bytes | bytearray, *, exclusive: bool = False) -> None:
        full = self._key(key)
        extra = self._put_args(key)
        if exclusive:
            self._put_exclusive(full, bytes(data))
        elif len(data) > PART_SIZE:
            self._put_multipart(full, [memoryview(data)[at:at + PART_SIZE] for at in range(0, len(data), PART_SIZE)],
                                extra)
        else:
            self._call("put", full, lambda: self._client.put_object(
                Bucket=self.bucket, Key=full, Body=bytes(data), ContentMD5=_md5(data), **extra))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        full = self._key(key)
        if length == 0:
            if offset > self.stat(key):
                raise BackendError(f"{self._url}/{key}: range {offset}+0 beyond the object")
            return b""
        ranged = offset > 0 or length is not None
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if ranged:
            args["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))

        def fetch() -> bytes:
            body: bytes = self._client.get_object(**args)["Body"].read()
            return body

        data = self._call("get", full, fetch)
        if length is not None and len(data) != length:
            raise BackendError(f"{self._url}/{key}: range {offset}+{length} beyond the object's end")
        return data

    def stat(self, key: str) -> int:
        full = self._key(key)
        size: int = self._call("head", full, lambda: self._client.head_object(
            Bucket=self.bucket, Key=full))["ContentLength"]
        return size

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for info in self.list_objects(prefix):
            yield info.key, info.size

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._call("delete", full, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))
        except ObjectNotFound:
            return

    def prepare_for_init(self) -> None:
        """Create the bucket if it does not exist (restic does the same at ``init``). One
        that cannot be created (no permission, a name taken by another account) is a
        missing bucket, exit 10, saying why; an outage meanwhile stays exit 13."""
        import botocore.exceptions as boto

        try:
            self._call("head", self.bucket, lambda: self._client.head_bucket(Bucket=self.bucket))
            return
        except ObjectNotFound:
            pass
        region = self._client.meta.region_name
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call("put", self.bucket, lambda: self._client.create_bucket(**args))
        except BackendError as exc:
            cause = exc.__cause__
            if not isinstance(cause, boto.ClientError) or _classify(cause) != "permanent":
                raise
            code = _code(cause) or str(_status(cause))
            raise RepositoryNotFound(f"{self._missing_bucket()}; creating it failed: {code}") from exc

    # ---- beyond the contract: what a bucket source or restore target needs --------------------

    def overlaps(self, other: "S3Backend") -> bool:
        """Whether the two share a bucket on one service with one prefix inside the other
        (a blob store there would contain the repository, or the reverse)."""
        if (self._client.meta.endpoint_url, self.bucket) != (other._client.meta.endpoint_url, other.bucket):
            return False
        return self._root.startswith(other._root) or other._root.startswith(self._root)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` with size, ETag and time; one LIST per 1000 keys."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._root + prefix, "MaxKeys": LIST_PAGE}
        while True:
            page = self._call("list", args["Prefix"] or self.bucket,
                              lambda: self._client.list_objects_v2(**args))
            for item in page.get("Contents", []):
                key = item["Key"][len(self._root):]
                if key and not key.endswith("/"):  # "folder" placeholders some consoles create
                    modified = item["LastModified"].astimezone(timezone.utc)
                    yield ObjectInfo(key, int(item["Size"]), item.get("ETag", "").strip('"'),
                                     int(modified.timestamp()) * 1_000_000_000 + modified.microsecond * 1000)
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def open_object(self, key: str) -> "ObjectReader":
        """A stream over one object that survives broken connections (see ObjectReader)."""
        return ObjectReader(self, key)

    def put_stream(self, key: str, parts: Iterable[bytes], size: int) -> None:
        """Upload ``size`` bytes arriving in pieces without holding them all: one PUT up
        to the part size, else a multipart upload fed part by part."""
        full = self._key(key)
        extra = self._put_args(key)
        if size <= PART_SIZE:
            data = b"".join(parts)
            self._call("put", full, lambda: self._client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentMD5=_md5(data), **extra))
        else:
            self._put_multipart(full, _rechunk(parts, PART_SIZE), extra)

    # ---- internals ----------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid object key {key!r}")
        return self._root + key

    def _put_args(self, key: str) -> dict[str, Any]:
        storage_class = self.settings.storage_class
        return {"StorageClass": storage_class} if storage_class and key.startswith("data/") else {}

    def _put_exclusive(self, full: str, data: bytes) -> None:
        try:
            self._call("put", full, lambda: self._client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentMD5=_md5(data), IfNoneMatch="*"))
        except _Unsupported:
            # No conditional writes here: check, then write. Two concurrent `init`s of one
            # location could both pass; docs/backends.md says so.
            try:
                self._call("head", full, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
            except ObjectNotFound:
                self._call("put", full, lambda: self._client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, ContentMD5=_md5(data)))
                return
            raise RepositoryExists(f"{self._url}/{full[len(self._root):]} already exists") from None
        except _PreconditionFailed as exc:
            # Our own earlier attempt may have landed before its response was lost.
            try:
                existing = self._call("get", full, lambda: self._client.get_object(
                    Bucket=self.bucket, Key=full)["Body"].read())
            except ObjectNotFound:
                existing = None
            if existing != data:
                raise RepositoryExists(f"{self._url}/{full[len(self._root):]} already exists") from exc

    def _put_multipart(self, full: str, parts: Iterable[bytes | memoryview], extra: dict[str, Any]) -> None:
        upload_id: str = self._call("put", full, lambda: self._client.create_multipart_upload(
            Bucket=self.bucket, Key=full, **extra))["UploadId"]
        try:
            def send(number: int, body: bytes) -> dict[str, Any]:
                etag = self._call("put", full, lambda: self._client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                    Body=body, ContentMD5=_md5(body)))["ETag"]
                return {"PartNumber": number, "ETag": etag}

            pool = self._pool()
            pending: deque[Future[dict[str, Any]]] = deque()
            done = []
            for number, part in enumerate(parts, start=1):
                # At most `connections` parts in flight in all, whatever number of uploads
                # run at once: memory stays bounded by connections x part size.
                self._part_slots.acquire()
                try:
                    future = pool.submit(send, number, bytes(part))
                except BaseException:
                    self._part_slots.release()
                    raise
                future.add_done_callback(lambda _: self._part_slots.release())
                pending.append(future)
                while pending and pending[0].done():
                    done.append(pending.popleft().result())
            done += [future.result() for future in pending]
            self._complete(full, upload_id, done)
        except BaseException:
            try:
                self._call("delete", full, lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id))
            except Exception:
                pass  # the lifecycle rule in docs/backends.md reclaims what is left
            raise

    def _complete(self, full: str, upload_id: str, parts: "builtins.list[dict[str, Any]]") -> None:
        try:
            self._call("put", full, lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except ObjectNotFound:
            # NoSuchUpload after a retry: the first Complete landed and its answer was lost,
            # if the object now there is this upload (S3's multipart ETag: the MD5 of the
            # parts' MD5s, and the part count).
            head = self._call("head", full, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
            expected = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)).hexdigest()
            if head.get("ETag", "").strip('"') != f"{expected}-{len(parts)}":
                raise BackendError(f"{self._url}/{full[len(self._root):]}: multipart upload vanished before it "
                                   f"completed") from None

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._parts_pool is None:
                self._parts_pool = ThreadPoolExecutor(self.settings.connections, thread_name_prefix="s3-part")
            return self._parts_pool

    def count(self, request_class: str) -> None:
        with self._count_lock:
            self._counts[request_class] += 1

    def _call(self, request_class: str, what: str, request: Callable[[], T]) -> T:
        """Run one request with retries: transient failures (throttling, 5xx, timeouts,
        resets, broken bodies) up to ``attempts`` times with jittered exponential backoff;
        an unreachable endpoint only ``CONNECT_ATTEMPTS`` times, so a down endpoint fails
        the command in seconds. Everything else fails at once, as an engine error."""
        refused = 0
        for attempt in range(1, self.settings.attempts + 1):
            self.count(request_class)
            try:
                return request()
            except Exception as exc:  # classified below; nothing is swallowed
                kind = _classify(exc)
                if kind == "unreachable":
                    refused += 1
                last_try = attempt == self.settings.attempts or refused >= CONNECT_ATTEMPTS
                if kind == "permanent" or last_try:
                    raise self._error(exc, what, attempt) from exc
            self.count("retries")
            time.sleep(random.uniform(0.5, 1.0) * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
        raise AssertionError("unreachable: the loop returns or raises")

    def _missing_bucket(self) -> str:
        return (f"no S3 bucket {self.bucket} at {self._client.meta.endpoint_url} "
                f"(create it first, or check --repo)")

    def _error(self, exc: Exception, what: str, attempts: int) -> Exception:
        import botocore.exceptions as boto

        where = f"{self._url} ({what})" if what not in (self.bucket, self._root) else self._url
        if isinstance(exc, boto.ClientError):
            code, status = _code(exc), _status(exc)
            message = exc.response.get("Error", {}).get("Message") or code
            if code == "NoSuchBucket":
                if self.repository:  # not an outage: no repository can be there
                    return RepositoryNotFound(self._missing_bucket())
                return BackendError(f"bucket {self.bucket!r} does not exist ({self.location})")
            if code in ("NoSuchKey", "NoSuchUpload", "404") or status == 404:
                return ObjectNotFound(f"{where}: no such object")
            if code in ("PreconditionFailed", "412") or status == 412:
                return _PreconditionFailed(f"{where}: precondition failed")
            if code in DENIED_CODES or status == 403:
                return BackendError(f"access denied to {self.location}: {message} (check the credentials "
                                    f"and the bucket policy)")
            if code == "NotImplemented" or status == 501:
                return _Unsupported(f"{where}: the service does not implement this request ({message})")
            if code in FULL_CODES:
                return StorageFull(f"{where}: storage full ({message})")
            if code == "InvalidRange" or status == 416:
                return BackendError(f"{where}: range beyond the object's end")
            tail = f" after {attempts} attempts" if attempts > 1 else ""
            return BackendError(f"{where}: {code} {message}{tail}")
        if isinstance(exc, boto.NoCredentialsError):
            return BackendError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                "(or CLUBSNAP_S3_ACCESS_KEY_ID/_SECRET_ACCESS_KEY, or a profile)")
        if _classify(exc) == "unreachable":
            return BackendError(f"cannot reach the S3 endpoint {self._client.meta.endpoint_url} "
                                f"({_reason(exc)}; {attempts} attempts)")
        if isinstance(exc, boto.BotoCoreError):
            return BackendError(f"{where}: {_reason(exc)} (after {attempts} attempts)")
        return BackendError(f"{where}: {exc.__class__.__name__}: {_reason(exc)} (after {attempts} attempts)")


class _PreconditionFailed(BackendError):
    """A conditional request's condition did not hold (internal: callers translate it)."""


class _Unsupported(BackendError):
    """The service lacks a request type (conditional writes on older S3-compatibles)."""


class ObjectReader(io.RawIOBase):
    """A readable stream over one object, never holding more than the caller asks for.

    The first GET fixes the object's ETag; if the connection breaks mid-body, reading
    resumes with a ranged GET from the current position that must match that ETag (an
    object replaced meanwhile fails the read instead of splicing two versions)."""

    def __init__(self, backend: S3Backend, key: str) -> None:
        super().__init__()
        self._backend, self._key = backend, key
        self._full = backend._key(key)
        self._position = 0
        self._body: Any = None
        self.etag: str | None = None
        self.size: int | None = None
        self._open()

    def _open(self) -> None:
        args: dict[str, Any] = {"Bucket": self._backend.bucket, "Key": self._full}
        if self.etag is not None:
            args["IfMatch"] = f'"{self.etag}"'
            args["Range"] = f"bytes={self._position}-"
        response = self._backend._call("get", self._full, lambda: self._backend._client.get_object(**args))
        etag = str(response.get("ETag", "")).strip('"')
        if self.etag is None:
            self.etag, self.size = etag, int(response["ContentLength"])
        elif etag != self.etag or not str(response.get("ContentRange", "")).startswith(f"bytes {self._position}-"):
            # A service that ignored If-Match or Range would splice two versions together.
            response["Body"].close()
            raise BackendError(f"{self._backend.url}/{self._key}: changed while being read")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        remaining = (self.size or 0) - self._position
        want = remaining if size is None or size < 0 else min(size, remaining)
        pieces = []
        failures = 0
        while want > 0:
            try:
                piece = self._body.read(want)
            except Exception as exc:
                if _classify(exc) == "permanent" or failures + 1 >= self._backend.settings.attempts:
                    raise self._backend._error(exc, self._full, failures + 1) from exc
                failures += 1
                self._backend.count("retries")
                self._body.close()
                self._open()
                continue
            if not piece:
                if failures + 1 >= self._backend.settings.attempts:
                    raise BackendError(f"{self._backend._url}/{self._key}: body ended early")
                failures += 1
                self._backend.count("retries")
                self._body.close()
                self._open()
                continue
            pieces.append(piece)
            self._position += len(piece)
            want -= len(piece)
        return b"".join(pieces)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        super().close()


def gcs_create_only(request: Any, **_: Any) -> None:
    """GCS's XML API honours ``If-None-Match`` on reads only; on an upload the
    create-if-absent condition is ``x-goog-if-generation-match: 0`` (GCS docs, "Request
    preconditions"). Registered on gs:// clients, before the request is signed."""
    if request.headers.get("If-None-Match") == "*":
        del request.headers["If-None-Match"]
        request.headers["x-goog-if-generation-match"] = "0"


def _make_client(settings: S3Settings, gcs: bool) -> Any:
    import botocore.exceptions

    try:
        return _build_client(settings, gcs)
    except (botocore.exceptions.BotoCoreError, ValueError) as exc:
        raise UsageError(f"S3 settings are not usable: {_reason(exc)}") from exc


def _build_client(settings: S3Settings, gcs: bool) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=settings.profile) if settings.profile else boto3.session.Session()
    config = Config(
        retries={"total_max_attempts": 1},  # ours: see the module docstring
        connect_timeout=settings.connect_timeout_s, read_timeout=settings.timeout_s,
        max_pool_connections=settings.connections + 2,
        s3={"addressing_style": settings.addressing},
        # The newer default CRC checksums are not understood by every S3-compatible
        # service (GCS interop among them); Content-MD5 is, and we send it ourselves.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )
    client = session.client("s3", endpoint_url=settings.endpoint, region_name=settings.region,
                            aws_access_key_id=settings.access_key_id,
                            aws_secret_access_key=settings.secret_access_key, config=config)
    if gcs:
        client.meta.events.register("before-sign.s3.PutObject", gcs_create_only)
    return client


def _classify(exc: BaseException) -> str:
    """``unreachable``, ``transient`` or ``permanent``."""
    import botocore.exceptions as boto

    if isinstance(exc, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ProxyConnectionError)):
        return "unreachable"
    if isinstance(exc, boto.ClientError):
        status = _status(exc)
        if _code(exc) == "NotImplemented" or status == 501:
            return "permanent"
        if status >= 500 or status in (408, 429) or _code(exc) in TRANSIENT_CODES:
            return "transient"
        return "permanent"
    if isinstance(exc, (boto.HTTPClientError, boto.IncompleteReadError, boto.ConnectionError)):
        return "transient"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 always ships with botocore
        return "permanent"
    return "transient" if isinstance(exc, Urllib3Error) else "permanent"


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return text[:200]


def _md5(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Regroup a stream of pieces into parts of exactly ``size`` bytes (the last shorter)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)
