"""sfs.common.chunkmap: files in one stream, cut into fixed chunks (BitTorrent v1 pieces)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfs.common.chunkmap import ChunkMap, Piece, chunk_count_of
from sfs.common.errors import IntegrityError

sizes_lists = st.lists(st.integers(0, 40), max_size=25)
chunk_sizes = st.integers(1, 16)


def test_small_files_share_chunks() -> None:
    # 20,000 files of 4 KiB in 1 MiB chunks: 79 chunks, not 20,000.
    cmap = ChunkMap([4096] * 20_000, 1024 * 1024)
    assert cmap.chunk_count == 79
    assert len(cmap.pieces(0)) == 256


def test_pieces_of_a_chunk_across_files() -> None:
    cmap = ChunkMap([3, 0, 5, 2], 4)
    assert cmap.chunk_count == 3
    assert cmap.pieces(0) == [Piece(0, 0, 3), Piece(2, 0, 1)]
    assert cmap.pieces(1) == [Piece(2, 1, 4)]
    assert cmap.pieces(2) == [Piece(3, 0, 2)]
    assert cmap.chunks_of(1) == range(0)
    assert cmap.chunks_for([3]) == [2]
    assert cmap.chunks_for([0, 1]) == [0]


def test_empty_stream_has_no_chunks() -> None:
    cmap = ChunkMap([0, 0], 4)
    assert cmap.chunk_count == 0
    with pytest.raises(IndexError):
        cmap.pieces(0)
    cmap.check_chunk_count(0)


def test_chunk_count_must_match_the_header() -> None:
    cmap = ChunkMap([10], 4)
    cmap.check_chunk_count(3)
    with pytest.raises(IntegrityError, match="make 3 chunks of 4 bytes; the header says 2"):
        cmap.check_chunk_count(2)


def test_negative_sizes_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ChunkMap([-1], 4)


@settings(max_examples=150)
@given(sizes_lists, chunk_sizes)
def test_every_byte_of_every_file_lies_in_exactly_one_piece(
    sizes: list[int], chunk_size: int
) -> None:
    cmap = ChunkMap(sizes, chunk_size)
    assert cmap.chunk_count == chunk_count_of(sum(sizes), chunk_size)
    seen: dict[tuple[int, int], int] = {}
    for index in range(cmap.chunk_count):
        for piece in cmap.pieces(index):
            assert piece.length > 0
            for offset in range(piece.offset, piece.offset + piece.length):
                key = (piece.file, offset)
                assert key not in seen
                seen[key] = index
    expected = {(file, offset) for file, size in enumerate(sizes) for offset in range(size)}
    assert set(seen) == expected
    # And each file's chunks are exactly the chunks its pieces came from.
    for file in range(len(sizes)):
        assert sorted({seen[k] for k in seen if k[0] == file}) == list(cmap.chunks_of(file))


@settings(max_examples=150)
@given(sizes_lists, chunk_sizes)
def test_pieces_of_a_chunk_tile_it(sizes: list[int], chunk_size: int) -> None:
    cmap = ChunkMap(sizes, chunk_size)
    for index in range(cmap.chunk_count):
        start, end = cmap.chunk_range(index)
        position = start
        for piece in cmap.pieces(index):
            file_start, _ = cmap.file_range(piece.file)
            assert file_start + piece.offset == position
            position += piece.length
        assert position == end
        assert end - start == cmap.chunk_length(index)
        assert cmap.chunk_length(index) == chunk_size or index == cmap.chunk_count - 1


def _runs(chosen: set[int], count: int) -> int:
    """Runs of consecutive chosen file numbers."""
    return sum(1 for i in range(count) if i in chosen and (i - 1) not in chosen)


@settings(max_examples=150)
@given(sizes_lists, chunk_sizes, st.data())
def test_include_sets_cover_the_chosen_files_and_at_most_the_edge_chunks(
    sizes: list[int], chunk_size: int, data: st.DataObject
) -> None:
    cmap = ChunkMap(sizes, chunk_size)
    chosen = data.draw(st.sets(st.integers(0, max(len(sizes) - 1, 0))) if sizes else st.just(set()))
    chunks = cmap.chunks_for(chosen)
    assert chunks == sorted(set(chunks))
    # Covers every byte of every chosen file...
    for file in chosen:
        assert set(cmap.chunks_of(file)) <= set(chunks)
    # ...and holds nothing but chunks with a chosen byte in them.
    shared = 0
    for index in chunks:
        files = {piece.file for piece in cmap.pieces(index)}
        assert files & chosen
        shared += bool(files - chosen)
    # A chunk shared with files not chosen is an edge of a run of chosen files.
    assert shared <= 2 * _runs(chosen, len(sizes))
