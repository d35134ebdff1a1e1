"""Pack objects: many encoded blobs in one backend object, with a trailer describing them.

A pack is ``header | blob* | trailer | footer``. The trailer lists every blob (id, type,
offset, length, raw length) as a sealed object, so an index can always be rebuilt from
the packs alone; the fixed footer at the end says where the trailer starts. Restores read
byte ranges of packs, never whole packs unless they need every blob in them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Iterable

from .backend import Backend
from .errors import IntegrityError, UnsupportedFormat
from .crypto import PLAIN, Cipher
from .format import (
    FORMAT_VERSION, OLDEST_READABLE_VERSION, PACK_FOOTER, PACK_FOOTER_MAGIC, PACK_HEADER, PACK_MAGIC, PACK_NONCE_SIZE,
    BlobType, ChunkId, Kind, PackId, decode_blob, digest, open_object, pack_key, seal_object,
)

# Big enough that S3 request counts stay low, small enough to hold one in memory per
# blob type while it fills.
TARGET_PACK_SIZE = 16 << 20


@dataclass(frozen=True, slots=True)  # a restore holds one per chunk: hundreds of thousands
class BlobEntry:
    """Where one blob lives: the index's unit of information."""

    id: ChunkId
    type: BlobType
    pack: PackId
    offset: int
    length: int
    raw_length: int

    def to_row(self) -> list[object]:
        return [bytes(self.id), int(self.type), self.offset, self.length, self.raw_length]

    @classmethod
    def from_row(cls, pack: PackId, row: list[Any]) -> "BlobEntry":
        try:
            blob_id, blob_type, offset, length, raw_length = row
            return cls(ChunkId(blob_id), BlobType(blob_type), pack, int(offset), int(length), int(raw_length))
        except (TypeError, ValueError) as exc:
            raise IntegrityError(f"{pack_key(pack)}: malformed blob entry ({exc})") from exc


class PackBuilder:
    """Accumulates encoded blobs of one type until the pack is big enough to upload."""

    def __init__(self, blob_type: BlobType, cipher: Cipher = PLAIN) -> None:
        self.blob_type = blob_type
        self.cipher = cipher
        self._buffer = bytearray(PACK_HEADER.pack(PACK_MAGIC, FORMAT_VERSION))
        self._rows: list[tuple[ChunkId, int, int, int]] = []

    def add(self, blob_id: ChunkId, encoded: bytes, raw_length: int) -> None:
        self._rows.append((blob_id, len(self._buffer), len(encoded), raw_length))
        self._buffer += encoded

    @property
    def size(self) -> int:
        return len(self._buffer)

    def __len__(self) -> int:
        return len(self._rows)

    def finish(self) -> tuple[PackId, bytearray, list[BlobEntry]]:
        """Close the pack; the buffer is handed over, not copied (packs are 16 MiB)."""
        rows = [[bytes(i), int(self.blob_type), off, ln, raw] for i, off, ln, raw in self._rows]
        trailer = seal_object(Kind.PACK_TRAILER, rows, self.cipher)
        # Random bytes no blob covers: two writes of the same blobs in the same order are
        # two packs, never one id (prune deletes packs by id: format §10).
        self._buffer += secrets.token_bytes(PACK_NONCE_SIZE)
        self._buffer += trailer
        self._buffer += PACK_FOOTER.pack(len(trailer), PACK_FOOTER_MAGIC)
        data = self._buffer
        pack_id = PackId(digest(data))
        entries = [BlobEntry(i, self.blob_type, pack_id, off, ln, raw) for i, off, ln, raw in self._rows]
        return pack_id, data, entries


