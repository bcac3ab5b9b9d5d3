"""Checks `get` makes before it contacts any holder: is the file already in the download
folder, and is there room for it.

Only local paths are read: the file name comes from `safe_filename` over the owner-signed
tree (checked before this runs), and a file counts as already downloaded only if its
size and every chunk's BLAKE3 hash match that tree's index.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import StorageError
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_index import TreeIndex
from sfs.peer.partial import partial_path, safe_filename
from sfs.peer.tree_write import staging_path


def already_downloaded(folder: Path, file_id: str, manifest: TreeIndex) -> Path | None:
    """The file in `folder` under the name a download would take, if it holds exactly
    the manifest's content; else None (missing, another file, unreadable)."""
    path = folder / safe_filename(manifest.name, fallback=file_id)
    try:
        # No symlinks followed, and O_NONBLOCK so a FIFO planted there cannot block.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != manifest.size:
            return None
        for index in range(manifest.chunk_count):
            length = manifest.chunk_length(index)
            block = os.pread(fd, length, index * manifest.chunk_size)
            if len(block) != length or not crypto.same_bytes(
                blake3_256(block), manifest.chunk_hash(index)
            ):
                return None
    except OSError:
        return None
    finally:
        os.close(fd)
    return path


def check_free_space(folder: Path, file_id: str, manifest: TreeIndex) -> None:
    """Refuse to start a download that cannot fit: the file's size, less what an earlier
    try already wrote into its temporary file, must be free in `folder`."""
    if manifest.kind == "folder":
        kept = _tree_blocks(staging_path(folder, file_id))
    else:
        try:
            kept = partial_path(folder, file_id).lstat().st_blocks * 512
        except OSError:
            kept = 0
    needed = max(0, manifest.size - kept)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the download creates the folder
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return  # the download says why it cannot write there (clearer than "0 B free")
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return  # cannot tell: the download reports a full disk if it meets one
    if usage.total == 0:
        return  # a file system that tells no sizes (sysfs, procfs, some FUSE)
    free = usage.free
    if free < needed:
        raise StorageError(
            f"not enough free space in {folder}: {manifest.name!r} needs {human_size(needed)}"
            f" more, {human_size(free)} free; free some space or use --out DIR"
        )


def _tree_blocks(root: Path) -> int:
    """Bytes on disk under `root` (an earlier attempt's staging tree); links not followed."""
    total = 0
    with contextlib.suppress(OSError):  # none there (or unreadable): nothing kept
        for _, _, names, folder_fd in os.fwalk(root):
            for name in names:
                with contextlib.suppress(OSError):
                    info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
                    total += info.st_blocks * 512
    return total


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
