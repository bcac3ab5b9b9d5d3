"""Keeping freed chunk buffers in the process, for reuse (glibc's allocator).

Every chunk passes through a few buffers of its size (the frame ZeroMQ delivers, the
plaintext, the sealed chunk), allocated and freed by different threads. With glibc's
default settings much of that memory goes back to the kernel when freed and comes back as
fresh pages: about 150,000 page faults per GiB downloaded (`get`), 57,000 per GiB served
(`serve`). Raising the two thresholds below keeps it in the heap (11,000 faults per GiB in
`get`, about 0.25 s less system time: docs/PERFORMANCE.md, "Engine v2, part 4"). The
memory is kept, not handed back between chunks: `get`'s peak RSS is the same, `serve`'s
about 10 MiB higher (72 MiB at 4 GiB).
"""

from __future__ import annotations

import ctypes
import sys

from sfs.common.manifest import MAX_CHUNK_SIZE

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations below this come from the heap, not from a mapping of their own: a chunk
# and its frame, whatever the chunk size.
MMAP_THRESHOLD = 2 * MAX_CHUNK_SIZE
# Free memory the heap keeps before it is returned to the kernel: a window of chunks.
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Tune the allocator of this process; whether it could (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either one stops glibc's own adjustment of both: set both, as measured.
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
