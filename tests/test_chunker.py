"""Chunking: streaming must cut exactly where whole-buffer FastCDC cuts."""

from __future__ import annotations

import io
import os

from fastcdc.fastcdc_cy import fastcdc_cy
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chunker import READ_SIZE, ChunkerParams, cdc_chunks, fixed_chunks

SMALL = ChunkerParams(cdc_min=1024, cdc_avg=4096, cdc_max=16384, page_chunk=4096)


def _reference(data: bytes, p: ChunkerParams) -> list[bytes]:
    return [data[c.offset:c.offset + c.length] for c in fastcdc_cy(data, p.cdc_min, p.cdc_avg, p.cdc_max)]


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=200_000), st.sampled_from([SMALL.cdc_max, 20_000, 65_536]))
def test_streaming_cdc_matches_whole_buffer(data: bytes, read_size: int) -> None:
    """Small read sizes force many carries across buffer boundaries."""
    import engine.chunker

    original = engine.chunker.READ_SIZE
    engine.chunker.READ_SIZE = read_size
    try:
        assert list(cdc_chunks(io.BytesIO(data), SMALL)) == _reference(data, SMALL)
    finally:
        engine.chunker.READ_SIZE = original


def test_streaming_cdc_across_read_buffers() -> None:
    data = os.urandom(READ_SIZE * 2 + 12345)
    params = ChunkerParams()
    chunks = list(cdc_chunks(io.BytesIO(data), params))
    assert b"".join(chunks) == data
    assert chunks == _reference(data, params)
    assert all(len(c) <= params.cdc_max for c in chunks)


def test_insertion_shifts_only_nearby_chunks() -> None:
    data = os.urandom(400_000)
    edited = data[:200_000] + b"inserted" + data[200_000:]
    before = set(cdc_chunks(io.BytesIO(data), SMALL))
    after = list(cdc_chunks(io.BytesIO(edited), SMALL))
    assert sum(c not in before for c in after) <= 3


def test_fixed_chunks_are_page_aligned() -> None:
    data = os.urandom(4096 * 5 + 100)
    chunks = list(fixed_chunks(io.BytesIO(data), 4096))
    assert [len(c) for c in chunks] == [4096] * 5 + [100]
