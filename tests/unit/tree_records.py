"""Tree headers and indexes for the tree tests, built without a folder or a key."""

from __future__ import annotations

from typing import Any

from sfs.broker.store_contract import Store
from sfs.common.chunkmap import chunk_count_of
from sfs.common.tree import (
    ENTRY_PAGES,
    FOLDER_MARK,
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


def rows_to_fill_in() -> list[bytes]:
    """Manifests of rows stored before stores kept a share's kind and file count: a
    folder of 600 files, a manifest from before tree headers, and a file whose keywords
    hold the bytes of a folder's kind (to fool a filter on bytes)."""
    looks_like_a_folder = file_manifest(keywords=["kind", "folder"])
    assert FOLDER_MARK in looks_like_a_folder
    return [folder_manifest(600), b"a manifest from before tree headers", looks_like_a_folder]


def assert_filled_in(store: Store, user_id: int, file_ids: list[str]) -> None:
    """The rows of `rows_to_fill_in`, under `file_ids` (shared in that order), after the
    migration: the folder is one, the others are files of one."""
    found = [store.visible_file(file_id, user_id) for file_id in file_ids]
    assert [(f.kind, f.files) for f in found if f] == [("folder", 600), ("file", 1), ("file", 1)]
    assert [(h.file.kind, h.file.files) for h in store.search(user_id, [], None, 5, 9)] == [
        ("file", 1),
        ("file", 1),
        ("folder", 600),
    ]
