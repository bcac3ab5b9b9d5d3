"""Chunk writes that go straight to the disk (`O_DIRECT`), past the page cache.

Why: a download is fsynced before it is named, so its bytes must reach the disk anyway,
and copying them into the page cache first is most of a `get`'s kernel time. Measured
on the 2-core VM (`dd`, 1 GiB, page cache pages fresh, as for a command started cold):
through the page cache and fsync 2.1 s, of which 1.6 s kernel time; `O_DIRECT` 0.7 s,
0.1 s kernel time. A chunk goes out of a page-aligned buffer that each writing thread
keeps for the whole download, or straight from the `ChunkBuffers` buffer the chunk was
decrypted into; only the whole 4 KiB blocks of a chunk go direct, and a last chunk's
tail is written through the ordinary descriptor.

Where the file system refuses `O_DIRECT` (tmpfs, some network file systems), or a write
says it cannot be done direct (`EINVAL`), every write goes through the page cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading

ALIGN = 4096  # offsets, lengths and buffers of direct writes are multiples of this


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`. A write may take only part of it (near a size
    limit or a full disk, say); the next one then says why, or takes the rest."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "the file system accepted no data")
        view, offset = view[written:], offset + written


class ChunkBuffers:
    """Page-aligned buffers of a chunk's size, for chunks decrypted straight into them
    (`crypto.ChunkCipher.open_into`) and written from there without a copy. `take`
    never waits: with `limit` buffers out it returns None (the caller allocates).
    Thread-safe."""

    def __init__(self, chunk_size: int, limit: int) -> None:
        self._chunk_size = chunk_size
        self._limit = limit
        self._made = 0
        self._free: list[memoryview] = []
        self._lock = threading.Lock()

    def take(self) -> memoryview | None:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._made >= self._limit:
                return None
            self._made += 1
        return memoryview(mmap.mmap(-1, self._chunk_size))

    def give(self, view: bytes | memoryview) -> None:
        """Return a buffer `take` gave (or a view from its start); anything else is
        ignored, so a caller may hand back whatever it got from `open`."""
        if isinstance(view, memoryview) and is_aligned_buffer(view):
            whole = memoryview(view.obj)
            if len(whole) == self._chunk_size:
                with self._lock:
                    self._free.append(whole)


def is_aligned_buffer(data: bytes | memoryview) -> bool:
    """Whether `data` is the start of a page-aligned buffer (an anonymous mapping)."""
    if not (isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap)):
        return False
    if data.readonly or not data.c_contiguous or not len(data):
        return False
    start = ctypes.addressof(ctypes.c_char.from_buffer(data.obj))
    return ctypes.addressof(ctypes.c_char.from_buffer(data)) == start


class ChunkWriter:
    """Writes chunks of `chunk_size` bytes at their offsets into the open file `fd`,
    direct where it can. `write` is safe from several threads, each with its own
    buffer; `close` (which closes only what it opened) is not, while a write is under
    way."""

    def __init__(self, fd: int, chunk_size: int) -> None:
        self._fd = fd
        self._chunk_size = chunk_size
        self._direct = -1
        self._refused = False  # a direct write was refused: the page cache from then on
        self._buffers = threading.local()
        if chunk_size % ALIGN == 0 and hasattr(os, "O_DIRECT"):
            # The same file (the open descriptor's inode), opened again with O_DIRECT. No
            # /proc, or a file system without O_DIRECT: the page cache only.
            with contextlib.suppress(OSError):
                self._direct = os.open(
                    f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
                )

    @property
    def direct(self) -> bool:
        return self._direct >= 0 and not self._refused

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """Write `data` at `offset`; raises `OSError` (a full disk, say). Data in a
        `ChunkBuffers` buffer is written from there, other data copied first."""
        rest = memoryview(data)
        whole = len(rest) - len(rest) % ALIGN
        if self.direct and whole and offset % ALIGN == 0:
            buffer = rest if is_aligned_buffer(data) else self._buffer()
            if buffer is not rest:
                buffer[:whole] = rest[:whole]
            try:
                done = os.pwrite(self._direct, buffer[:whole], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refused = True  # this file system takes no direct writes after all
                done = 0
            rest, offset = rest[done:], offset + done
        pwrite_all(self._fd, rest, offset)

    def _buffer(self) -> memoryview:
        buffer: memoryview | None = getattr(self._buffers, "view", None)
        if buffer is None:  # page-aligned, reused for every chunk this thread writes
            self._buffers.map = mmap.mmap(-1, self._chunk_size)
            buffer = self._buffers.view = memoryview(self._buffers.map)
        return buffer

    def close(self) -> None:
        """Close the direct descriptor (the caller closes `fd`)."""
        direct, self._direct = self._direct, -1
        if direct >= 0:
            os.close(direct)
