"""Where a download lands: one temporary file in the download folder, filled chunk by
chunk at each chunk's offset, then checked, fsynced and linked into place.

The final path never holds unverified bytes: `write` takes only a chunk that matches its
BLAKE3 hash and length in the owner's signed manifest, and `finish` refuses the file unless
every chunk index was verified exactly once, so the file is the manifest's byte for byte
without a second, whole-file hash. Until then the data lives only in
`.sfs-<file id>.part`. The final name is given to the
checked open file, not to whatever the temporary path holds by then (someone who can
rename entries in the folder could have swapped it). It comes from `safe_filename`,
never straight from the network, and never replaces an existing file.

Resume: the temporary file's name depends only on the file id, so a download that was
interrupted (Ctrl-C, a holder gone, the process killed) finds its bytes again. They are
trusted only chunk by chunk, by their BLAKE3 hash in the owner's signed manifest, so no
record of what was written is needed and nothing a crash left half-written is kept.
Each download holds an exclusive `flock` on the file: two downloads of one file into
one folder cannot mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_index import TreeIndex
from sfs.peer.direct_writes import ChunkWriter
from sfs.peer.stamps import FileStamp, stamp_of

MAX_NAME_BYTES = 255
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
_OPEN_ATTEMPTS = 10


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


class _NoHardLinks(Exception):
    """This file system (or a missing /proc) cannot link an open file to a name."""


def _link_open_file(fd: int, folder_fd: int, name: str) -> None:
    """Give the file open as `fd` the name `name` in the folder open as `folder_fd`.

    Linked through `/proc/self/fd`, which names the open file itself: whatever an
    attacker who can rename entries in the folder has put at the temporary path, the new
    name gets the very inode that was checked. `FileExistsError` if the name is taken."""
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder_fd, follow_symlinks=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            raise
        if exc.errno == errno.ENOENT and os.fstat(fd).st_nlink == 0:
            raise IntegrityError(
                "the temporary file was deleted by someone else as the download finished "
                "(others can change this folder); nothing was kept"
            ) from exc
        if exc.errno in _NO_HARD_LINKS or exc.errno == errno.ENOENT:  # ENOENT: no /proc
            raise _NoHardLinks from exc
        raise


def _rename_checked(fd: int, source: Path, folder: Path, name: str) -> None:
    """Without hard links (FAT, some network mounts): rename the temporary path, then
    prove that the new name holds the file open as `fd`, and undo the rename if not.
    Checked, then renamed: only a file created in the instant between is at risk."""
    target = folder / name
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, "taken", str(target))
    replaced = IntegrityError(
        "the temporary file was replaced by someone else as the download finished "
        "(others can rename files in this folder); nothing was kept"
    )
    if not same_file(source, fd):
        raise replaced
    source.rename(target)
    if not same_file(target, fd):
        try:
            target.rename(source)  # the swapped-in entry goes back where it was
        except OSError:  # something is in the way there now: never leave it named
            with contextlib.suppress(OSError):
                target.unlink()
        raise replaced


def _name_unused(fd: int, source: Path, folder: Path, name: str) -> Path:
    """Give the checked file open as `fd` the name `name` in `folder`, or `stem (1).ext`,
    `stem (2).ext`...; an existing file, even one made a moment ago, is never replaced.
    Nothing but the checked file ever gets the name: a swap of `source` (the temporary
    path) during the download is refused."""
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        hard_links = True
        number = 0
        while True:
            candidate = _numbered(name, number) if number else name
            try:
                if hard_links:
                    _link_open_file(fd, folder_fd, candidate)
                else:
                    _rename_checked(fd, source, folder, candidate)
                    return folder / candidate
            except FileExistsError:
                number += 1
                continue
            except _NoHardLinks:
                hard_links = False
                continue
            if same_file(source, fd):  # the temporary name is ours: remove it
                with contextlib.suppress(OSError):
                    source.unlink()
            return folder / candidate
    finally:
        os.close(folder_fd)


_NOT_A_FOLDER = "that path is not a folder"
_REASONS = {  # strerror is terse, or misleading, for these
    errno.EFBIG: "the file is larger than this file system (or a size limit) allows",
    errno.ENOTDIR: _NOT_A_FOLDER,
}


def storage_error(exc: OSError, folder: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left in {folder}")
    if exc.errno == errno.EDQUOT:
        return StorageError(f"no space left in {folder}: the disk quota is used up")
    reason = _REASONS.get(exc.errno or 0, exc.strerror)
    return StorageError(f"cannot write in {folder}: {reason}")


def partial_path(folder: Path, file_id: str) -> Path:
    return folder / f".sfs-{file_id}.part"


def _open_locked(path: Path) -> int:
    """Open (or create, mode 0600) the temporary file and lock it for this download.

    Only a regular file of ours with one link is used: a symlink, a FIFO or a hard link
    to some other file planted under this name is refused, never written through."""
    in_the_way = StorageError(
        f"{path} is in the way and is not a partial download of this user; move it elsewhere"
    )
    for _ in range(_OPEN_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):  # a symlink or a folder
                raise in_the_way from exc
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.getuid():
                raise in_the_way
            lock_for_this_get(fd, f"this file into {path.parent}")
            if same_file(path, fd):  # not unlinked by a download finishing meanwhile
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, "the temporary file keeps disappearing")


def lock_for_this_get(fd: int, what: str) -> None:
    """An exclusive `flock` on `fd`, for as long as it is open: two downloads never share
    their storage. `StorageError` if another `get` holds it; on a file system without
    locks, nothing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StorageError(f"another `sfs-peer get` is downloading {what}") from None
    except OSError:
        pass  # a file system without locks: go on unlocked


def same_file(path: Path, fd: int) -> bool:
    """Whether `path` (not followed) is still the file open as `fd`."""
    try:
        named, opened = path.lstat(), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


