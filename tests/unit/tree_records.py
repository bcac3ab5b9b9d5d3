"""Tree headers and indexes for the tree tests, built without a folder or a key."""

from __future__ import annotations

from typing import Any

from sfs.common.chunkmap import chunk_count_of
from sfs.common.tree import (
    ENTRY_PAGES,
    HASH_PAGES,
    TREE_VERSION,
    Entry,
    TreeHeader,
    entry_pages_of,
    hash_pages_of,
    page_hashes_of,
)

CHUNK = 64 * 1024


def make_header(**changes: Any) -> TreeHeader:
    fields: dict[str, Any] = {
        "version": TREE_VERSION,
        "share_id": b"\x01" * 16,
        "kind": "folder",
        "name": "photos",
        "owner": "alice",
        "owner_fp": b"\x07" * 32,
        "keywords": ["holiday"],
        "created": 1_700_000_000,
        "files": 0,
        "folders": 0,
        "links": 0,
        "size": 0,
        "chunk_size": CHUNK,
        "chunk_count": 0,
        "entry_pages": b"",
        "hash_pages": b"",
    }
    fields.update(changes)
    return TreeHeader(**fields)


def make_tree(
    entries: list[Entry], chunk_hashes: bytes, **changes: Any
) -> tuple[TreeHeader, list[bytes], list[bytes]]:
    """A header over these entries and chunk hashes, with its entry and hash pages."""
    entry_pages = entry_pages_of(entries)
    hash_pages = hash_pages_of(chunk_hashes)
    size = sum(e.size for e in entries if e.kind == "file")
    header = make_header(
        files=sum(e.kind == "file" for e in entries),
        folders=sum(e.kind == "folder" for e in entries),
        links=sum(e.kind == "link" for e in entries),
        size=size,
        chunk_count=chunk_count_of(size, changes.get("chunk_size", CHUNK)),
        entry_pages=page_hashes_of(ENTRY_PAGES, entry_pages),
        hash_pages=page_hashes_of(HASH_PAGES, hash_pages),
        **changes,
    )
    return header, entry_pages, hash_pages


def folder_manifest(files: int, name: str = "photos") -> bytes:
    """The encoded header of a folder of `files` empty files, as a store keeps it."""
    entries = [Entry(f"f{n:06}", "file", 0, 0o644, 0) for n in range(files)]
    header, _, _ = make_tree(entries, b"", name=name)
    return header.encode()


def file_manifest(name: str = "notes.txt", keywords: list[str] | None = None) -> bytes:
    """The encoded header of a file share (an empty file), as a store keeps it."""
    header, _, _ = make_tree(
        [Entry(name, "file", 0, 0o644, 0)], b"", kind="file", name=name, keywords=keywords or []
    )
    return header.encode()
