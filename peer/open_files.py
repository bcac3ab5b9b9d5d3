"""Descriptors of a staging tree's files and folders (`tree_staging`), each opened
through its folder's descriptor and never through a link, kept in two small caches.

Chunks arrive in stream order, so a file is written by a few consecutive chunks and then
never again: the caches hold the last `MAX_OPEN_FILES` files and `MAX_OPEN_FOLDERS`
folders used, and a download of 100,000 files never nears the open-file limit (1,024 by
default). Every file opened is checked on its descriptor (a regular file of this user
with one link) before a byte goes through it: a link, a folder or a hard link to some
other file put at its name is refused, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from pathlib import Path

from sfs.common.errors import StorageError

MAX_OPEN_FILES = 64
MAX_OPEN_FOLDERS = 16
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_CREAT | os.O_EXCL


def in_the_way(path: Path) -> StorageError:
    return StorageError(
        f"{path} is in the way and is not part of this download (a link, another kind of "
        "file, or another user's); move it elsewhere"
    )


def check_own_file(fd: int, path: Path) -> None:
    """Refuse (closing `fd`) anything but a regular file of this user with one link."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_nlink != 1:
        os.close(fd)
        raise in_the_way(path)


class OpenFiles:
    """The open descriptors of one staging tree, opened relative to `root_fd`."""

    def __init__(self, root_fd: int, root: Path) -> None:
        self.root_fd = root_fd
        self.root = root
        self._files: OrderedDict[int, int] = OrderedDict()  # file number -> fd
        self._folders: OrderedDict[str, int] = OrderedDict()  # folder path -> fd

    def folder(self, path: str) -> int:
        """The descriptor of the folder at `path` ("" is the staging folder)."""
        if not path:
            return self.root_fd
        fd = self._folders.get(path)
        if fd is not None:
            self._folders.move_to_end(path)
            return fd
        parent, _, name = path.rpartition("/")
        where = self.folder(parent)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=where)
        except OSError as exc:
            if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
                raise in_the_way(self.root / path) from exc
            raise
        self._folders[path] = fd
        if len(self._folders) > MAX_OPEN_FOLDERS:
            os.close(self._folders.popitem(last=False)[1])
        return fd

    def file(self, number: int, path: str, create: bool, keep: bool = True) -> int:
        """The descriptor of file `number` at `path`, made (`O_EXCL`) if `create`. With
        `keep` it stays in the cache; else the caller closes it."""
        fd = self._files.get(number)
        if fd is not None:
            self._files.move_to_end(number)
            return fd
        parent, _, name = path.rpartition("/")
        where = self.folder(parent)
        flags = _FILE_FLAGS | (_CREATE if create else 0)
        try:
            fd = os.open(name, flags, 0o600, dir_fd=where)
        except OSError as exc:
            if isinstance(exc, (FileExistsError, IsADirectoryError)) or exc.errno == errno.ELOOP:
                raise in_the_way(self.root / path) from exc
            raise
        if not create:  # O_CREAT | O_EXCL made a new regular file of ours: nothing to check
            check_own_file(fd, self.root / path)
        if keep:
            self._files[number] = fd
            if len(self._files) > MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        return fd

    def forget(self, number: int) -> int | None:
        """Take file `number` out of the cache (its descriptor, for the caller to close)."""
        return self._files.pop(number, None)

    def close(self) -> None:
        """Close every cached descriptor (not the staging folder's)."""
        for fd in [*self._files.values(), *self._folders.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()
        self._folders.clear()
