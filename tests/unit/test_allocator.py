"""sfs.peer.allocator: freed chunk buffers stay in the process, so the next chunks do not
fault fresh pages in. Measured in child processes (page faults are counted per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Threads that each hold a window of 1 MiB buffers, one after the other: what the
# threads of a download do with its chunks.
_CHURN = """
import collections, resource, sys, threading
if sys.argv[1] == "tuned":
    from sfs.peer.allocator import keep_freed_buffers
    assert keep_freed_buffers()

def chunks():
    window = collections.deque()
    for _ in range(200):
        window.append(b"\\x01" * ((1 << 20) + 64))
        if len(window) > 10:
            window.popleft()

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    thread = threading.Thread(target=chunks)
    thread.start()
    thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_chunk_buffers_are_reused_not_faulted_in_again() -> None:
    default, tuned = faults("default"), faults("tuned")
    # Default glibc: each thread's buffers are fresh pages (over 10,000 faults here);
    # tuned, the heap keeps them, and what faults is about the first window's pages.
    assert tuned * 2 < default, (tuned, default)
