"""A tree share's whole index, checked: the signed header, its entries and chunk hashes.

`IndexReader` takes the pages a holder serves, in any order, and checks each against
the owner's signed header (`tree.verify_entry_page`, `tree.verify_hash_page`) before
any of it is used; `finish` then runs the path rules over every entry
(`tree_rules.TreeChecker`), compares the totals with the header and the sizes with the
chunk count. Only a `TreeIndex` that passed all of that exists for the requester.

A `TreeIndex` answers what the transfer code asks of a share (name, size, chunk size
and count, each chunk's hash and length), so a file share is a tree of one entry on the
same code path. `pack_pages`/`unpack_pages` keep the pages as served, for the local
share registry (owners and seeders serve the exact bytes the owner signed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import msgpack

from sfs.common.chunkmap import ChunkMap
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.tree import (
    ENTRY_PAGES,
    FILE,
    FOLDER,
    HASH_PAGES,
    Entry,
    TreeHeader,
    decode_header,
    verify_entry_page,
    verify_hash_page,
    verify_page,
)
from sfs.common.tree_hash import TREE_HASH_SIZE
from sfs.common.tree_rules import TreeChecker, check_totals


@dataclass(frozen=True)
class Pages:
    """An index as holders serve it: the page bytes the owner signed."""

    entries: list[bytes]
    hashes: list[bytes]

    def page(self, kind: str, index: int) -> bytes | None:
        pages = self.entries if kind == ENTRY_PAGES else self.hashes
        return pages[index] if 0 <= index < len(pages) else None


def pack_pages(pages: Pages) -> bytes:
    """For the local share registry only (never read from the network)."""
    data: bytes = msgpack.packb([pages.entries, pages.hashes], use_bin_type=True)
    return data


def unpack_pages(data: bytes) -> Pages:
    try:
        entries, hashes = msgpack.unpackb(data, raw=False)
        return Pages(list(entries), list(hashes))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError("the share registry holds a damaged index") from exc


class TreeIndex:
    """A checked tree: the header, every entry in index order, every chunk hash."""

    def __init__(
        self,
        header: TreeHeader,
        entries: list[Entry],
        chunk_hashes: bytes,
        pages: Pages | None = None,
    ) -> None:
        self.header = header
        self.pages = pages  # as served, to serve again (seeding)
        self.entries = entries
        self.chunk_hashes = chunk_hashes
        self.files = [entry for entry in entries if entry.kind == FILE]
        self.chunks = ChunkMap((entry.size for entry in self.files), header.chunk_size)

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def owner(self) -> str:
        return self.header.owner

    @property
    def keywords(self) -> list[str]:
        return self.header.keywords

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    @property
    def chunk_count(self) -> int:
        return self.header.chunk_count

    def chunk_hash(self, index: int) -> bytes:
        return self.chunk_hashes[index * TREE_HASH_SIZE : (index + 1) * TREE_HASH_SIZE]

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def matching(self, globs: list[str]) -> set[int]:
        """The entry numbers a `get --include` chooses: paths matching a glob (`*`
        crosses `/`, as in fnmatch), everything inside a folder that matches, and the
        folders on the way to each."""
        chosen: set[int] = set()
        numbers = {entry.path: number for number, entry in enumerate(self.entries)}
        matched_folder = ""  # index order: a folder's contents follow it directly
        for number, entry in enumerate(self.entries):
            if matched_folder and entry.path.startswith(matched_folder + "/"):
                chosen.add(number)
                continue
            matched_folder = ""
            if any(fnmatchcase(entry.path, glob) for glob in globs):
                chosen.add(number)
                if entry.kind == FOLDER:
                    matched_folder = entry.path
        for number in list(chosen):
            parent = self.entries[number].path.rpartition("/")[0]
            while parent and numbers[parent] not in chosen:
                chosen.add(numbers[parent])
                parent = parent.rpartition("/")[0]
        return chosen

    def chunks_of_entries(self, entries: set[int]) -> set[int]:
        """The chunks holding a byte of any chosen file."""
        files: list[int] = []
        file_number = 0
        for number, entry in enumerate(self.entries):
            if entry.kind == FILE:
                if number in entries:
                    files.append(file_number)
                file_number += 1
        return set(self.chunks.chunks_for(files))


class IndexReader:
    """Collects and checks the pages of one header's index, as they arrive."""

    def __init__(self, header: TreeHeader) -> None:
        self.header = header
        self._entries: dict[int, list[Entry]] = {}
        self._hashes: dict[int, bytes] = {}
        self._raw: dict[tuple[str, int], bytes] = {}

    def wanted(self) -> list[tuple[str, int]]:
        """The pages still missing, entry pages first."""
        return [
            (ENTRY_PAGES, i) for i in range(self.header.entry_page_count) if i not in self._entries
        ] + [(HASH_PAGES, i) for i in range(self.header.hash_page_count) if i not in self._hashes]

    def add(self, kind: str, index: int, page: bytes) -> None:
        """Check one page against the signed header; `IntegrityError` if it is not it."""
        if kind == ENTRY_PAGES:
            self._entries[index] = verify_entry_page(self.header, index, page)
        elif kind == HASH_PAGES:
            self._hashes[index] = verify_hash_page(self.header, index, page)
        else:
            raise IntegrityError(f"no such page kind: {kind!r}")
        self._raw[kind, index] = page

    def finish(self, check_rules: bool = True) -> TreeIndex:
        """The whole index, once every page is in and the tree passes the path rules
        (`check_rules` False: for a holder's own registry, checked when it was made)."""
        if self.wanted():
            raise IntegrityError("the tree's index is incomplete")
        checker = TreeChecker()
        entries: list[Entry] = []
        for index in range(self.header.entry_page_count):
            entries.extend(self._entries[index])
        if check_rules:
            for entry in entries:
                checker.add(entry)
            check_totals(self.header, checker.finish())
        hashes = b"".join(self._hashes[i] for i in range(self.header.hash_page_count))
        pages = Pages(
            [self._raw[ENTRY_PAGES, i] for i in range(self.header.entry_page_count)],
            [self._raw[HASH_PAGES, i] for i in range(self.header.hash_page_count)],
        )
        tree = TreeIndex(self.header, entries, hashes, pages)
        tree.chunks.check_chunk_count(self.header.chunk_count)
        return tree


