"""Building a signed tree manifest from a local folder or file (docs/PROTOCOL-v2.md §3).

Symlinks are never followed: the walk uses `os.scandir` and `lstat`, a link inside the
tree is stored as a link with its relative target, and files are opened with
`O_NOFOLLOW`. What cannot be shared is reported as a list, not one at a time:

- links whose target is absolute or leaves the tree: refused, or left out with
  `skip_unsafe` (`Scan.unsafe_skipped` lists them);
- FIFOs, sockets and devices: left out, listed in `Scan.special_skipped` for a warning;
- files or folders that cannot be read, and names that are not UTF-8: refused.

Paths are stored in Unicode NFC (macOS writes NFD), modes masked to 0o777, mtimes in
nanoseconds. The whole entry set then passes the requester's own rules
(`tree_rules.check_entries`), so a share is never built that a requester would refuse.
Hashing reads the files in entry order into one chunk buffer: constant memory. At
100,000 files the entries dominate a share's memory, so nothing else is kept per file:
the path to read a file from is kept only where it is not the root joined with the
entry's path (a name that is not NFC on disk), and a folder keeps no per-file stamps.
"""

from __future__ import annotations

import os
import stat
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sfs.common import crypto
from sfs.common.chunkmap import chunk_count_of
from sfs.common.errors import IntegrityError, StorageError, UsageError
from sfs.common.manifest import MAX_NAME_BYTES, choose_chunk_size
from sfs.common.tree import (
    ENTRY_PAGES,
    FILE,
    FOLDER,
    HASH_PAGES,
    LINK,
    MAX_ENTRIES,
    MODE_BITS,
    TREE_VERSION,
    Entry,
    TreeHeader,
    entry_pages_of,
    hash_pages_of,
    page_hashes_of,
)
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_rules import check_entries, order_key, shown, target_problem
from sfs.peer.keys import Identity
from sfs.peer.stamps import FileStamp, stamp_of

Progress = Callable[[int, int], None]  # (bytes done, total bytes)

LISTED = 20  # names shown in a refusal; the rest are counted
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


@dataclass
class Scan:
    """A tree as found on disk: entries in index order, and where to read each file."""

    root: Path
    kind: str  # "file" | "folder"
    name: str
    entries: list[Entry] = field(default_factory=list)
    # entry path -> the path to read it from, where that is not `root/path`
    odd_sources: dict[str, str] = field(default_factory=dict)
    special_skipped: list[str] = field(default_factory=list)
    unsafe_skipped: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries if entry.kind == FILE)

    def source(self, entry: Entry) -> str:
        return self.odd_sources.get(entry.path) or f"{self.root}/{entry.path}"

    @property
    def sources(self) -> list[str]:
        """For each file entry, in index order, the path to read it from."""
        return [self.source(entry) for entry in self.entries if entry.kind == FILE]


def _listing(paths: list[str]) -> str:
    shown_paths = ", ".join(shown(p) for p in paths[:LISTED])
    more = len(paths) - LISTED
    return shown_paths + (f" and {more} more" if more > 0 else "")


