"""Where a folder share is downloaded: its staging folder `.sfs-<file id>.tree/` (0700)
in the download folder, whose files are written straight from the verified stream.

Once the index is verified and its paths passed the rules, the staging folder gets the
chosen folders (0700). Each verified chunk is written (`pwrite`) into the file pieces its
chunk map gives, each file made `O_EXCL` when its first piece comes, through a small
cache of descriptors (`open_files`); when a file's last chunk is written it gets its
mtime and its mode (at least 0600 until the finish) and is closed. `finish` then makes
the links and empty files, sets the stricter modes and the folders', makes it all
durable and renames it into place (`tree_write.finish_tree`). So each byte is written
once, and the download needs the tree's size once; nothing has its final name before
every chosen chunk is verified.

Resume: the staging folder's name depends only on the file id, so an interrupted `get`
finds it again, under an exclusive `flock` (two `get`s never share it). What it holds
is checked before anything in it is used (`staging_walk`: every name must be the
index's, of its kind, this user's; a planted link is refused, never followed), and
trusted only chunk by chunk: each chunk is read back from its pieces and hashed against
the owner's signed index (skipped at once if a piece is missing, short or a hole). A
chunk that also holds bytes of a file not chosen (`get --include`) cannot be read back
whole, so it is fetched again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
from array import array
from collections.abc import Callable
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree import FILE, FOLDER
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_index import TreeIndex
from sfs.peer.direct_writes import pwrite_all
from sfs.peer.open_files import DIR_FLAGS, OpenFiles, in_the_way
from sfs.peer.partial import lock_for_this_get, make_folder, same_file, storage_error
from sfs.peer.staging_walk import check_kept
from sfs.peer.stamps import FileStamp
from sfs.peer.tree_write import finish_tree, has_syncfs, set_metadata, staging_path

_OPEN_ATTEMPTS = 10


def _open_locked(path: Path) -> tuple[int, bool]:
    """Open (or make, 0700) the staging folder and lock it for this download; whether
    it was there already. Only a folder of this user is used, never through a link."""
    for _ in range(_OPEN_ATTEMPTS):
        made = False
        try:
            path.mkdir(0o700)
            made = True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, DIR_FLAGS)
        except FileNotFoundError:
            continue  # removed meanwhile (a download finishing): again
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, a file
                raise in_the_way(path) from exc
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                raise in_the_way(path)
            lock_for_this_get(fd, f"this folder into {path.parent}")
            if same_file(path, fd):  # not renamed by a download finishing meanwhile
                if info.st_mode & 0o777 != 0o700:
                    os.fchmod(fd, 0o700)  # a finish was interrupted after setting it
                return fd, not made
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, "the staging folder keeps disappearing")


class StagingTree:
    """A folder download's storage: `resume`, `write` (from several threads), then
    `finish`, or `keep` (for the next attempt) or `discard`."""

    def __init__(
        self, folder: Path, file_id: str, tree: TreeIndex, chosen: set[int] | None = None
    ) -> None:
        self.folder = folder
        self.file_id = file_id
        self.path = staging_path(folder, file_id)
        self.stamp: FileStamp | None = None  # files only
        self._tree = tree
        self._chosen = chosen
        self._wanted = (
            set(range(tree.chunk_count)) if chosen is None else tree.chunks_of_entries(chosen)
        )
        self._verified: set[int] = set()
        self._fsync_each = not has_syncfs()
        chunks = tree.chunks
        self._is_chosen = bytearray(chunks.file_count)  # by file number
        self._present = bytearray(chunks.file_count)  # made, by this attempt or an earlier one
        self._waiting = array("I", bytes(4 * chunks.file_count))  # chunks to come, per file
        file_number = 0
        for number, entry in enumerate(tree.entries):
            if entry.kind == FILE:
                if chosen is None or number in chosen:
                    self._is_chosen[file_number] = 1
                    self._waiting[file_number] = len(chunks.chunks_of(file_number))
                file_number += 1
        # Guards the descriptors and `_verified`: holders' threads write while the
        # download may stop.
        self._lock = threading.Lock()
        make_folder(folder)
        try:
            self._fd, self.found = _open_locked(self.path)
        except OSError as exc:
            raise storage_error(exc, folder) from exc
        self._files = OpenFiles(self._fd, self.path)
        try:
            if self.found:
                check_kept(self._fd, self.path, tree, chosen, self._present)
            self._make_folders()
        except BaseException as exc:
            self.keep()
            if isinstance(exc, OSError):
                raise storage_error(exc, folder) from exc
            raise

    def _make_folders(self) -> None:
        """The chosen folders, 0700, in index order (parents first). On ext4, making every
        folder before any file took a quarter of the time of making each folder before
        its files (20,000 files in 100 folders, docs/PERFORMANCE.md)."""
        for number, entry in enumerate(self._tree.entries):
            if entry.kind != FOLDER or not (self._chosen is None or number in self._chosen):
                continue
            parent, _, name = entry.path.rpartition("/")
            try:
                os.mkdir(name, 0o700, dir_fd=self._files.folder(parent))
            except FileExistsError:
                if not self.found:
                    raise
                self._files.folder(entry.path)  # checks that it is a folder

    def resume(self, check: Callable[[], None] | None = None) -> list[int]:
        """The chosen chunks already here from an earlier attempt, each read back and
        verified against the index; everything else is to be fetched."""
        if not self.found:
            return []
        found = []
        try:
            for index in sorted(self._wanted):
                data = self._read_back(index)
                if data is not None and self._matches(index, data):
                    with self._lock:
                        self._resumed(index)
                    found.append(index)
                if check is not None:
                    check()
        except OSError as exc:
            raise storage_error(exc, self.folder) from exc
        return found

    def _read_back(self, index: int) -> bytes | None:
        """Chunk `index` as the staging files hold it; None if a piece is clearly missing
        (a file not made or not chosen, too short, or a hole where the piece starts)."""
        data = bytearray()
        for piece in self._tree.chunks.pieces(index):
            if not (self._is_chosen[piece.file] and self._present[piece.file]):
                return None
            fd = self._files.file(piece.file, self._tree.files[piece.file].path, create=False)
            if os.fstat(fd).st_size < piece.offset + piece.length or _is_hole(fd, piece.offset):
                return None
            data += os.pread(fd, piece.length, piece.offset)
        return bytes(data)

    def _matches(self, index: int, data: bytes | memoryview) -> bool:
        tree = self._tree
        return (
            0 <= index < tree.chunk_count
            and len(data) == tree.chunk_length(index)
            and crypto.same_bytes(blake3_256(data), tree.chunk_hash(index))
        )

    def write(self, index: int, data: bytes | memoryview) -> None:
        """Check chunk `index` against the owner's signed index, then write its pieces
        into their files. `IntegrityError` if it does not match, or was written already.
        Safe from several threads: the hash runs outside the lock."""
        if not self._matches(index, data):
            raise IntegrityError(f"chunk {index} does not match the owner's signed manifest")
        with self._lock:
            if self._fd < 0:
                raise StorageError(f"the download into {self.folder} was stopped")
            if index in self._verified:
                raise IntegrityError(f"chunk {index} was delivered twice")
            try:
                self._write_pieces(index, memoryview(data))
            except OSError as exc:
                raise storage_error(exc, self.folder) from exc
            self._verified.add(index)

    def _write_pieces(self, index: int, data: memoryview) -> None:
        """Each piece into its file; a file whose last chunk this is gets its mtime and
        mode and is closed at once (a chunk may end hundreds of small files: none of
        them takes a place in the cache)."""
        for piece in self._tree.chunks.pieces(index):
            part, data = data[: piece.length], data[piece.length :]
            left = self._waiting[piece.file]
            if not left:
                continue  # a file `--include` left out, sharing this chunk with a chosen one
            path = self._tree.files[piece.file].path
            create = not self._present[piece.file]
            if left > 1:
                fd = self._files.file(piece.file, path, create)
            else:
                fd = self._take(piece.file, create)
            self._present[piece.file] = 1
            self._waiting[piece.file] = left - 1
            if left > 1:
                pwrite_all(fd, part, piece.offset)
                continue
            try:
                pwrite_all(fd, part, piece.offset)
                self._file_done(piece.file, fd)
            finally:
                os.close(fd)

    def _resumed(self, index: int) -> None:
        """Chunk `index` was found whole on disk (under `_lock`)."""
        self._verified.add(index)
        for piece in self._tree.chunks.pieces(index):
            left = self._waiting[piece.file]
            if not left:
                continue  # not chosen
            self._waiting[piece.file] = left - 1
            if left == 1:
                fd = self._take(piece.file, create=False)
                try:
                    self._file_done(piece.file, fd)
                finally:
                    os.close(fd)

    def _take(self, file: int, create: bool) -> int:
        """File `file`'s descriptor, out of the cache: the caller closes it."""
        fd = self._files.forget(file)
        if fd is None:
            fd = self._files.file(file, self._tree.files[file].path, create, keep=False)
        return fd

    def _file_done(self, file: int, fd: int) -> None:
        """File `file` is whole: its mtime, and its mode, at least 0600 until the finish
        (a resumed download must be able to read it back)."""
        entry = self._tree.files[file]
        set_metadata(fd, entry.mode | 0o600, entry.mtime_ns, self._fsync_each)

    @property
    def complete(self) -> bool:
        """Whether every chosen chunk is verified on disk."""
        with self._lock:
            return self._wanted <= self._verified

    def finish(self) -> Path:
        """Finish the tree and give it its name (see `tree_write.finish_tree`)."""
        if not self.complete:
            raise IntegrityError("the download finished with chunks missing")
        with self._lock:
            self._files.close()
            try:
                target = finish_tree(
                    self._fd, self.folder, self._tree, self.file_id, self._chosen, self._present
                )
            except OSError as exc:
                raise storage_error(exc, self.folder) from exc
        self._close()
        return target

    def keep(self) -> None:
        """Stop, keeping the verified chunks for the next attempt."""
        self._close()

    def discard(self) -> None:
        """Stop and remove the staging folder (nothing of it is worth keeping)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):  # before closing, which releases the lock
            if same_file(self.path, self._fd):
                shutil.rmtree(self.path)
        self._close()

    def _close(self) -> None:
        with self._lock:  # never while a write is under way
            self._files.close()
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._fd = -1


def _is_hole(fd: int, offset: int) -> bool:
    """Whether no data was ever written at `offset` (a hole of a sparse file)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) != offset
    except OSError:  # ENXIO: no data after offset; EINVAL: SEEK_DATA unsupported
        return os.fstat(fd).st_size <= offset
