"""Reading shared files for the holder: the only place `sfs-peer serve` opens them.

`read_chunk` reads one chunk from a share's path, and only from a regular file: the open
never waits (a FIFO put in a file's place would otherwise block until someone writes to
it), and anything else is refused with `NotRegularFile`. `read_pieces` reads a folder
share's chunk from the files it spans, each reached from the share's folder one
component at a time without following a link, so a folder swapped for a link after the
share was made cannot send the reads outside the tree.

`ReadLanes` runs those reads off the serving loop, one lane (a thread) per shared file
with reads waiting: a file whose storage stops answering (a dead network mount) stalls
its own lane, and every other share is still served. A lane lingers a moment for more
work, then ends; lanes are daemon threads, so a read that never returns cannot keep the
process from exiting. Finished reads are collected by the loop, which polls `wakeup_fd`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sfs.peer.registry import Share
from sfs.peer.stamps import stamp_of
from sfs.peer.transfer import ChangedSinceShared, ChunkJob, ChunkOutcome, NotRegularFile, Unchanged

# Reads waiting on one file at most; beyond, requests are refused `busy`. A download
# keeps at most a window (32) in flight, so this is many downloads of a slow file.
MAX_WAITING_PER_LANE = 256
LANE_LINGER = 2.0  # seconds an idle lane waits for more work before its thread ends

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer (it changes
# nothing for a regular file's reads).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _check_regular(fd: int) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFile(_KINDS.get(stat.S_IFMT(info.st_mode), "not a file"))
    return info


def read_chunk(share: Share, offset: int, length: int) -> bytes | Unchanged:
    """`length` bytes at `offset` of the share's file: `Unchanged` if the file's stamp,
    taken with `fstat` before and after the read, is the one recorded when it was shared,
    plain bytes (to be hashed) if none was recorded. Raises `ChangedSinceShared` when the
    stamp differs, `OSError`, or `NotRegularFile` when something else stands at its path."""
    # The path was resolved when the file was shared: a symlink there now is a swap.
    fd = os.open(share.path, _FILE_FLAGS)
    try:
        info = _check_regular(fd)
        if share.stamp is None:
            return os.pread(fd, length, offset)
        if stamp_of(info) != share.stamp:
            raise ChangedSinceShared(f"{share.path} changed since it was shared")
        data = os.pread(fd, length, offset)
        # A write during the read moves mtime and ctime: this chunk is not sent either.
        if stamp_of(os.fstat(fd)) != share.stamp:
            raise ChangedSinceShared(f"{share.path} changed since it was shared")
        return Unchanged(data)
    finally:
        os.close(fd)


def read_pieces(share: Share, pieces: tuple[tuple[str, int, int], ...]) -> bytes:
    """The bytes of a folder share's chunk: for each (path in the tree, offset, length),
    that part of the file. Every folder on the way, the share's own included, is opened
    without following a link (the folder's path was resolved when it was shared), then the
    file, which must be a regular file. Raises `OSError` or `NotRegularFile`; the caller
    checks the bytes against the chunk's hash."""
    root = os.open(share.path, _FOLDER_FLAGS)
    folders: dict[str, int] = {"": root}  # the folders this chunk's files are in, open
    try:
        parts = []
        for path, offset, length in pieces:
            parent, _, name = path.rpartition("/")
            fd = os.open(name, _FILE_FLAGS, dir_fd=_folder(folders, parent))
            try:
                _check_regular(fd)
                parts.append(os.pread(fd, length, offset))
            finally:
                os.close(fd)
        return b"".join(parts)
    finally:
        for fd in folders.values():
            os.close(fd)


def _folder(folders: dict[str, int], path: str) -> int:
    """The open folder at `path` in the tree, opened from its parent if need be."""
    fd = folders.get(path)
    if fd is None:
        parent, _, name = path.rpartition("/")
        fd = folders[path] = os.open(name, _FOLDER_FLAGS, dir_fd=_folder(folders, parent))
    return fd


@dataclass
class _Lane:
    waiting: deque[ChunkJob]  # the first is being read
    wake: threading.Condition


class ReadLanes:
    """Chunk reads in the background, one lane per file. Its methods are for one thread
    (the serving loop); the lanes are its own threads."""

    def __init__(self, read: Callable[[ChunkJob], ChunkOutcome]) -> None:
        """`read` must never raise (`HolderService.read` does not)."""
        self._read = read
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._done: deque[tuple[ChunkJob, ChunkOutcome]] = deque()
        self._closed = False
        self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def wakeup_fd(self) -> int:
        """Readable when reads have finished (see `finished`)."""
        return self._pipe[0]

    def submit(self, job: ChunkJob) -> bool:
        """Queue `job` on its file's lane; False if that lane has too many waiting."""
        with self._lock:
            lane = self._lanes.get(job.lane)
            if lane is None:
                lane = self._lanes[job.lane] = _Lane(deque(), threading.Condition(self._lock))
                threading.Thread(
                    target=self._run,
                    args=(job.lane, lane),
                    name=f"read-{job.lane[:8]}",
                    daemon=True,
                ).start()
            elif len(lane.waiting) >= MAX_WAITING_PER_LANE:
                return False
            lane.waiting.append(job)
            lane.wake.notify()
            return True

    def finished(self) -> list[tuple[ChunkJob, ChunkOutcome]]:
        """The reads done since the last call, in the order they finished."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._pipe[0], 4096):
                pass
        with self._lock:
            done = list(self._done)
            self._done.clear()
        return done

    @property
    def lanes(self) -> int:
        with self._lock:
            return len(self._lanes)

    def close(self) -> None:
        """Stop taking work. Lanes end after their current read; the wake-up pipe is
        closed by the last one (a read may never return: it keeps its lane)."""
        with self._lock:
            self._closed = True
            for lane in self._lanes.values():
                lane.wake.notify()
            self._close_pipe_if_idle()

    def _close_pipe_if_idle(self) -> None:
        """Called with the lock held."""
        if self._closed and not self._lanes and self._pipe[0] >= 0:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = (-1, -1)

    def _run(self, key: str, lane: _Lane) -> None:
        with self._lock:
            while not self._closed:
                if not lane.waiting:
                    lane.wake.wait(LANE_LINGER)
                    if not lane.waiting:
                        break
                    continue
                job = lane.waiting[0]
                self._lock.release()
                try:
                    outcome = self._read(job)
                finally:
                    self._lock.acquire()
                lane.waiting.popleft()
                self._done.append((job, outcome))
                with contextlib.suppress(BlockingIOError):  # full: the loop wakes anyway
                    os.write(self._pipe[1], b"\0")
            del self._lanes[key]
            self._close_pipe_if_idle()
