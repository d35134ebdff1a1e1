"""Cutting byte streams into chunks.

Two methods, both streaming (memory stays bounded by one read buffer, whatever the file
size):

- ``cdc``: content-defined chunking (FastCDC, Cython) for tarballs, screenshots, dartdoc
  blobs. Boundaries follow content, so an insertion shifts only nearby chunks.
- ``fixed``: page-aligned fixed-size chunks for SQLite images. Nothing in a page image
  shifts, so fixed boundaries dedupe unchanged pages exactly (SQLITE_NOTES §2).

A file's entry records which method cut it, so that a restore can cut an existing target
file the same way and reuse the chunks it already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

READ_SIZE = 4 << 20  # must stay above cdc_max; bounds memory per reader thread


@dataclass(frozen=True)
class ChunkerParams:
    """How a repository cuts files; stored in the repository config."""

    cdc_min: int = 128 << 10
    cdc_avg: int = 512 << 10
    cdc_max: int = 2 << 20
    page_chunk: int = 16 << 10

    def to_record(self) -> dict[str, int]:
        return {"cdc_min": self.cdc_min, "cdc_avg": self.cdc_avg,
                "cdc_max": self.cdc_max, "page_chunk": self.page_chunk}

    @classmethod
    def from_record(cls, record: dict[str, int]) -> "ChunkerParams":
        return cls(**{key: int(record[key]) for key in cls().to_record()})


class ByteStream(Protocol):
    """What the chunkers read from: a file, or a bucket object's body."""

    def read(self, size: int = -1, /) -> bytes: ...


CDC = "cdc"
FIXED = "fixed"


def chunk_stream(stream: ByteStream, method: str, params: ChunkerParams) -> Iterator[bytes]:
    if method == FIXED:
        return fixed_chunks(stream, params.page_chunk)
    return cdc_chunks(stream, params)


def fixed_chunks(stream: ByteStream, size: int) -> Iterator[bytes]:
    while True:
        block = stream.read(size)
        if not block:
            return
        yield block


def cdc_chunks(stream: ByteStream, params: ChunkerParams) -> Iterator[bytes]:
    """FastCDC over a stream, giving the same cuts as FastCDC over the whole file.

    FastCDC decides a cut from at most ``cdc_max`` bytes after the chunk start, so a
    chunk is final once that many bytes (or EOF) follow its start in the buffer; the
    rest is carried into the next read.
    """
    # Imported on first use: the fastcdc package loads its command-line dependencies
    # (~35 ms), which a snapshot that finds every file unchanged never needs.
    from fastcdc.fastcdc_cy import fastcdc_cy

    carry = b""
    while True:
        block = stream.read(READ_SIZE)
        at_eof = not block
        buffer = carry + block if carry else block
        if not buffer:
            return
        carry = b""
        view = memoryview(buffer)
        for cut in fastcdc_cy(view, params.cdc_min, params.cdc_avg, params.cdc_max):
            if not at_eof and len(buffer) - cut.offset < params.cdc_max:
                carry = bytes(view[cut.offset:])
                break
            yield bytes(view[cut.offset:cut.offset + cut.length])
        if at_eof:
            return
