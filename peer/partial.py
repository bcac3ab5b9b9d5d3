"""Where a download lands: a temporary file in the download folder, filled chunk by
chunk at each chunk's offset, then checked, fsynced and renamed into place.

The final path never holds unverified bytes: until `finish` has checked the whole-file
hash, the data lives only in a temporary `.sfs-<file id>.<random>.part` of this download
alone, which `discard` removes. The final name comes from `safe_filename`, never straight
from the network, and never replaces an existing file.

A download that could not clean up (killed, or the machine stopped) leaves its temporary
file behind. Each download holds an exclusive lock (`flock`) on its own, so the next
download into the folder can tell an abandoned one, which nobody holds, and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import tempfile
import unicodedata
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import IntegrityError, StorageError

MAX_NAME_BYTES = 255
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
_PART_NAME = re.compile(r"\.sfs-[0-9a-f]{32}\..+\.part")
_CREATE_ATTEMPTS = 10


def safe_filename(name: str, fallback: str) -> str:
    """A plain file name made from an untrusted `name`: its last path component, with
    control characters removed; `fallback` if nothing usable is left."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in last if unicodedata.category(ch)[0] != "C").strip()
    cleaned = cleaned.lstrip(".")  # no hidden files, no "." or ".."
    while len(cleaned.encode()) > MAX_NAME_BYTES:
        cleaned = cleaned[:-1]
    return cleaned or fallback


def _numbered(name: str, number: int) -> str:
    """`stem (N).ext`, shortening the stem so the result still fits a file name."""
    stem, dot, suffix = name.rpartition(".")
    if not stem:
        stem, dot, suffix = name, "", ""
    tail = f" ({number}){dot}{suffix}"
    while stem and len((stem + tail).encode()) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem + tail


def _link_unused(source: Path, folder: Path, name: str) -> Path:
    """Give `source` the name `name` in `folder`, or `stem (1).ext`, `stem (2).ext`...:
    `os.link` fails rather than replace a file that exists, even one made a moment ago."""
    number = 0
    while True:
        candidate = folder / (_numbered(name, number) if number else name)
        try:
            os.link(source, candidate, follow_symlinks=False)
        except FileExistsError:
            number += 1
            continue
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # A file system without hard links (FAT, some network mounts): check, then
            # rename; only a file created in the instant between the two is at risk.
            if candidate.exists() or candidate.is_symlink():
                number += 1
                continue
            source.rename(candidate)
            return candidate
        with contextlib.suppress(OSError):
            source.unlink()
        return candidate


_NOT_A_FOLDER = "that path is not a folder"
_REASONS = {  # strerror is terse, or misleading, for these
    errno.EFBIG: "the file is larger than this file system (or a size limit) allows",
    errno.ENOTDIR: _NOT_A_FOLDER,
}


def _storage_error(exc: OSError, folder: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left in {folder}")
    if exc.errno == errno.EDQUOT:
        return StorageError(f"no space left in {folder}: the disk quota is used up")
    reason = _REASONS.get(exc.errno or 0, exc.strerror)
    return StorageError(f"cannot write in {folder}: {reason}")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`. A write may take only part of it (near a size
    limit or a full disk, say); the next one then says why, or takes the rest."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "the file system accepted no data")
        view, offset = view[written:], offset + written


# The temporary files of this process's downloads, as (device, inode): where locks are
# per process rather than per open file (flock emulated over NFS), these still count as
# held.
_live: set[tuple[int, int]] = set()


def _inode(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` (not followed) is still the file open as `fd`."""
    try:
        named = path.lstat()
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == _inode(fd)


def _lock(fd: int, *, wait: bool) -> bool:
    """Lock `fd` exclusively; whether it is ours now. Without `wait`, a lock held
    elsewhere gives False. On a file system without locks, a download goes on unlocked
    (True with `wait`) and nothing is judged abandoned (False without)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return wait
    return True


def remove_abandoned(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` that no download holds any more; the
    removed paths. Symlinks and anything else that is not a regular file stay."""
    try:
        paths = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in paths:
        if not _PART_NAME.fullmatch(path.name):
            continue
        try:  # O_NONBLOCK: a FIFO with this name must not block the download
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            abandoned = regular and _inode(fd) not in _live and _lock(fd, wait=False)
            # Still the file we locked: its download ended, and no other took its name.
            if abandoned and _same_file(path, fd):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _create_locked(folder: Path, file_id: str) -> tuple[int, Path]:
    """A new temporary file (mode 0600, a name nobody else uses), locked for as long as
    this download lives. Another download may judge it abandoned in the instant before
    the lock is taken, and remove it: then it is made again."""
    for _ in range(_CREATE_ATTEMPTS):
        fd, name = tempfile.mkstemp(prefix=f".sfs-{file_id}.", suffix=".part", dir=folder)
        _lock(fd, wait=True)
        if _same_file(Path(name), fd):
            _live.add(_inode(fd))
            return fd, Path(name)
        os.close(fd)
    raise OSError(errno.EAGAIN, "temporary files there keep disappearing")


class PartialFile:
    def __init__(self, folder: Path, file_id: str, size: int, chunk_size: int) -> None:
        self.folder = folder
        self._size = size
        self._chunk_size = chunk_size
        self._chunk_count = -(-size // chunk_size)
        self._fd = -1
        self._hasher = crypto.new_sha256()
        self._hashed_upto = 0  # the next chunk, in order, to feed the whole-file hash
        self._waiting: dict[int, int] = {}  # written out of order: index -> length
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # a file, or a symlink to one, is in the way
            raise StorageError(f"cannot write in {folder}: {_NOT_A_FOLDER}") from exc
        except OSError as exc:
            raise _storage_error(exc, folder) from exc
        remove_abandoned(folder)
        try:
            self._fd, self.path = _create_locked(folder, file_id)
        except OSError as exc:
            raise _storage_error(exc, folder) from exc

    def write(self, index: int, data: bytes) -> None:
        """Write a verified chunk at its offset; feed the whole-file hash in order,
        reading back chunks that arrived ahead of their turn."""
        try:
            _pwrite_all(self._fd, data, index * self._chunk_size)
            self._waiting[index] = len(data)
            while self._hashed_upto in self._waiting:
                current = self._hashed_upto
                length = self._waiting.pop(current)
                if current != index:
                    data = os.pread(self._fd, length, current * self._chunk_size)
                self._hasher.update(data)
                self._hashed_upto += 1
        except OSError as exc:
            raise _storage_error(exc, self.folder) from exc

    def finish(self, expected_sha256: bytes, name: str) -> Path:
        """Check the whole file, make it durable and move it into place."""
        if self._hashed_upto != self._chunk_count:
            raise IntegrityError("the download finished with chunks missing")
        if not crypto.same_bytes(self._hasher.digest(), expected_sha256):
            raise IntegrityError("the whole-file SHA-256 does not match the signed manifest")
        try:
            os.fchmod(self._fd, 0o666 & ~_umask())  # private while partial, normal once done
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
            # Linked while still open, hence locked: no other download removes it meanwhile.
            target = _link_unused(self.path, self.folder, name)
        except OSError as exc:
            raise _storage_error(exc, self.folder) from exc
        self._close()
        with contextlib.suppress(OSError):  # the file is complete; this only hurries the disk
            _fsync_dir(self.folder)
        return target

    def discard(self) -> None:
        if self._fd < 0:
            return  # finished, or discarded already
        with contextlib.suppress(OSError):  # before closing, which releases the lock
            if _same_file(self.path, self._fd):
                self.path.unlink()
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            _live.discard(_inode(self._fd))
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
