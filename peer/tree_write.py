"""Where a folder share lands: the end of a download into its staging folder.

The staging folder `.sfs-<file id>.tree/` (mode 0700) holds the tree's files while they
are written straight from the verified stream (`tree_staging`). Once every chosen chunk
is verified, `finish_tree` makes the links, the empty files and the entries' modes
(masked to 0o777) and mtimes, all through folder descriptors and `O_NOFOLLOW`/`O_EXCL`,
so nothing there is ever followed or overwritten; then one `syncfs` (or an fsync of
every file and folder), a rename that never replaces an existing name, an fsync of the
parent, and a check that the name holds the staging folder (same inode). The index has
passed the path rules (`tree_rules`) before any of this runs.

Costs: each byte is written once, into its own file, and the download needs the tree's
size once; `syncfs` flushes only the tree (docs/PERFORMANCE.md, "Folders written
straight from the verified stream").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import IntegrityError
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_index import TreeIndex
from sfs.peer.open_files import DIR_FLAGS, check_own_file
from sfs.peer.partial import MAX_NAME_BYTES, safe_filename, umask

_RENAME_NOREPLACE = 1


def staging_path(folder: Path, file_id: str) -> Path:
    return folder / f".sfs-{file_id}.tree"


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def has_syncfs() -> bool:
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


@dataclass
class _OpenFolder:
    path: str
    fd: int
    entry: Entry | None  # None: the staging folder itself


def set_metadata(fd: int, mode: int, mtime_ns: int, fsync: bool) -> None:
    os.fchmod(fd, mode & 0o777)
    os.utime(fd, ns=(mtime_ns, mtime_ns))
    if fsync:
        os.fsync(fd)


class _Finisher:
    """The last pass over the chosen entries, in index order: the links and the empty
    files made, the stricter modes set (a file gets its mode at least 0600 when its last
    chunk is written, so that a resumed download can read it back), and each folder's
    mode and mtime once the index has left it (making its children would change them).
    Index order lists a folder's contents directly after it, so only the folders on the
    current path are open: never more descriptors than the tree is deep."""

    def __init__(
        self, root_fd: int, root: Path, tree: TreeIndex, present: bytearray, fsync_each: bool
    ) -> None:
        self.root = root
        self.tree = tree
        self.present = present
        self.fsync_each = fsync_each
        self.open: list[_OpenFolder] = [_OpenFolder("", root_fd, None)]

    def folder_fd(self, parent: str) -> int:
        """The parent's descriptor, finishing the folders the index has left."""
        while self.open[-1].path != parent:
            self._finish(self.open.pop())
        return self.open[-1].fd

    def add(self, entry: Entry, file_number: int) -> None:
        parent, _, name = entry.path.rpartition("/")
        where = self.folder_fd(parent)
        if entry.kind == FOLDER:
            self.open.append(_OpenFolder(entry.path, os.open(name, DIR_FLAGS, dir_fd=where), entry))
        elif entry.kind == LINK:
            os.symlink(entry.target or "", name, dir_fd=where)
            with contextlib.suppress(NotImplementedError, OSError):  # links: not everywhere
                os.utime(name, ns=(entry.mtime_ns,) * 2, dir_fd=where, follow_symlinks=False)
        elif entry.size == 0 or entry.mode & 0o600 != 0o600:
            made = 0 if self.present[file_number] else os.O_CREAT | os.O_EXCL
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | made
            fd = os.open(name, flags, 0o600, dir_fd=where)
            check_own_file(fd, self.root / entry.path)
            try:
                set_metadata(fd, entry.mode, entry.mtime_ns, self.fsync_each)
            finally:
                os.close(fd)

    def _finish(self, folder: _OpenFolder) -> None:
        try:
            if folder.entry is not None:
                set_metadata(folder.fd, folder.entry.mode, folder.entry.mtime_ns, self.fsync_each)
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


def finish_tree(
    root_fd: int,
    folder: Path,
    tree: TreeIndex,
    file_id: str,
    chosen: set[int] | None,
    present: bytearray,
) -> Path:
    """Finish the staging folder open as `root_fd`, whose files hold every chosen chunk,
    verified (the entries `chosen`, or all; `present`: the files there, by file number),
    make it durable and give it its name in `folder` (never an existing one: `name (1)`...)."""
    staging = staging_path(folder, file_id)
    fsync_each = not has_syncfs()
    finisher = _Finisher(root_fd, staging, tree, present, fsync_each)
    try:
        file_number = 0
        for number, entry in enumerate(tree.entries):
            if chosen is None or number in chosen:
                finisher.add(entry, file_number)
            file_number += entry.kind == FILE
        finisher.finish()
    finally:
        finisher.close()
    os.fchmod(root_fd, 0o777 & ~umask())
    if not fsync_each and not _syncfs(root_fd):
        os.sync()  # syncfs failed: make everything durable rather than nothing
    elif fsync_each:
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


def _name_unused(folder: Path, staging: Path, name: str) -> Path:
    folder_fd = os.open(folder, DIR_FLAGS & ~os.O_NOFOLLOW)
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
