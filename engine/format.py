"""Every byte clubsnap keeps at rest: ids, object envelopes, pack layout, record encoding,
and the key names under which objects live in a backend.

``docs/format.md`` is the specification; ``tests/test_format.py`` checks that the
constants here match it. Change both together and bump ``FORMAT_VERSION`` when an old
reader could misread the new bytes.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from enum import IntEnum, IntFlag
from typing import Any, Self

import blake3
import lz4.block
import msgpack

from .crypto import PLAIN, Cipher
from .errors import IntegrityError, UnsupportedFormat

FORMAT_VERSION = 3  # 3: encryption, key slots, snapshot summaries
OLDEST_READABLE_VERSION = 1  # version 1 stored databases as chunk lists, not page maps
ID_SIZE = 32

OBJECT_MAGIC = b"CSNP"
PACK_MAGIC = b"CSPK"
PACK_FOOTER_MAGIC = b"CSPT"

# magic, format version, kind, flags, reserved
OBJECT_HEADER = struct.Struct("<4sBBBB")
# magic, format version, 3 reserved bytes
PACK_HEADER = struct.Struct("<4sB3x")
# random bytes between a pack's last blob and its trailer (docs/format.md §5)
PACK_NONCE_SIZE = 16
# trailer length, magic: the last 8 bytes of every pack
PACK_FOOTER = struct.Struct("<I4s")

# Compression must save at least this fraction, or the raw bytes are kept: tarballs and
# screenshots are already compressed and decompressing them again buys nothing.
MIN_COMPRESSION_GAIN = 0.03


class Kind(IntEnum):
    """What a sealed object holds; a reader refuses an object of the wrong kind."""

    CONFIG = 1
    INDEX = 2
    SNAPSHOT = 3
    PACK_TRAILER = 4
    SNAPSHOT_SUMMARY = 5
    KEY_SLOT = 6
    LOCK = 7
    GARBAGE = 8
    POLICY = 9
    VERIFICATION = 10
    DAMAGE = 11
    CHECK = 12


class Flag(IntFlag):
    """Per-object and per-blob flags. Unknown bits make a reader refuse the object."""

    LZ4 = 0x01
    ENCRYPTED = 0x02  # the payload is salt + AES-256-GCM ciphertext (engine/crypto.py)


KNOWN_FLAGS = Flag.LZ4 | Flag.ENCRYPTED


class BlobType(IntEnum):
    """Blobs in packs are file data or tree (directory listing) records."""

    DATA = 0
    TREE = 1


class ObjectId(bytes):
    """A 32-byte blake3 digest naming an immutable object."""

    __slots__ = ()  # no per-id __dict__: a database's page map holds one id per page

    def __new__(cls, value: bytes) -> Self:
        if len(value) != ID_SIZE:
            raise IntegrityError(f"malformed id of {len(value)} bytes")
        return super().__new__(cls, value)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        try:
            return cls(bytes.fromhex(text))
        except ValueError as exc:
            raise IntegrityError(f"malformed id {text!r}") from exc

    def short(self) -> str:
        return self.hex()[:8]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()[:16]}…)"


class ChunkId(ObjectId):
    """Id of a data or tree blob: blake3-256 of its plaintext."""

    __slots__ = ()


class PackId(ObjectId):
    """Id of a pack: blake3-256 of the pack's bytes as stored."""

    __slots__ = ()


class SnapshotId(ObjectId):
    """Id of a snapshot: blake3-256 of its encoded record."""

    __slots__ = ()


def display(path: bytes) -> str:
    """A path for messages and records: file names need not be UTF-8, so odd bytes are
    shown escaped (msgpack and terminals take only valid text)."""
    return path.decode("utf-8", "backslashreplace")


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


# ---- records ---------------------------------------------------------------------------

def pack_record(record: Any) -> bytes:
    """msgpack with pinned options: bin type for bytes, no timestamps or extension types."""
    packed: bytes = msgpack.packb(record, use_bin_type=True, strict_types=False, datetime=False)
    return packed