def read_trailer(backend: Backend, pack_id: PackId, size: int, cipher: Cipher = PLAIN) -> list[BlobEntry]:
    """The blob list of a pack, from its trailer: two ranged reads, never the whole pack."""
    key = pack_key(pack_id)
    if size < PACK_HEADER.size + PACK_FOOTER.size:
        raise IntegrityError(f"{key}: too short to be a pack")
    trailer_length, magic = PACK_FOOTER.unpack(backend.get(key, size - PACK_FOOTER.size, PACK_FOOTER.size))
    start = size - PACK_FOOTER.size - trailer_length
    if magic != PACK_FOOTER_MAGIC or start < PACK_HEADER.size:
        raise IntegrityError(f"{key}: damaged pack footer")
    rows = open_object(Kind.PACK_TRAILER, backend.get(key, start, trailer_length), key, cipher)
    return [BlobEntry.from_row(pack_id, row) for row in rows]


def verify_pack(data: bytes, pack_id: PackId, cipher: Cipher = PLAIN) -> list[BlobEntry]:
    """Check a whole pack read back from storage: its hash, header, trailer and blobs."""
    key = pack_key(pack_id)
    if digest(data) != pack_id:
        raise IntegrityError(f"{key}: pack content does not match its name (corrupted)")
    if len(data) < PACK_HEADER.size + PACK_FOOTER.size:
        raise IntegrityError(f"{key}: too short to be a pack")
    magic, version = PACK_HEADER.unpack_from(data)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{key}: bad pack magic")
    if not OLDEST_READABLE_VERSION <= version <= FORMAT_VERSION:
        raise UnsupportedFormat(f"{key}: pack format version {version}, this clubsnap reads "
                                f"{OLDEST_READABLE_VERSION} to {FORMAT_VERSION}")
    entries = trailer_of(data, pack_id, cipher)
    for entry in entries:  # each blob authenticated (when encrypted) and hash-checked
        decode_blob(memoryview(data)[entry.offset:entry.offset + entry.length], entry.id, key, cipher)
    return entries


def trailer_of(data: bytes, pack_id: PackId, cipher: Cipher = PLAIN) -> list[BlobEntry]:
    """The blob list in the trailer of a pack read whole (or as much of it as is stored)."""
    key = pack_key(pack_id)
    if len(data) < PACK_HEADER.size + PACK_FOOTER.size:
        raise IntegrityError(f"{key}: too short to be a pack")
    trailer_length, magic = PACK_FOOTER.unpack_from(data, len(data) - PACK_FOOTER.size)
    start = len(data) - PACK_FOOTER.size - trailer_length
    if magic != PACK_FOOTER_MAGIC or start < PACK_HEADER.size:
        raise IntegrityError(f"{key}: damaged pack footer")
    rows = open_object(Kind.PACK_TRAILER, data[start:len(data) - PACK_FOOTER.size], key, cipher)
    return [BlobEntry.from_row(pack_id, row) for row in rows]


def coalesce(entries: Iterable[BlobEntry], max_gap: int = 256 << 10, max_waste: float = 0.25,
             max_range: int = 4 << 20) -> list[tuple[int, int, list[BlobEntry]]]:
    """Group blobs of one pack into byte ranges to fetch: fewer requests, little waste.

    A blob joins the previous range when the gap before it is at most ``max_gap``, the
    range's unneeded bytes stay within ``max_waste`` of its needed bytes, and the range
    stays within ``max_range`` (what a restore holds in memory at once): scattered
    database pages are then fetched one by one rather than dragging whole pack stretches
    along, while runs of neighbours still come in one request.
    """
    ranges: list[tuple[int, int, list[BlobEntry]]] = []
    needed = waste = 0
    for entry in sorted(entries, key=lambda e: e.offset):
        if ranges:
            start, end, members = ranges[-1]
            gap = max(0, entry.offset - end)
            if (gap <= max_gap and waste + gap <= max_waste * (needed + entry.length)
                    and entry.offset + entry.length - start <= max_range):
                members.append(entry)
                ranges[-1] = (start, max(end, entry.offset + entry.length), members)
                needed, waste = needed + entry.length, waste + gap
                continue
        ranges.append((entry.offset, entry.offset + entry.length, [entry]))
        needed, waste = entry.length, 0
    return ranges