def _nfc(name: str) -> str | None:
    """The name in NFC, or None if it is not valid UTF-8 (surrogate-escaped bytes)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return None
    return unicodedata.normalize("NFC", name)


def _readable(path: str) -> bool:
    try:
        os.close(os.open(path, _OPEN_FLAGS))
    except OSError:
        return False
    return True


class _Walk:
    def __init__(self, scan: Scan, skip_unsafe: bool) -> None:
        self.scan = scan
        self.skip_unsafe = skip_unsafe
        self.unreadable: list[str] = []
        self.unsafe: list[str] = []
        self.bad_names: list[str] = []
        self.entries: list[Entry] = []

    def folder(self, rel: str, real: str) -> None:
        # Iterative, so a deep tree cannot reach Python's recursion limit.
        pending = [(rel, real)]
        while pending:
            rel, real = pending.pop()
            try:
                with os.scandir(real) as listing:
                    children = list(listing)
            except OSError:
                self.unreadable.append(rel or ".")
                continue
            for child in children:
                name = _nfc(child.name)
                if name is None:
                    self.bad_names.append(f"{rel}/{child.name}" if rel else child.name)
                    continue
                path = f"{rel}/{name}" if rel else name
                try:
                    info = child.stat(follow_symlinks=False)
                except OSError:
                    self.unreadable.append(path)
                    continue
                if self.add(path, child.path, info):
                    pending.append((path, child.path))

    def add(self, path: str, real: str, info: os.stat_result) -> bool:
        """Record one entry; True if it is a folder to walk."""
        mode, mtime = info.st_mode & MODE_BITS, info.st_mtime_ns
        if stat.S_ISDIR(info.st_mode):
            self.entries.append(Entry(path, FOLDER, 0, mode, mtime))
            return True
        if stat.S_ISREG(info.st_mode):
            if not _readable(real):
                self.unreadable.append(path)
            self.entries.append(Entry(path, FILE, info.st_size, mode, mtime))
            if self.scan.kind != FOLDER or real != f"{self.scan.root}/{path}":
                self.scan.odd_sources[path] = real
        elif stat.S_ISLNK(info.st_mode):
            self.link(path, real, mode, mtime)
        else:  # FIFOs, sockets, devices: no bytes to share
            self.scan.special_skipped.append(path)
        return False

    def link(self, path: str, real: str, mode: int, mtime: int) -> None:
        try:
            # Not Path.readlink: a Path would tidy the target ("./x" to "x") before it is checked.
            raw = os.readlink(real)  # noqa: PTH115
        except OSError:
            self.unreadable.append(path)
            return
        target = _nfc(raw)
        problem = "target not UTF-8" if target is None else target_problem(path, target)
        if problem is not None or target is None:
            if self.skip_unsafe:
                self.scan.unsafe_skipped.append(path)
            else:
                self.unsafe.append(f"{path} -> {raw}")
            return
        self.entries.append(Entry(path, LINK, 0, mode, mtime, target))

    def finish(self) -> None:
        root = self.scan.root
        if self.bad_names:
            raise UsageError(f"names that are not UTF-8 in {root}: {_listing(self.bad_names)}")
        if self.unsafe:
            raise UsageError(
                f"links in {root} that point outside it (--skip-unsafe leaves them out): "
                f"{_listing(self.unsafe)}"
            )
        if self.unreadable:
            raise StorageError(f"cannot read in {root}: {_listing(sorted(self.unreadable))}")
        if len(self.entries) > MAX_ENTRIES:
            raise UsageError(f"{root} holds more than {MAX_ENTRIES:,} entries")
        self.entries.sort(key=lambda entry: order_key(entry.path))
        self.scan.entries = self.entries
        try:
            check_entries(self.scan.entries)
        except IntegrityError as exc:  # e.g. two names equal after case folding
            raise UsageError(f"cannot share {root}: {exc}") from exc


def scan_tree(root: Path, skip_unsafe: bool = False) -> Scan:
    """The entries of a folder (or of one file) without following any link in it."""
    try:
        resolved = root.expanduser().resolve(strict=True)  # the path the user named
        info = os.lstat(resolved)
    except OSError as exc:
        raise UsageError(f"cannot share {root}: {exc.strerror}") from exc
    name = _nfc(resolved.name)
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise UsageError(f"cannot share {root}: the name must be 1 to {MAX_NAME_BYTES} bytes")
    kind = FOLDER if stat.S_ISDIR(info.st_mode) else FILE
    scan = Scan(resolved, kind, name)
    walk = _Walk(scan, skip_unsafe)
    if kind == FOLDER:
        walk.folder("", str(resolved))
    elif stat.S_ISREG(info.st_mode):
        walk.add(name, str(resolved), info)
    else:
        raise UsageError(f"not a regular file or folder: {root}")
    walk.finish()
    return scan


def hash_chunks(
    scan: Scan, chunk_size: int, progress: Progress | None = None
) -> tuple[bytes, list[FileStamp]]:
    """The BLAKE3 hash of every chunk of the tree's stream, and, of a file share, the
    file's stamp as hashed (a folder's: none, see the module's docstring). Files are
    read into one chunk buffer; a file that changed since the scan
    (size, mtime, or anything else between two fstat calls) is refused."""
    total = scan.size
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    hashes = bytearray()
    stamps: list[FileStamp] = []
    filled = done = 0
    for entry in scan.entries:
        if entry.kind != FILE:
            continue
        source = scan.source(entry)
        try:
            with os.fdopen(os.open(source, _OPEN_FLAGS), "rb", buffering=0) as handle:
                before = os.fstat(handle.fileno())
                if (before.st_size, before.st_mtime_ns) != (entry.size, entry.mtime_ns):
                    raise StorageError(f"{source} changed while the share was built; try again")
                left = entry.size
                while left:
                    want = min(chunk_size - filled, left)
                    got = handle.readinto(view[filled : filled + want])
                    if not got:
                        raise StorageError(f"{source} shrank while it was hashed; try again")
                    filled, left, done = filled + got, left - got, done + got
                    if filled == chunk_size:
                        hashes += blake3_256(view)
                        filled = 0
                    if progress is not None:
                        progress(done, total)
                after = os.fstat(handle.fileno())
        except OSError as exc:
            raise StorageError(f"cannot read {source}: {exc.strerror}") from exc
        if stamp_of(after) != stamp_of(before):
            raise StorageError(f"{source} changed while it was hashed; try again")
        if scan.kind == FILE:
            stamps.append(stamp_of(after))
    if filled:
        hashes += blake3_256(view[:filled])
    return bytes(hashes), stamps


@dataclass(frozen=True)
class BuiltTree:
    """A share ready to register: the signed header and the index pages to serve (not
    the entries: at 100,000 files they are tens of MB, and the pages hold them)."""

    header: TreeHeader
    header_bytes: bytes
    signature: bytes
    entry_pages: list[bytes]
    hash_pages: list[bytes]
    left_out: list[str]  # special files and (with skip_unsafe) unsafe links
    stamps: list[FileStamp]  # of a file share, the file's; of a folder, none


def build_tree(
    root: Path,
    identity: Identity,
    keywords: list[str],
    skip_unsafe: bool = False,
    progress: Progress | None = None,
) -> BuiltTree:
    """Scan, hash and sign a tree, as `share.build_manifest` does for one file in v1.
    Keywords are taken as given (normalise them with `share.normalise_keywords`)."""
    scan = scan_tree(root, skip_unsafe)
    size = scan.size
    chunk_size = choose_chunk_size(size)
    chunk_hashes, stamps = hash_chunks(scan, chunk_size, progress)
    entry_pages = entry_pages_of(scan.entries)
    hash_pages = hash_pages_of(chunk_hashes)
    kinds = [entry.kind for entry in scan.entries]
    header = TreeHeader(
        version=TREE_VERSION,
        share_id=crypto.random_bytes(16),
        kind=scan.kind,
        name=scan.name,
        owner=identity.username,
        owner_fp=identity.fingerprint,
        keywords=keywords,
        created=int(time.time()),
        files=kinds.count(FILE),
        folders=kinds.count(FOLDER),
        links=kinds.count(LINK),
        size=size,
        chunk_size=chunk_size,
        chunk_count=chunk_count_of(size, chunk_size),
        entry_pages=page_hashes_of(ENTRY_PAGES, entry_pages),
        hash_pages=page_hashes_of(HASH_PAGES, hash_pages),
    )
    header_bytes = header.encode()
    return BuiltTree(
        header,
        header_bytes,
        identity.sign(header_bytes),
        entry_pages,
        hash_pages,
        scan.special_skipped + scan.unsafe_skipped,
        stamps,
    )