class PartialFile:
    def __init__(self, folder: Path, file_id: str, manifest: TreeIndex) -> None:
        self.folder = folder
        self.path = partial_path(folder, file_id)
        self._manifest = manifest
        self._fd = -1
        self._writer: ChunkWriter | None = None
        self.found = False
        self.stamp: FileStamp | None = None  # the finished file's, for seeding it
        self._verified: set[int] = set()  # chunk indexes on disk, each checked once
        self._writing: set[int] = set()  # chunk indexes being written now
        # Guards `_fd`, `_verified` and `_writing`: holders' threads write while the
        # download may stop (a closed descriptor's number could be reused by another
        # file), so the descriptor is closed only once no write is under way.
        self._lock = threading.Lock()
        self._no_writes = threading.Condition(self._lock)
        make_folder(folder)
        try:
            self._fd = _open_locked(self.path)
            self._writer = ChunkWriter(self._fd, manifest.chunk_size)
            self.found = os.fstat(self._fd).st_size > 0  # left by an earlier attempt
        except OSError as exc:
            raise storage_error(exc, folder) from exc

    def resume(self, check: Callable[[], None] | None = None) -> list[int]:
        """The chunks already here from an earlier attempt, each verified against the
        manifest; everything else is to be fetched. `check` runs between chunks (to let
        Ctrl-C through on a large file)."""
        manifest = self._manifest
        try:
            present = os.fstat(self._fd).st_size
            if present > manifest.size:
                os.ftruncate(self._fd, manifest.size)
            found = []
            for index in range(manifest.chunk_count):
                offset, length = index * manifest.chunk_size, manifest.chunk_length(index)
                if length == 0 or offset + length > present or self._is_hole(offset):
                    continue
                data = os.pread(self._fd, length, offset)
                if self._matches(index, data):
                    with self._lock:
                        self._verified.add(index)
                    found.append(index)
                if check is not None:
                    check()
            return found
        except OSError as exc:
            raise storage_error(exc, self.folder) from exc

    def _is_hole(self, offset: int) -> bool:
        """Whether no data was ever written at `offset` (a hole of a sparse file)."""
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA) != offset
        except OSError:  # ENXIO: no data after offset; EINVAL: SEEK_DATA unsupported
            return os.fstat(self._fd).st_size <= offset

    def _matches(self, index: int, data: bytes | memoryview) -> bool:
        """Whether `data` is chunk `index` as the owner's signed manifest has it."""
        manifest = self._manifest
        return (
            0 <= index < manifest.chunk_count
            and len(data) == manifest.chunk_length(index)
            and crypto.same_bytes(blake3_256(data), manifest.chunk_hash(index))
        )

    def write(self, index: int, data: bytes | memoryview) -> None:
        """Check chunk `index` against the owner's signed manifest, then write it at its
        offset. `IntegrityError` if it does not match, or was written already. Safe from
        several threads, which hash and write side by side (the hash and the writes
        release the GIL; direct writes wait for the disk)."""
        if not self._matches(index, data):
            raise IntegrityError(f"chunk {index} does not match the owner's signed manifest")
        with self._lock:
            writer = self._writer
            if self._fd < 0 or writer is None:
                raise StorageError(f"the download into {self.folder} was stopped")
            if index in self._verified or index in self._writing:
                raise IntegrityError(f"chunk {index} was delivered twice")
            self._writing.add(index)
        written = False
        try:
            writer.write(data, index * self._manifest.chunk_size)
            written = True
        except OSError as exc:
            raise storage_error(exc, self.folder) from exc
        finally:
            with self._lock:
                self._writing.discard(index)
                if written:
                    self._verified.add(index)
                self._no_writes.notify_all()

    @property
    def complete(self) -> bool:
        """Whether every chunk index of the manifest is verified on disk."""
        with self._lock:
            return len(self._verified) == self._manifest.chunk_count

    def finish(self, name: str) -> Path:
        """Check that the file is complete, make it durable and link it into place.

        Complete: each of the manifest's chunk indexes was verified (hash and length)
        exactly once by `write` or `resume`, so the chunks tile `manifest.size` bytes, and
        the truncate below cuts anything an earlier attempt left past the end."""
        if not self.complete:
            raise IntegrityError("the download finished with chunks missing")
        try:
            os.fchmod(self._fd, 0o666 & ~umask())  # private while partial, normal once done
            os.ftruncate(self._fd, self._manifest.size)
            os.fsync(self._fd)
            # Named while still open, hence locked: no other download uses it meanwhile.
            target = _name_unused(self._fd, self.path, self.folder, name)
            self.stamp = stamp_of(os.fstat(self._fd))  # after the link and unlink (ctime)
        except OSError as exc:
            raise storage_error(exc, self.folder) from exc
        self._close()
        with contextlib.suppress(OSError):  # the file is complete; this only hurries the disk
            _fsync_dir(self.folder)
        return target

    def keep(self) -> None:
        """Stop, keeping the verified chunks for the next attempt."""
        self._close()

    def discard(self) -> None:
        """Stop and remove the temporary file (nothing of it is worth keeping)."""
        if self._fd < 0:
            return  # finished, kept or discarded already
        with contextlib.suppress(OSError):  # before closing, which releases the lock
            if same_file(self.path, self._fd):
                self.path.unlink()
        self._close()

    def _close(self) -> None:
        with self._lock:
            while self._writing:  # never while a write is under way
                self._no_writes.wait()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._fd = -1


def umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(folder: Path) -> None:
    """The download folder, made if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file, or a symlink to one, is in the way
        raise StorageError(f"cannot write in {folder}: {_NOT_A_FOLDER}") from exc
    except OSError as exc:
        raise storage_error(exc, folder) from exc