def unpack_record(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise IntegrityError(f"{what}: undecodable record ({exc})") from exc


# ---- compression, shared by objects and blobs ------------------------------------------

def _maybe_compress(raw: bytes) -> tuple[Flag, bytes]:
    if len(raw) < 64:
        return Flag(0), raw
    packed = lz4.block.compress(raw, store_size=True)
    if len(packed) <= len(raw) * (1 - MIN_COMPRESSION_GAIN):
        return Flag.LZ4, packed
    return Flag(0), raw


def _decompress(flags: int, payload: bytes | memoryview, what: str) -> bytes:
    if flags & ~int(KNOWN_FLAGS):
        raise UnsupportedFormat(f"{what}: unsupported flags 0x{flags:02x} (a newer format)")
    if not flags & Flag.LZ4:
        return bytes(payload)
    try:
        raw: bytes = lz4.block.decompress(payload)
        return raw
    except lz4.block.LZ4BlockError as exc:
        raise IntegrityError(f"{what}: corrupted compressed data") from exc


# ---- sealed objects (config, index, snapshot, pack trailer, summary, key slot) -------

def seal_object(kind: Kind, record: Any, cipher: Cipher = PLAIN) -> bytes:
    """Encode, compress, and with a keyed ``cipher`` encrypt (the header is the associated
    data: kind and flags cannot be changed unnoticed)."""
    flags, payload = _maybe_compress(pack_record(record))
    if cipher.encrypted:
        flags |= Flag.ENCRYPTED
    header = OBJECT_HEADER.pack(OBJECT_MAGIC, FORMAT_VERSION, kind, flags, 0)
    return header + (cipher.encrypt(payload, header) if cipher.encrypted else payload)


def object_flags(data: bytes) -> int:
    """An object's flags byte, read before deciding how to open it (config: is there a key?)."""
    if len(data) < OBJECT_HEADER.size:
        raise IntegrityError(f"truncated object ({len(data)} bytes)")
    return int(OBJECT_HEADER.unpack_from(data)[3])


def open_object(kind: Kind, data: bytes, what: str, cipher: Cipher = PLAIN) -> Any:
    """Check the envelope, authenticate and decrypt if encrypted, then decode; refuses
    what this build does not understand."""
    if len(data) < OBJECT_HEADER.size:
        raise IntegrityError(f"{what}: truncated object ({len(data)} bytes)")
    magic, version, found_kind, flags, _ = OBJECT_HEADER.unpack_from(data)
    if magic != OBJECT_MAGIC:
        raise IntegrityError(f"{what}: not a clubsnap object (bad magic)")
    if not OLDEST_READABLE_VERSION <= version <= FORMAT_VERSION:
        raise UnsupportedFormat(f"{what}: format version {version}, this clubsnap reads "
                                f"{OLDEST_READABLE_VERSION} to {FORMAT_VERSION}")
    if found_kind != kind:
        raise IntegrityError(f"{what}: expected a {kind.name.lower()} object, found kind {found_kind}")
    payload: bytes | memoryview = memoryview(data)[OBJECT_HEADER.size:]
    if flags & Flag.ENCRYPTED:
        payload = cipher.decrypt(payload, bytes(data[:OBJECT_HEADER.size]), what)
    elif cipher.encrypted:
        raise IntegrityError(f"{what}: not encrypted in an encrypted repository (replaced?)")
    return unpack_record(_decompress(flags & ~int(Flag.ENCRYPTED), payload, what), what)


# ---- blobs inside packs ----------------------------------------------------------------

def encode_blob(raw: bytes, blob_id: bytes = b"", cipher: Cipher = PLAIN) -> bytes:
    """One blob as stored in a pack: a flags byte, then raw or lz4 bytes, encrypted with a
    keyed ``cipher`` (flags and id as associated data)."""
    flags, payload = _maybe_compress(raw)
    if not cipher.encrypted:
        return bytes((flags,)) + payload
    if len(blob_id) != ID_SIZE:
        raise ValueError("an encrypted blob is bound to its id: give it")
    flags |= Flag.ENCRYPTED
    return bytes((flags,)) + cipher.encrypt(payload, bytes((flags,)) + blob_id)


def decode_blob(stored: bytes | memoryview, expected: ChunkId, what: str, cipher: Cipher = PLAIN) -> bytes:
    """Decode a stored blob and prove it is the one asked for (hash check on every read)."""
    if len(stored) < 1:
        raise IntegrityError(f"{what}: empty blob {expected.short()}")
    flags = stored[0]
    payload: bytes | memoryview = memoryview(stored)[1:]
    if flags & Flag.ENCRYPTED:
        payload = cipher.decrypt(payload, bytes((flags,)) + expected, f"{what}: blob {expected.short()}")
    elif cipher.encrypted:
        raise IntegrityError(f"{what}: blob {expected.short()} is not encrypted in an encrypted repository")
    raw = _decompress(flags & ~int(Flag.ENCRYPTED), payload, what)
    if cipher.chunk_id(raw) != expected:
        raise IntegrityError(f"{what}: blob {expected.short()} fails its hash check")
    return raw


# ---- key names ---------------------------------------------------------------------------

CONFIG_KEY = "config"
DATA_PREFIX = "data/"
INDEX_PREFIX = "index/"
SNAPSHOT_PREFIX = "snapshots/"
SUMMARY_PREFIX = "summaries/"
KEYS_PREFIX = "keys/"
LOCKS_PREFIX = "locks/"
GARBAGE_PREFIX = "garbage/"
POLICY_PREFIX = "policies/"
VERIFICATION_PREFIX = "verifications/"
DAMAGE_PREFIX = "damage/"
CHECK_PREFIX = "checks/"
SNAPSHOT_STAMP = "%Y%m%dT%H%M%S.%fZ"


def pack_key(pack: PackId) -> str:
    return f"{DATA_PREFIX}{pack.hex()[:2]}/{pack.hex()}"


def index_key(name: bytes) -> str:
    return f"{INDEX_PREFIX}{name.hex()}"


def snapshot_key(time: datetime, snap: SnapshotId) -> str:
    """Snapshot keys start with their UTC time, so a LIST alone orders them by time."""
    stamp = time.astimezone(timezone.utc).strftime(SNAPSHOT_STAMP)
    return f"{SNAPSHOT_PREFIX}{stamp}_{snap.hex()}"


def summary_key(newest: datetime, summary: bytes) -> str:
    """Summary keys start with the time of the newest snapshot they hold: the greatest
    key is the most complete summary."""
    stamp = newest.astimezone(timezone.utc).strftime(SNAPSHOT_STAMP)
    return f"{SUMMARY_PREFIX}{stamp}_{summary.hex()}"


def parse_snapshot_key(key: str) -> tuple[datetime, SnapshotId]:
    name = key.rsplit("/", 1)[-1]
    try:
        stamp, hexid = name.split("_", 1)
        time = datetime.strptime(stamp, SNAPSHOT_STAMP).replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise IntegrityError(f"{key}: malformed snapshot key") from exc
    return time, SnapshotId.from_hex(hexid)
