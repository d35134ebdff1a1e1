"""Range coalescing for restores: every blob fetched once, waste bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.format import BlobType, ChunkId, PackId
from engine.packs import BlobEntry, coalesce

PACK = PackId(b"\x01" * 32)


def _entries(layout: list[tuple[int, int]]) -> list[BlobEntry]:
    """Blobs laid out back to back after the given gaps, with the given lengths."""
    entries, offset = [], 8
    for number, (gap, length) in enumerate(layout):
        offset += gap
        entries.append(BlobEntry(ChunkId(number.to_bytes(32, "big")), BlobType.DATA, PACK, offset, length, length))
        offset += length
    return entries


@given(st.lists(st.tuples(st.integers(0, 300_000), st.integers(1, 600_000)), min_size=1, max_size=60),
       st.data())
def test_every_blob_once_and_waste_bounded(layout: list[tuple[int, int]], data: st.DataObject) -> None:
    entries = _entries(layout)
    wanted = data.draw(st.lists(st.sampled_from(entries), min_size=1, unique_by=lambda e: e.id))
    ranges = coalesce(wanted, max_gap=256 << 10, max_waste=0.25)
    members = [m for _, _, group in ranges for m in group]
    assert sorted(m.id for m in members) == sorted(e.id for e in wanted)
    previous_end = 0
    for start, end, group in ranges:
        assert start >= previous_end and all(start <= m.offset and m.offset + m.length <= end for m in group)
        needed = sum(m.length for m in group)
        assert end - start - needed <= 0.25 * needed
        previous_end = end


def test_scattered_pages_are_not_dragged_in_but_neighbours_are_merged() -> None:
    entries = _entries([(0, 1500)] * 200)  # compressed pages, back to back
    wanted = entries[::20]  # one page in twenty
    assert len(coalesce(wanted)) == len(wanted)
    assert coalesce(entries) == [(8, 8 + 200 * 1500, entries)]
