"""Version 2 trees made in memory for tests: a file share of some bytes, as its owner
would sign it, without a file on disk."""

from __future__ import annotations

from dataclasses import dataclass

from sfs.common import crypto
from sfs.common.chunkmap import chunk_count_of
from sfs.common.manifest import DEFAULT_CHUNK_SIZE, MAX_CHUNKS
from sfs.common.tree import (
    ENTRY_PAGES,
    FILE,
    FOLDER,
    HASH_PAGES,
    HASHES_PER_PAGE,
    MAX_ENTRIES,
    MAX_PAGES,
    TREE_VERSION,
    Entry,
    TreeHeader,
    entry_pages_of,
    hash_pages_of,
    page_hashes_of,
)
from sfs.common.tree_hash import TREE_HASH_SIZE, blake3_256
from sfs.common.tree_index import Pages, TreeIndex, pack_pages

MTIME_NS = 1_700_000_000 * 10**9


@dataclass(frozen=True)
class FileTree:
    header: TreeHeader
    header_bytes: bytes
    pages: Pages
    index: TreeIndex

    @property
    def packed_pages(self) -> bytes:
        return pack_pages(self.pages)


def file_tree(
    data: bytes,
    chunk_size: int,
    *,
    name: str = "data.bin",
    owner: str = "alice",
    owner_fp: bytes = b"\x01" * 32,
    keywords: list[str] | None = None,
    share_id: bytes | None = None,
    created: int = 1_700_000_000,
) -> FileTree:
    """`data` as a file share named `name`, in chunks of `chunk_size` (any size: the
    header's bounds are checked on decoding, not here)."""
    entries = [Entry(name, FILE, len(data), 0o644, MTIME_NS)]
    entry_pages = entry_pages_of(entries)
    hashes = b"".join(blake3_256(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))
    hash_pages = hash_pages_of(hashes)
    header = TreeHeader(
        version=TREE_VERSION,
        share_id=crypto.random_bytes(16) if share_id is None else share_id,
        kind=FILE,
        name=name,
        owner=owner,
        owner_fp=owner_fp,
        keywords=keywords or [],
        created=created,
        files=1,
        folders=0,
        links=0,
        size=len(data),
        chunk_size=chunk_size,
        chunk_count=chunk_count_of(len(data), chunk_size),
        entry_pages=page_hashes_of(ENTRY_PAGES, entry_pages),
        hash_pages=page_hashes_of(HASH_PAGES, hash_pages),
    )
    pages = Pages(entry_pages, hash_pages)
    return FileTree(header, header.encode(), pages, TreeIndex(header, entries, hashes, pages))


def largest_header(owner: str, owner_fp: bytes, name: str = "big") -> bytes:
    """The largest tree header a broker accepts (about 70 KB), crafted as a hostile
    client may: 1,048,576 entries and 262,144 chunks, so the most page hashes there are,
    random (nobody will ever ask for the pages)."""
    size = MAX_CHUNKS * DEFAULT_CHUNK_SIZE
    header = TreeHeader(
        version=TREE_VERSION,
        share_id=crypto.random_bytes(16),
        kind=FOLDER,
        name=name,
        owner=owner,
        owner_fp=owner_fp,
        keywords=[],
        created=1_700_000_000,
        files=MAX_ENTRIES,
        folders=0,
        links=0,
        size=size,
        chunk_size=DEFAULT_CHUNK_SIZE,
        chunk_count=MAX_CHUNKS,
        entry_pages=crypto.random_bytes(MAX_PAGES * TREE_HASH_SIZE),
        hash_pages=crypto.random_bytes(MAX_CHUNKS // HASHES_PER_PAGE * TREE_HASH_SIZE),
    )
    return header.encode()


def crafted_tree(
    entries: list[Entry],
    data: bytes,
    *,
    name: str = "tree",
    owner: str = "alice",
    owner_fp: bytes = b"\x01" * 32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    counts: tuple[int, int, int] | None = None,
) -> FileTree:
    """A folder share of `entries` whose files' bytes, in order, are `data`, as a hostile
    owner may sign it: nothing here checks the path rules. `counts` (files, folders,
    links) replaces the true ones, for a header that lies."""
    entry_pages = entry_pages_of(entries)
    hashes = b"".join(blake3_256(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))
    hash_pages = hash_pages_of(hashes)
    kinds = [entry.kind for entry in entries]
    files, folders, links = counts or (kinds.count(FILE), kinds.count(FOLDER), kinds.count("link"))
    header = TreeHeader(
        version=TREE_VERSION,
        share_id=crypto.random_bytes(16),
        kind=FOLDER,
        name=name,
        owner=owner,
        owner_fp=owner_fp,
        keywords=[],
        created=1_700_000_000,
        files=files,
        folders=folders,
        links=links,
        size=len(data),
        chunk_size=chunk_size,
        chunk_count=chunk_count_of(len(data), chunk_size),
        entry_pages=page_hashes_of(ENTRY_PAGES, entry_pages),
        hash_pages=page_hashes_of(HASH_PAGES, hash_pages),
    )
    pages = Pages(entry_pages, hash_pages)
    return FileTree(header, header.encode(), pages, TreeIndex(header, entries, hashes, pages))
