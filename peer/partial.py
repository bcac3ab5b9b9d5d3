"""Where a download lands: a temporary file in the download folder, filled chunk by
chunk at each chunk's offset, then checked, fsynced and renamed into place.

The final path never holds unverified bytes: until `finish` has checked the whole-file
hash, the data lives only in a temporary `.sfs-<file id>.<random>.part` of this download
alone, which `discard` removes. The final name comes from `safe_filename`, never straight
from the network, and never replaces an existing file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import unicodedata
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import IntegrityError, StorageError

MAX_NAME_BYTES = 255
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


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


def _storage_error(exc: OSError, folder: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left in {folder}")
    return StorageError(f"cannot write in {folder}: {exc.strerror}")


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
            # mkstemp: mode 0600, a name no other download (or process) is using
            self._fd, name = tempfile.mkstemp(prefix=f".sfs-{file_id}.", suffix=".part", dir=folder)
            self.path = Path(name)
        except OSError as exc:
            raise _storage_error(exc, folder) from exc

    def write(self, index: int, data: bytes) -> None:
        """Write a verified chunk at its offset; feed the whole-file hash in order,
        reading back chunks that arrived ahead of their turn."""
        try:
            if os.pwrite(self._fd, data, index * self._chunk_size) != len(data):
                raise OSError(errno.EIO, "short write")
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
            os.close(self._fd)
            self._fd = -1
            target = _link_unused(self.path, self.folder, name)
        except OSError as exc:
            raise _storage_error(exc, self.folder) from exc
        with contextlib.suppress(OSError):  # the file is complete; this only hurries the disk
            _fsync_dir(self.folder)
        return target

    def discard(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


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
