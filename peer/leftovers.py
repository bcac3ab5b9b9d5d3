"""Unfinished downloads: the `.sfs-<file id>.part` files (a file share) and
`.sfs-<file id>.tree` staging folders (a folder share) a stopped `get` leaves in a
download folder (see `partial.py`, `tree_staging.py`), listed and, when abandoned, removed.

Only what a download of this user would have made is ever touched: a regular file with
one link, or a folder, owned by this user and named exactly like a partial download. A
symlink (never followed), a FIFO or another user's entry under such a name is left alone,
and so is one a running `get` holds locked. Everything is opened relative to the folder
that was listed, so a folder swapped for a symlink meanwhile is not followed either; a
staging folder is measured and removed through its own descriptor, never following the
links inside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sfs.common.errors import StorageError

_NAME = re.compile(r"\.sfs-([0-9a-f]{32})\.(part|tree)")


@dataclass(frozen=True)
class Leftover:
    file_id: str
    path: Path
    size: int  # bytes so far (verified chunk by chunk when the download resumes)
    modified: float  # when a chunk was last written
    in_use: bool  # a running `get` holds it


@dataclass(frozen=True)
class Cleaned:
    removed: list[Leftover]
    kept_in_use: list[Leftover]  # old enough, but a `get` is writing it
    kept_recent: list[Leftover]  # newer than the limit: perhaps still to be resumed


def unfinished(folder: Path) -> list[Leftover]:
    """The partial downloads in `folder`, oldest first."""
    found = []
    with _folder(folder) as folder_fd:
        if folder_fd is None:
            return []
        for name in _names(folder_fd):
            with _own_partial(folder, folder_fd, name) as opened:
                if opened is not None:
                    found.append(opened[0])
    return sorted(found, key=lambda item: (item.modified, item.file_id))


def clean(folder: Path, older_than: float, now: float) -> Cleaned:
    """Remove the partial downloads in `folder` last written more than `older_than`
    seconds before `now`, except those a running `get` holds locked."""
    removed, in_use, recent = [], [], []
    with _folder(folder) as folder_fd:
        if folder_fd is None:
            return Cleaned([], [], [])
        for name in _names(folder_fd):
            with _own_partial(folder, folder_fd, name) as opened:
                if opened is None:
                    continue
                item, info = opened
                if now - item.modified < older_than:
                    recent.append(item)
                elif item.in_use:
                    in_use.append(item)
                elif _still_named(folder_fd, name, info):
                    # Unlinked while locked: a `get` that opened it meanwhile is refused
                    # ("another get is downloading"), never left writing a removed file.
                    try:
                        if stat.S_ISDIR(info.st_mode):
                            shutil.rmtree(name, dir_fd=folder_fd)
                        else:
                            os.unlink(name, dir_fd=folder_fd)
                    except OSError as exc:
                        raise StorageError(f"cannot remove {item.path}: {exc.strerror}") from exc
                    removed.append(item)
    return Cleaned(removed, in_use, recent)


@contextlib.contextmanager
def _folder(folder: Path) -> Iterator[int | None]:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        raise StorageError(f"cannot read the folder {folder}: {exc.strerror}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _own_partial(
    folder: Path, folder_fd: int, name: str
) -> Iterator[tuple[Leftover, os.stat_result] | None]:
    """The partial download of ours named `name` (and its stat), else None. Unless a
    `get` holds it, it is locked until the block ends."""
    match = _NAME.fullmatch(name)
    if match is None:
        yield None
        return
    tree = match.group(2) == "tree"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if tree else 0)
    try:
        fd = os.open(name, flags, dir_fd=folder_fd)
    except OSError:  # ELOOP: a symlink; EACCES: not ours; ENOENT: gone meanwhile
        yield None
        return
    try:
        info = os.fstat(fd)
        kind_ok = stat.S_ISDIR(info.st_mode) if tree else stat.S_ISREG(info.st_mode)
        if not kind_ok or info.st_uid != os.getuid() or (not tree and info.st_nlink != 1):
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            in_use = False
        except OSError:  # held by a `get`; or no locks here, so no way to know: keep it
            in_use = True
        size, modified = _measured(fd) if tree else (info.st_size, info.st_mtime)
        yield Leftover(match.group(1), folder / name, size, modified, in_use), info
    finally:
        os.close(fd)


def _measured(fd: int) -> tuple[int, float]:
    """The bytes in the files of the staging folder open as `fd`, and when the newest
    of them (or the folder) was changed; links are not followed. The change time, as a
    finished file gets its shared mtime."""
    size, modified = 0, os.fstat(fd).st_ctime
    with contextlib.suppress(OSError):  # unreadable inside: what was seen so far
        for _, _, names, inner_fd in os.fwalk(".", dir_fd=fd):
            for name in names:
                with contextlib.suppress(OSError):
                    info = os.stat(name, dir_fd=inner_fd, follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        size += info.st_size
                        modified = max(modified, info.st_ctime)
    return size, modified


def _names(folder_fd: int) -> list[str]:
    # Listed through the open folder, not its path: a swapped-in symlink is not followed.
    return sorted(os.listdir(folder_fd))


def _still_named(folder_fd: int, name: str, info: os.stat_result) -> bool:
    """Whether `name` (not followed) is still the file that was checked."""
    try:
        now = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)
