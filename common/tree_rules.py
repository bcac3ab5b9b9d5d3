"""The path rules of a tree share: what a requester refuses before it writes a byte.

A tree's entries come from its owner (and, page by page, from holders that only relay
them), so each is checked as hostile: `TreeChecker.add` takes the entries in index
order, one at a time, and raises `IntegrityError` with one line naming the first bad
entry; `finish` checks what needs the whole set (links through links) and returns the
totals to compare with the signed header (`check_totals`).

Index order is by path components, each compared as UTF-8 bytes (the order of the paths'
bytes with "/" sorting before every other character): a folder is followed directly by
everything inside it. So the checker keeps only the folders on the path of the current
entry, each with the case-folded names of its children: memory follows the widest
folders on one path, not the whole tree. Two paths that collide on a case-insensitive or
normalising file system (macOS, Windows) collide first at one component, in one folder:
that folder's set catches them however far apart they are in byte order.

Stricter than croc's receive checks and Syncthing's names: besides absolute paths and
`..`, no `.` or empty components, no control characters (C0, DEL, C1), no backslash (a
separator on Windows), paths in Unicode NFC only, every entry's folder listed before it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass

from sfs.common.errors import IntegrityError
from sfs.common.tree import (
    FILE,
    FOLDER,
    LINK,
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    MODE_BITS,
    Entry,
    TreeHeader,
)

MAX_LINK_HOPS = 40  # as Linux's ELOOP limit
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHOWN_CHARS = 200


def shown(path: str) -> str:
    """A path as one printable line: control characters escaped, long paths cut."""
    if len(path) > _SHOWN_CHARS:
        return repr(path[:_SHOWN_CHARS]) + "..."
    return repr(path)


def order_key(path: str) -> bytes:
    """The index order: UTF-8 bytes, with "/" sorting first (paths hold no NUL)."""
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\0")


def fold(name: str) -> str:
    """Names equal under this collide on macOS and Windows (stricter than either)."""
    return unicodedata.normalize("NFC", name.casefold())


def text_problem(text: str, max_bytes: int) -> str | None:
    """What is wrong with a path or link target as text, or None."""
    if not text:
        return "empty"
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > max_bytes:
        return f"longer than {max_bytes:,} bytes"
    control = _CONTROL.search(text)
    if control:
        return f"control character U+{ord(control.group()):04X}"
    if "\\" in text:
        return "backslash (a separator on Windows)"
    if text.startswith("/"):
        return "absolute"
    if unicodedata.normalize("NFC", text) != text:
        return "not in Unicode NFC form"
    return None


def path_problem(path: str) -> str | None:
    """What is wrong with one entry path on its own, or None."""
    problem = text_problem(path, MAX_PATH_BYTES)
    if problem is not None:
        return "empty path" if problem == "empty" else f"path {problem}"
    for component in path.split("/"):
        if component in ("", ".", ".."):
            return f"{component!r} component" if component else "empty component"
        if len(component.encode()) > MAX_COMPONENT_BYTES:
            return f"a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def target_problem(link_path: str, target: str) -> str | None:
    """What is wrong with a link's target read lexically from the link's folder, or None.
    Links through other links are checked by `TreeChecker.finish`."""
    problem = text_problem(target, MAX_PATH_BYTES)
    if problem is not None:
        return f"link target {problem}"
    depth = link_path.count("/")  # the link's folder, below the share's root
    for component in target.split("/"):
        if component == "":
            return "link target has an empty component"
        if component == "..":
            depth -= 1
            if depth < 0:
                return "link target leaves the share"
        elif component != ".":
            depth += 1
    return None


@dataclass(frozen=True)
class Totals:
    files: int
    folders: int
    links: int
    size: int
    only_path: str | None  # the path when the tree holds one entry


@dataclass
class _Folder:
    path: str
    children: dict[str, str]  # folded name -> name as listed


def _refuse(path: str, problem: str) -> IntegrityError:
    return IntegrityError(f"unsafe tree: entry {shown(path)}: {problem}")


class TreeChecker:
    """Checks entries in index order; see the module docstring."""

    def __init__(self) -> None:
        self._stack: list[_Folder] = [_Folder("", {})]
        self._previous: Entry | None = None
        self._previous_key = b""
        self._links: dict[str, tuple[str, str]] = {}  # folded path -> (path, target)
        self._files = self._folders = self._link_count = self._size = 0

    def add(self, entry: Entry) -> None:
        path = entry.path
        problem = path_problem(path) or self._kind_problem(entry)
        if problem is not None:
            raise _refuse(path, problem)
        key = order_key(path)
        if self._previous is not None and key <= self._previous_key:
            raise _refuse(path, "repeated" if key == self._previous_key else "out of order")
        parent, _, name = path.rpartition("/")
        folder = self._folder_of(path, parent)
        folded = fold(name)
        other = folder.children.get(folded)
        if other is not None:
            joined = f"{parent}/{other}" if parent else other
            raise _refuse(path, f"same name as {shown(joined)} after case folding")
        # One string object for both when folding changes nothing: half the memory.
        folder.children[folded] = folded if folded == name else name
        if entry.kind == FOLDER:
            self._stack.append(_Folder(path, {}))
            self._folders += 1
        elif entry.kind == LINK:
            self._links[fold(path)] = (path, entry.target or "")
            self._link_count += 1
        else:
            self._files += 1
            self._size += entry.size
        self._previous, self._previous_key = entry, key

    def _kind_problem(self, entry: Entry) -> str | None:
        if entry.mode & ~MODE_BITS or entry.mode < 0:
            return "mode has bits outside 0o777"
        if entry.size < 0:
            return "negative size"
        if entry.kind == LINK:
            if entry.size != 0:
                return "a link with a size"
            if entry.target is None:
                return "a link without a target"
            return target_problem(entry.path, entry.target)
        if entry.kind not in (FILE, FOLDER):
            return f"unknown kind {entry.kind!r}"
        if entry.target is not None:
            return f"a {entry.kind} with a link target"
        if entry.kind == FOLDER and entry.size != 0:
            return "a folder with a size"
        return None

    def _folder_of(self, path: str, parent: str) -> _Folder:
        """The parent's folder record, closing folders the index has left."""
        while self._stack[-1].path and not (
            parent == self._stack[-1].path or parent.startswith(self._stack[-1].path + "/")
        ):
            self._stack.pop()
        top = self._stack[-1]
        if top.path == parent:
            return top
        previous = self._previous
        if previous is not None and previous.path == parent:  # listed just before: a file
            raise _refuse(path, f"inside {shown(parent)}, which is a {previous.kind}")
        raise _refuse(path, f"its folder {shown(parent)} is not listed before it")

    def finish(self) -> Totals:
        """Check links through links, then return the totals of the tree."""
        for link, target in self._links.values():
            self._check_resolution(link, target)
        only = self._previous.path if self._previous and self._count() == 1 else None
        return Totals(self._files, self._folders, self._link_count, self._size, only)

    def _count(self) -> int:
        return self._files + self._folders + self._link_count

    def _check_resolution(self, link: str, target: str) -> None:
        """Follow a link's target as a file system would, through the tree's other links
        (compared case-folded, as on macOS), and refuse it if it leaves the share."""
        resolved = link.split("/")[:-1]
        pending = deque(target.split("/"))
        hops = 0
        while pending:
            component = pending.popleft()
            if component == ".":
                continue
            if component == "..":
                if not resolved:
                    raise _refuse(link, "link target leaves the share through another link")
                resolved.pop()
                continue
            resolved.append(component)
            hit = self._links.get(fold("/".join(resolved)))
            if hit is not None:
                through = hit[1]
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise _refuse(link, f"link target goes through over {MAX_LINK_HOPS} links")
                resolved.pop()
                pending.extendleft(reversed(through.split("/")))


def check_entries(entries: list[Entry]) -> Totals:
    checker = TreeChecker()
    for entry in entries:
        checker.add(entry)
    return checker.finish()


def check_totals(header: TreeHeader, totals: Totals) -> None:
    """Raise `IntegrityError` unless the checked entries add up to the signed header."""
    listed = (totals.files, totals.folders, totals.links, totals.size)
    signed = (header.files, header.folders, header.links, header.size)
    if listed != signed:
        raise IntegrityError(
            "unsafe tree: the entries hold {} files, {} folders, {} links, {} bytes; "
            "the header says {}, {}, {}, {}".format(*listed, *signed)
        )
    if header.kind == FILE and totals.only_path != header.name:
        raise IntegrityError("unsafe tree: a file share's one entry must be named as the share")
