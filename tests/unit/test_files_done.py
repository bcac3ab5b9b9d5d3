"""sfs.peer.files_done: files whole as chunks are verified, in any order."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from sfs.common.chunkmap import ChunkMap
from sfs.peer.files_done import FilesDone


def test_small_files_sharing_a_chunk_are_whole_with_it() -> None:
    chunks = ChunkMap([10, 10, 10, 100], 32)  # chunk 0: files 0-2 and 2 bytes of file 3
    files = FilesDone(chunks)
    assert (files.done, files.total) == (0, 4)
    files.chunk_done(0)
    assert files.done == 3
    for index in range(1, chunks.chunk_count - 1):
        files.chunk_done(index)
    assert files.done == 3  # the big file waits for its last chunk
    files.chunk_done(chunks.chunk_count - 1)
    assert files.done == 4


def test_empty_files_are_whole_at_once_and_only_chosen_files_count() -> None:
    chunks = ChunkMap([0, 50, 0, 50], 32)
    assert FilesDone(chunks).done == 2
    chosen = FilesDone(chunks, chosen=[3])
    assert (chosen.done, chosen.total) == (0, 1)
    chosen.chunk_done(0)  # file 1 only: not chosen
    chosen.chunk_done(1)  # the end of file 1 and the start of file 3
    assert chosen.done == 0
    chosen.chunk_done(2)
    chosen.chunk_done(3)
    assert (chosen.done, chosen.total) == (1, 1)


@given(
    st.lists(st.integers(0, 200), max_size=40),
    st.integers(1, 64),
    st.randoms(use_true_random=False),
)
def test_every_file_is_whole_exactly_when_its_chunks_are(
    sizes: list[int], chunk_size: int, rng: random.Random
) -> None:
    chunks = ChunkMap(sizes, chunk_size)
    files = FilesDone(chunks)
    order = list(range(chunks.chunk_count))
    rng.shuffle(order)
    verified: set[int] = set()
    for index in order:
        files.chunk_done(index)
        verified.add(index)
        whole = sum(1 for f in range(len(sizes)) if set(chunks.chunks_of(f)) <= verified)
        assert files.done == whole
    assert files.done == files.total == len(sizes)
