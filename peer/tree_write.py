"""Where a folder share lands: built in a hidden staging folder, renamed into place.

The chunks of a folder share arrive, are verified and resumed exactly as a file's do:
into one `.part` file holding the tree's stream (`partial.PartialFile`). Once every
chunk is verified, `build_tree_from` cuts the stream into the tree's files inside
`.sfs-<file id>.tree/` (mode 0700), made with the entries' modes (masked to 0o777),
mtimes, empty folders and relative links, all through folder descriptors and
`O_NOFOLLOW`/`O_EXCL`, so nothing there is ever followed or overwritten; modes and
mtimes are set through each file's and folder's own descriptor, and only the folders on
the current path are open. The index has passed the path rules (`tree_rules`) before
any of this runs. Then one `syncfs` (or an fsync of every file and folder), a rename
that never replaces an existing name, an fsync of the parent, and a check that the name
holds the staging folder (same inode).

Costs, as measured in the report: the stream is written twice (`.part`, then the files;
`copy_file_range` keeps the copy in the kernel) and needs the tree's size twice while
the tree is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_index import TreeIndex
from sfs.peer.partial import MAX_NAME_BYTES, safe_filename

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_COPY_STEP = 16 << 20


def staging_path(folder: Path, file_id: str) -> Path:
    return folder / f".sfs-{file_id}.tree"


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _has_syncfs() -> bool:
    libc = _libc()
    return libc is not None and hasattr(libc, "syncfs")


def _syncfs(fd: int) -> bool:
    libc = _libc()
    return libc is not None and bool(libc.syncfs(fd) == 0)


def _rename_noreplace(folder_fd: int, source: str, target: str) -> None:
    """Rename without ever replacing `target` (`FileExistsError` if it exists)."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is not None:
        result = renameat2(
            folder_fd, source.encode(), folder_fd, target.encode(), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):  # else: no RENAME_NOREPLACE here
            raise OSError(code, os.strerror(code), target)
    try:  # checked, then renamed: only a name made in the instant between is at risk
        os.lstat(target, dir_fd=folder_fd)
    except FileNotFoundError:
        os.rename(source, target, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        return
    raise FileExistsError(errno.EEXIST, "exists", target)


def _numbered(name: str, number: int) -> str:
    tail = f" ({number})"
    while name and len((name + tail).encode()) > MAX_NAME_BYTES:
        name = name[:-1]
    return name + tail


def _remove_staging(folder: Path, path: Path) -> None:
    """Remove what an earlier attempt left at our staging name: only a folder of ours."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StorageError(f"{path} is in the way and is not a download of this user")
    shutil.rmtree(path)


@dataclass
class _OpenFolder:
    path: str
    fd: int
    entry: Entry | None  # None: the staging folder itself


class _Builder:
    """Writes the entries, in index order, under the staging folder's descriptor, in
    three passes: every folder (`make_folder`), the files and links (`add`), then each
    folder's mode and mtime (`finish_folder`), which making its children would change.
    On ext4, creating 20,000 files in 100 folders took a quarter of the time when the
    folders were all made first (0.7-1.1 s against 4.1-4.3 s, docs/PERFORMANCE.md).
    Until the last pass every folder is 0700, so a build that fails can be removed.

    Each file gets its mode and mtime through its own descriptor as it is written. Index
    order lists a folder's contents directly after it, so only the folders on the
    current path are open: never more descriptors than the tree is deep. Without
    `syncfs`, each file and folder is fsynced as it is done.
    """

    def __init__(self, root_fd: int, part_fd: int, tree: TreeIndex, fsync_each: bool) -> None:
        self.part_fd = part_fd
        self.tree = tree
        self.fsync_each = fsync_each
        self.open: list[_OpenFolder] = [_OpenFolder("", root_fd, None)]
        self.file_number = 0

    def folder_fd(self, parent: str) -> int:
        """The parent's descriptor, finishing the folders the index has left."""
        while self.open[-1].path != parent:
            self._finish(self.open.pop())
        return self.open[-1].fd

    def make_folder(self, entry: Entry) -> None:
        parent, _, name = entry.path.rpartition("/")
        where = self.folder_fd(parent)
        os.mkdir(name, 0o700, dir_fd=where)
        self.open.append(_OpenFolder(entry.path, os.open(name, _DIR_FLAGS, dir_fd=where), None))

    def finish_folder(self, entry: Entry) -> None:
        """Open a folder made by `make_folder`: its mode and mtime are set when the index
        leaves it."""
        self._open_folder(entry, entry)

    def _open_folder(self, entry: Entry, to_finish: Entry | None) -> None:
        parent, _, name = entry.path.rpartition("/")
        fd = os.open(name, _DIR_FLAGS, dir_fd=self.folder_fd(parent))
        self.open.append(_OpenFolder(entry.path, fd, to_finish))

    def add(self, entry: Entry) -> None:
        """A file or link (a folder made by `make_folder`: opened, for its contents)."""
        if entry.kind == FOLDER:
            self._open_folder(entry, None)
            return
        parent, _, name = entry.path.rpartition("/")
        where = self.folder_fd(parent)
        if entry.kind == LINK:
            os.symlink(entry.target or "", name, dir_fd=where)
            with contextlib.suppress(NotImplementedError, OSError):  # links: not everywhere
                os.utime(name, ns=(entry.mtime_ns,) * 2, dir_fd=where, follow_symlinks=False)
        else:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=where,
            )
            try:
                start, end = self.tree.chunks.file_range(self.file_number)
                _copy(self.part_fd, fd, start, end - start)
                self._set_metadata(fd, entry)
            finally:
                os.close(fd)
            self.file_number += 1

    def _set_metadata(self, fd: int, entry: Entry) -> None:
        os.fchmod(fd, entry.mode & 0o777)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        if self.fsync_each:
            os.fsync(fd)

    def _finish(self, folder: _OpenFolder) -> None:
        try:
            if folder.entry is not None:
                self._set_metadata(folder.fd, folder.entry)
        finally:
            os.close(folder.fd)

    def finish(self) -> None:
        """Finish every folder still open but the staging folder."""
        self.folder_fd("")

    def close(self) -> None:
        """After a failure: close what is still open (not the staging folder)."""
        for folder in self.open[1:]:
            with contextlib.suppress(OSError):
                os.close(folder.fd)
        del self.open[1:]


