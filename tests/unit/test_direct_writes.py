"""sfs.peer.direct_writes: chunks written past the page cache where the file system
allows, through it where not, and the same bytes either way."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from sfs.peer import direct_writes
from sfs.peer.direct_writes import ALIGN, ChunkBuffers, ChunkWriter, is_aligned_buffer

CHUNK = 64 * 1024


def written(tmp_path: Path, pieces: list[tuple[int, bytes]]) -> tuple[bytes, bool]:
    path = tmp_path / "file.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    writer = ChunkWriter(fd, CHUNK)
    try:
        for offset, data in pieces:
            writer.write(data, offset)
        direct = writer.direct
    finally:
        writer.close()
        os.close(fd)
    return path.read_bytes(), direct


def test_chunks_land_at_their_offsets_with_an_unaligned_last_chunk(tmp_path: Path) -> None:
    chunks = [os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(ALIGN + 123)]
    # Out of order, as several holders deliver them.
    content, _ = written(tmp_path, [(2 * CHUNK, chunks[2]), (0, chunks[0]), (CHUNK, chunks[1])])
    assert content == b"".join(chunks)


def test_a_last_chunk_shorter_than_a_block_is_written_whole(tmp_path: Path) -> None:
    chunks = [os.urandom(CHUNK), os.urandom(100)]
    content, _ = written(tmp_path, [(0, chunks[0]), (CHUNK, chunks[1])])
    assert content == b"".join(chunks)


def test_a_chunk_size_that_is_not_whole_blocks_is_written_through_the_cache(
    tmp_path: Path,
) -> None:
    fd = os.open(tmp_path / "file.part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = ChunkWriter(fd, CHUNK + 1)
        assert not writer.direct
        writer.write(b"x" * (CHUNK + 1), 0)
        writer.close()
    finally:
        os.close(fd)
    assert (tmp_path / "file.part").read_bytes() == b"x" * (CHUNK + 1)


def test_a_refused_direct_write_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if _is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", pwrite)
    chunks = [os.urandom(CHUNK), os.urandom(CHUNK)]
    content, direct = written(tmp_path, [(0, chunks[0]), (CHUNK, chunks[1])])
    assert content == b"".join(chunks)
    assert not direct
    if not refused:
        pytest.skip("this file system takes no O_DIRECT: nothing to refuse")
    assert len(refused) == 1  # after one refusal, no more direct attempts


def test_a_full_disk_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_writes.os, "pwrite", pwrite)
    with pytest.raises(OSError) as raised:
        written(tmp_path, [(0, os.urandom(CHUNK))])
    assert raised.value.errno == errno.ENOSPC


def test_chunks_go_past_the_page_cache_where_the_file_system_allows(tmp_path: Path) -> None:
    if not _takes_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT")
    chunks = [os.urandom(CHUNK), os.urandom(ALIGN + 1)]
    content, direct = written(tmp_path, [(0, chunks[0]), (CHUNK, chunks[1])])
    assert direct
    assert content == b"".join(chunks)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _takes_direct(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    return True


# --- chunks decrypted into aligned buffers ------------------------------------------------


def test_a_buffer_is_reused_once_given_back_and_none_past_the_limit() -> None:
    buffers = ChunkBuffers(CHUNK, limit=2)
    first, second = buffers.take(), buffers.take()
    assert first is not None and second is not None
    assert buffers.take() is None  # the caller allocates
    buffers.give(first[:100])  # a view from its start gives the whole buffer back
    again = buffers.take()
    assert again is not None and again.obj is first.obj and len(again) == CHUNK


def test_only_the_start_of_a_pool_buffer_is_written_without_a_copy() -> None:
    buffers = ChunkBuffers(CHUNK, limit=1)
    view = buffers.take()
    assert view is not None
    assert is_aligned_buffer(view) and is_aligned_buffer(view[:ALIGN])
    assert not is_aligned_buffer(view[1:])  # not where the page starts
    assert not is_aligned_buffer(memoryview(bytearray(CHUNK)))
    assert not is_aligned_buffer(b"x" * CHUNK)
    buffers.give(view[1:])  # not a buffer's start: ignored
    assert buffers.take() is None


def test_a_chunk_in_a_pool_buffer_lands_at_its_offset(tmp_path: Path) -> None:
    buffers = ChunkBuffers(CHUNK, limit=2)
    chunks = [os.urandom(CHUNK), os.urandom(ALIGN + 5)]
    pieces = []
    for offset, data in ((0, chunks[0]), (CHUNK, chunks[1])):
        view = buffers.take()
        assert view is not None
        view[: len(data)] = data
        pieces.append((offset, view[: len(data)]))
    content, _ = written(tmp_path, pieces)  # type: ignore[arg-type]
    assert content == b"".join(chunks)