def index_of(header_bytes: bytes, pages: Pages, check_rules: bool = True) -> TreeIndex:
    """The checked index of pages at hand (the owner's or a seeder's own copy).
    `check_rules` False: each page is still checked against the header, then read
    without the codec's per-field checks and the path rules (a holder's own registry,
    checked when the share was made or downloaded: seconds saved at 100,000 files)."""
    if not check_rules:
        return _own_index(decode_header(header_bytes), pages)
    reader = IndexReader(decode_header(header_bytes))
    for kind, index in reader.wanted():
        page = pages.page(kind, index)
        if page is None:
            raise IntegrityError(f"the index has no {kind} page {index}")
        reader.add(kind, index, page)
    return reader.finish(check_rules)


def _own_index(header: TreeHeader, pages: Pages) -> TreeIndex:
    if (len(pages.entries), len(pages.hashes)) != (
        header.entry_page_count,
        header.hash_page_count,
    ):
        raise IntegrityError("the index does not have the header's number of pages")
    entries: list[Entry] = []
    for index, page in enumerate(pages.entries):
        verify_page(header, ENTRY_PAGES, index, page)
        try:
            maps = msgpack.unpackb(page, raw=False)["entries"]
            entries.extend(Entry(**fields) for fields in maps)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"entry page {index} is damaged") from exc
    for index, page in enumerate(pages.hashes):
        verify_hash_page(header, index, page)
    if len(entries) != header.entry_count:
        raise IntegrityError("the index does not hold the header's number of entries")
    return TreeIndex(header, entries, b"".join(pages.hashes), pages)


def pages_of(entry_pages: Sequence[bytes], hash_pages: Sequence[bytes]) -> Pages:
    return Pages(list(entry_pages), list(hash_pages))