def _copy(source: int, target: int, offset: int, length: int) -> None:
    written = 0
    while written < length:
        step = min(_COPY_STEP, length - written)
        try:
            done = os.copy_file_range(source, target, step, offset + written, written)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(source, step, offset + written)
            done = os.pwrite(target, data, written)
        if done <= 0:
            raise OSError(errno.EIO, "the stream ended early")
        written += done


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def build_tree_from(
    part_fd: int, tree: TreeIndex, folder: Path, file_id: str, chosen: set[int] | None = None
) -> Path:
    """Cut the verified stream open as `part_fd` into the tree's files (only the
    entries `chosen`, if given), make them durable and give them their name in
    `folder` (never an existing one: `name (1)`...)."""
    staging = staging_path(folder, file_id)
    _remove_staging(folder, staging)
    staging.mkdir(0o700)
    root_fd = os.open(staging, _DIR_FLAGS)
    has_syncfs = _has_syncfs()
    builder = _Builder(root_fd, part_fd, tree, fsync_each=not has_syncfs)
    try:
        _build(builder, tree, chosen)
        os.fchmod(root_fd, 0o777 & ~_umask())
        if has_syncfs and not _syncfs(root_fd):
            os.sync()  # syncfs failed: make everything durable rather than nothing
        elif not has_syncfs:
            os.fsync(root_fd)
        built = os.fstat(root_fd)
        target = _name_unused(folder, staging, safe_filename(tree.name, fallback=file_id))
        named = os.lstat(target)
        if (named.st_dev, named.st_ino) != (built.st_dev, built.st_ino):
            raise IntegrityError(
                f"{target} does not hold the folder just built (others can rename entries "
                "in this folder); nothing else was changed"
            )
        return target
    except BaseException:
        with contextlib.suppress(OSError):
            if staging.exists():
                shutil.rmtree(staging)
        raise
    finally:
        builder.close()
        os.close(root_fd)


def _build(builder: _Builder, tree: TreeIndex, chosen: set[int] | None) -> None:
    def folders() -> Iterator[Entry]:
        for number, entry in enumerate(tree.entries):
            if entry.kind == FOLDER and (chosen is None or number in chosen):
                yield entry

    for entry in folders():
        builder.make_folder(entry)
    builder.finish()
    for number, entry in enumerate(tree.entries):
        if chosen is None or number in chosen:
            builder.add(entry)
        elif entry.kind == FILE:
            builder.file_number += 1
    builder.finish()
    for entry in folders():
        builder.finish_folder(entry)
    builder.finish()


def _name_unused(folder: Path, staging: Path, name: str) -> Path:
    folder_fd = os.open(folder, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        number = 0
        while True:
            candidate = _numbered(name, number) if number else name
            try:
                _rename_noreplace(folder_fd, staging.name, candidate)
            except FileExistsError:
                number += 1
                continue
            with contextlib.suppress(OSError):
                os.fsync(folder_fd)
            return folder / candidate
    finally:
        os.close(folder_fd)


def tree_on_disk(folder: Path, tree: TreeIndex, file_id: str) -> Path | None:
    """The folder a download would be named, if it already holds exactly this tree: the
    same entries (nothing more), kinds, sizes, link targets, and every chunk's hash."""
    root = folder / safe_filename(tree.name, fallback=file_id)
    try:
        if not stat.S_ISDIR(root.lstat().st_mode):
            return None
        listed = {entry.path for entry in tree.entries}
        for path in root.rglob("*"):
            if str(path.relative_to(root)) not in listed:
                return None
        for entry in tree.entries:
            info = (root / entry.path).lstat()
            kind_ok = {
                FOLDER: stat.S_ISDIR(info.st_mode),
                LINK: stat.S_ISLNK(info.st_mode),
                FILE: stat.S_ISREG(info.st_mode) and info.st_size == entry.size,
            }[entry.kind]
            if not kind_ok:
                return None
            target = os.readlink(root / entry.path) if entry.kind == LINK else None  # noqa: PTH115
            if target != entry.target:
                return None
        return root if _chunks_match(root, tree) else None
    except (OSError, ValueError):
        return None


def _chunks_match(root: Path, tree: TreeIndex) -> bool:
    for index in range(tree.chunk_count):
        data = bytearray()
        for piece in tree.chunks.pieces(index):
            path = root / tree.files[piece.file].path
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                data += os.pread(fd, piece.length, piece.offset)
            finally:
                os.close(fd)
        if not crypto.same_bytes(blake3_256(bytes(data)), tree.chunk_hash(index)):
            return False
    return True
