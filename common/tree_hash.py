"""The hash recipe of version 2 trees: BLAKE3-256 (PyPI `blake3`, which releases the GIL
on large inputs) for chunks and index pages. Callers pick nothing."""

from __future__ import annotations

from blake3 import blake3

TREE_HASH_SIZE = 32


def blake3_256(data: bytes | bytearray | memoryview) -> bytes:
    return blake3(data).digest()
