"""What an earlier, interrupted folder `get` left in its staging tree, checked before
anything in it is used again (`tree_staging`).

Walked through folder descriptors, never following a link. Every name must be an entry
of the owner-signed index, of the index's kind and this user's; anything else (a link
where a file or folder belongs, a FIFO, a hard link, a name not in the share) refuses
the download with one line naming it, and nothing there is touched. What is the index's
but not wanted now is removed: entries an earlier `--include` chose and this one does
not, and links (remade when the tree is finished). Folders go back to 0700 and files to
0600 at least (a finish that was interrupted may have set the entries' own, stricter
modes). The bytes are not trusted here: `StagingTree.resume` re-hashes every chunk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from sfs.common.tree import FILE, FOLDER, LINK
from sfs.common.tree_index import TreeIndex
from sfs.peer.open_files import DIR_FLAGS, in_the_way


def _chmod_entry(name: str, dir_fd: int, seen: os.stat_result, mode: int) -> None:
    """chmod the entry `seen` at `name`, never through a link: pinned by an `O_PATH`
    descriptor (which needs no permission on the entry), then changed through /proc."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
            raise OSError(f"{name} changed while it was checked")
        os.chmod(f"/proc/self/fd/{fd}", mode)  # noqa: PTH101
    finally:
        os.close(fd)


def check_kept(
    root_fd: int, root: Path, tree: TreeIndex, chosen: set[int] | None, present: bytearray
) -> None:
    """Check the staging tree open as `root_fd` (see the module docstring), marking in
    `present` (by file number) the files that are there. Depth first, with only the
    folders on the current path open (a folder of 10,000 subfolders is no 10,000
    descriptors)."""
    checker = _Checker(root, tree, chosen, present)
    fd = os.dup(root_fd)
    stack: list[tuple[str, int, Iterator[str]]] = []
    try:
        stack.append(("", fd, iter(checker.folder(fd, ""))))
        while stack:
            base, fd, rest = stack[-1]
            name = next(rest, None)
            if name is None:
                stack.pop()
                os.close(fd)
                continue
            path = f"{base}/{name}" if base else name
            inner = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                subfolders = checker.folder(inner, path)
            except BaseException:
                os.close(inner)
                raise
            stack.append((path, inner, iter(subfolders)))
    finally:
        for _, fd, _ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Checker:
    def __init__(
        self, root: Path, tree: TreeIndex, chosen: set[int] | None, present: bytearray
    ) -> None:
        self.root = root
        self.tree = tree
        self.chosen = chosen
        self.present = present
        self.numbers = {entry.path: number for number, entry in enumerate(tree.entries)}
        self.file_numbers: dict[int, int] = {}
        for number, entry in enumerate(tree.entries):
            if entry.kind == FILE:
                self.file_numbers[number] = len(self.file_numbers)
        self.uid = os.getuid()

    def folder(self, fd: int, base: str) -> list[str]:
        """Check the entries of the folder open as `fd` (at `base`); the subfolders to
        check next."""
        subfolders = []
        for name in os.listdir(fd):
            path = f"{base}/{name}" if base else name
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            number = self.numbers.get(path)
            if number is None or info.st_uid != self.uid:
                raise in_the_way(self.root / path)
            kind = self.tree.entries[number].kind
            wanted = self.chosen is None or number in self.chosen
            if stat.S_ISLNK(info.st_mode) and kind == LINK:
                os.unlink(name, dir_fd=fd)  # remade at the finish
            elif stat.S_ISDIR(info.st_mode) and kind == FOLDER:
                if info.st_mode & 0o777 != 0o700:
                    _chmod_entry(name, fd, info, 0o700)
                if wanted:
                    subfolders.append(name)
                else:
                    shutil.rmtree(name, dir_fd=fd)
            elif stat.S_ISREG(info.st_mode) and kind == FILE and info.st_nlink == 1:
                if not wanted:
                    os.unlink(name, dir_fd=fd)
                    continue
                if info.st_mode & 0o600 != 0o600:
                    _chmod_entry(name, fd, info, 0o600)
                self.present[self.file_numbers[number]] = 1
            else:
                raise in_the_way(self.root / path)
        return subfolders
