"""How many files of a download are whole: every chunk holding a byte of them verified.

Many small files share a chunk and a large file spans many, so each chosen file counts
the chunks it still waits for (one 32-bit counter per file: 400 KB at 100,000 files); a
verified chunk counts down the files it holds a piece of. Empty files are whole at once.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection

from sfs.common.chunkmap import ChunkMap


class FilesDone:
    """`chunk_done(index)` once per verified chunk; `done` of `total` files are whole."""

    def __init__(self, chunks: ChunkMap, chosen: Collection[int] | None = None) -> None:
        """`chosen`: the file numbers (entry order, files only) fetched; None: all."""
        self._chunks = chunks
        self._waiting = array("I", bytes(4 * chunks.file_count))
        self.total = 0
        self.done = 0
        for file in range(chunks.file_count) if chosen is None else chosen:
            self.total += 1
            waits = len(chunks.chunks_of(file))
            self._waiting[file] = waits
            if not waits:
                self.done += 1

    def chunk_done(self, index: int) -> None:
        for piece in self._chunks.pieces(index):
            left = self._waiting[piece.file]
            if left:  # 0: a file not chosen (or a bug's second report: ignored)
                self._waiting[piece.file] = left - 1
                if left == 1:
                    self.done += 1
