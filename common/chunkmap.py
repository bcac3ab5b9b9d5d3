"""How a tree's file bytes map to chunks (docs/PROTOCOL-v2.md section 3), as BitTorrent
v1 maps files to pieces: the files' contents, in entry order, form one stream cut into
fixed chunks. Many small files share a chunk; a large file spans many.

Pure arithmetic over the file sizes: no I/O, no hashing. Files are numbered in entry
order (folders and links hold no bytes and are not numbered here).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from sfs.common.errors import IntegrityError


@dataclass(frozen=True)
class Piece:
    """`length` bytes of file number `file`, from `offset` in that file."""

    file: int
    offset: int
    length: int


def chunk_count_of(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


class ChunkMap:
    """Stream offsets of every file, and the chunks and pieces between them.

    Offsets live in one `array` of 64-bit integers: 800 KB at 100,000 files, where a
    list of Python ints would take about four times that.
    """

    def __init__(self, sizes: Iterable[int], chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.chunk_size = chunk_size
        self._starts = array("q", [0])  # _starts[i] = stream offset of file i; last = total
        for size in sizes:
            if size < 0:
                raise ValueError("a file size cannot be negative")
            self._starts.append(self._starts[-1] + size)

    @property
    def file_count(self) -> int:
        return len(self._starts) - 1

    @property
    def size(self) -> int:
        return self._starts[-1]

    @property
    def chunk_count(self) -> int:
        return chunk_count_of(self.size, self.chunk_size)

    def file_range(self, file: int) -> tuple[int, int]:
        """The stream range [start, end) of one file's bytes."""
        return self._starts[file], self._starts[file + 1]

    def chunk_range(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"no chunk {index}")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def chunk_length(self, index: int) -> int:
        start, end = self.chunk_range(index)
        return end - start

    def pieces(self, index: int) -> list[Piece]:
        """The (file, offset, length) pieces that tile chunk `index`, in stream order.
        Empty files hold no bytes, so they appear in no piece."""
        start, end = self.chunk_range(index)
        # The last file whose start is <= start: bisect over starts (the final entry is
        # the total, which no chunk start reaches).
        file = bisect_right(self._starts, start, 0, self.file_count) - 1
        result: list[Piece] = []
        position = start
        while position < end:
            file_start, file_end = self.file_range(file)
            if file_end > position:
                length = min(file_end, end) - position
                result.append(Piece(file, position - file_start, length))
                position += length
            file += 1
        return result

    def chunks_of(self, file: int) -> range:
        """The chunks holding any byte of one file (empty for an empty file)."""
        start, end = self.file_range(file)
        if start == end:
            return range(0)
        return range(start // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def chunks_for(self, files: Iterable[int]) -> list[int]:
        """The sorted chunks to fetch for a set of files (`get --include`): every chunk
        holding a byte of a chosen file, and no other."""
        chosen: set[int] = set()
        for file in files:
            chosen.update(self.chunks_of(file))
        return sorted(chosen)

    def check_chunk_count(self, chunk_count: int) -> None:
        """Raise `IntegrityError` unless the header's chunk count fits the sizes."""
        if chunk_count != self.chunk_count:
            raise IntegrityError(
                f"the entry list's sizes make {self.chunk_count} chunks of "
                f"{self.chunk_size} bytes; the header says {chunk_count}"
            )
