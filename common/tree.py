"""Tree manifests, version 2 (docs/PROTOCOL-v2.md section 3): a share of files and folders.

Two parts:

- the **header**, signed by the owner and kept by the broker: name, owner, counts, total
  size, chunk size and count, and the hash of every index page. Bounded whatever the
  tree: at most 2,048 pages of each kind, so under 140 KiB.
- the **index**, served by holders in pages, each checked against its hash in the signed
  header (`verify_entry_page`, `verify_hash_page`) before any of it is used:
  entry pages of up to 512 entries in the order of their paths' UTF-8 bytes, and hash
  pages of up to 2,048 BLAKE3-256 chunk hashes.

Page hash = BLAKE3-256(msgpack(["sfs-page-v2", kind, index, page bytes])), with kind
"entries" or "hashes". An entry page's bytes are msgpack of a list of entry maps; a hash
page's bytes are its chunk hashes, concatenated. In the header the page hashes are
concatenated too (the codec allows 1,024 items per list; 2,048 hashes are one `bytes`).

The path rules (what a requester refuses) live in `tree_rules`, the chunk arithmetic in
`chunkmap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from sfs.common import crypto
from sfs.common.codec import MaxLen, Pattern, Range, Record, Size, from_wire, pack, to_wire, unpack
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.identity import KeyBundle
from sfs.common.manifest import MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_NAME_BYTES, MIN_CHUNK_SIZE
from sfs.common.protocol import Fingerprint, Keyword, Username
from sfs.common.tree_hash import TREE_HASH_SIZE, blake3_256

TREE_VERSION = 2
ENTRIES_PER_PAGE = 512
HASHES_PER_PAGE = 2048
MAX_PAGES = 2048  # of each kind
MAX_ENTRIES = MAX_PAGES * ENTRIES_PER_PAGE  # 1,048,576
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_TREE_SIZE = MAX_CHUNKS * MAX_CHUNK_SIZE
PAGE_LABEL = "sfs-page-v2"
ENTRY_PAGES = "entries"
HASH_PAGES = "hashes"

FILE, FOLDER, LINK = "file", "folder", "link"
MODE_BITS = 0o777  # never setuid, setgid or sticky


@dataclass(frozen=True)
class Entry(Record):
    """One path of the tree. Folders and links have size 0; only links have a target."""

    path: Annotated[str, MaxLen(MAX_PATH_BYTES)]  # characters here; bytes in tree_rules
    kind: Annotated[str, MaxLen(6), Pattern("file|folder|link")]
    size: Annotated[int, Range(0, MAX_TREE_SIZE)]
    mode: Annotated[int, Range(0, MODE_BITS)]
    mtime_ns: Annotated[int, Range(-(2**63), 2**63 - 1)]
    target: Annotated[str, MaxLen(MAX_PATH_BYTES)] | None = None


@dataclass(frozen=True)
class EntryPage(Record):
    entries: Annotated[list[Entry], MaxLen(ENTRIES_PER_PAGE)]


@dataclass(frozen=True)
class TreeHeader(Record):
    version: Annotated[int, Range(TREE_VERSION, TREE_VERSION)]
    share_id: Annotated[bytes, Size(16)]  # random: sharing a tree twice gives two ids
    kind: Annotated[str, MaxLen(6), Pattern("file|folder")]
    name: Annotated[str, MaxLen(MAX_NAME_BYTES)]
    owner: Username
    owner_fp: Fingerprint
    keywords: Annotated[list[Keyword], MaxLen(64)]
    created: int
    files: Annotated[int, Range(0, MAX_ENTRIES)]
    folders: Annotated[int, Range(0, MAX_ENTRIES)]
    links: Annotated[int, Range(0, MAX_ENTRIES)]
    size: Annotated[int, Range(0, MAX_TREE_SIZE)]
    chunk_size: Annotated[int, Range(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)]
    chunk_count: Annotated[int, Range(0, MAX_CHUNKS)]
    entry_pages: Annotated[bytes, MaxLen(MAX_PAGES * TREE_HASH_SIZE)]  # concatenated
    hash_pages: Annotated[bytes, MaxLen(MAX_PAGES * TREE_HASH_SIZE)]

    @property
    def entry_count(self) -> int:
        return self.files + self.folders + self.links

    @property
    def entry_page_count(self) -> int:
        return len(self.entry_pages) // TREE_HASH_SIZE

    @property
    def hash_page_count(self) -> int:
        return len(self.hash_pages) // TREE_HASH_SIZE

    def page_hash(self, kind: str, index: int) -> bytes:
        hashes = self.entry_pages if kind == ENTRY_PAGES else self.hash_pages
        return hashes[index * TREE_HASH_SIZE : (index + 1) * TREE_HASH_SIZE]

    def encode(self) -> bytes:
        return pack(to_wire(self))


def pages_needed(items: int, per_page: int) -> int:
    return -(-items // per_page)


def decode_header(data: bytes) -> TreeHeader:
    """Decode and check a header's internal consistency, or raise `ProtocolError`."""
    header = from_wire(TreeHeader, unpack(data), "tree header")
    name = header.name
    if not name or "/" in name or name in (".", "..") or len(name.encode()) > MAX_NAME_BYTES:
        raise ProtocolError("tree header: invalid share name")
    if header.entry_count > MAX_ENTRIES:
        raise ProtocolError(f"tree header: more than {MAX_ENTRIES} entries")
    if header.kind == FILE and (header.files, header.folders, header.links) != (1, 0, 0):
        raise ProtocolError("tree header: a file share holds exactly one file")
    if header.chunk_count != -(-header.size // header.chunk_size):
        raise ProtocolError("tree header: the chunk count does not match the size")
    for what, hashes, items, per_page in (
        ("entry", header.entry_pages, header.entry_count, ENTRIES_PER_PAGE),
        ("hash", header.hash_pages, header.chunk_count, HASHES_PER_PAGE),
    ):
        if len(hashes) != pages_needed(items, per_page) * TREE_HASH_SIZE:
            raise ProtocolError(f"tree header: the {what} page hashes do not match the counts")
    return header


# Bytes every encoded folder header holds: its `kind` key and value, side by side. Stores
# look for them before decoding a header (a file header may hold them too, in keywords).
FOLDER_MARK = pack("kind") + pack(FOLDER)


def kind_and_files(manifest: bytes) -> tuple[str, int]:
    """A stored share's kind ("file" or "folder") and number of files, from its header
    (already verified when it was shared). A manifest from before tree headers is one file."""
    try:
        header = decode_header(manifest)
    except ProtocolError:
        return FILE, 1
    return header.kind, header.files


def verify_header(header_bytes: bytes, signature: bytes, owner_bundle: KeyBundle) -> TreeHeader:
    """Check the owner's signature over the exact bytes, then decode them.

    Raises `IntegrityError` if the signature fails, the header is malformed, or it names
    another key than the one that signed it."""
    crypto.verify(owner_bundle.rsa_key(), signature, header_bytes, "tree header")
    try:
        header = decode_header(header_bytes)
    except ProtocolError as exc:
        raise IntegrityError(f"the signed tree header is malformed ({exc})") from exc
    if not crypto.same_bytes(header.owner_fp, owner_bundle.fingerprint()):
        raise IntegrityError(
            "the tree header names a different owner key than the one that signed it"
        )
    return header


# --- index pages ---------------------------------------------------------------------


def page_hash(kind: str, index: int, page: bytes) -> bytes:
    return blake3_256(pack([PAGE_LABEL, kind, index, page]))


def encode_entry_page(entries: Sequence[Entry]) -> bytes:
    return pack(to_wire(EntryPage(list(entries))))


def entry_pages_of(entries: Sequence[Entry]) -> list[bytes]:
    """The entry pages of an index (entries already in path order)."""
    return [
        encode_entry_page(entries[start : start + ENTRIES_PER_PAGE])
        for start in range(0, len(entries), ENTRIES_PER_PAGE)
    ]


def hash_pages_of(chunk_hashes: bytes) -> list[bytes]:
    step = HASHES_PER_PAGE * TREE_HASH_SIZE
    return [chunk_hashes[start : start + step] for start in range(0, len(chunk_hashes), step)]


def page_hashes_of(kind: str, pages: Sequence[bytes]) -> bytes:
    """The concatenated page hashes a header carries."""
    return b"".join(page_hash(kind, index, page) for index, page in enumerate(pages))


def _expected_items(header: TreeHeader, kind: str, index: int) -> int:
    total, per_page, pages = (
        (header.entry_count, ENTRIES_PER_PAGE, header.entry_page_count)
        if kind == ENTRY_PAGES
        else (header.chunk_count, HASHES_PER_PAGE, header.hash_page_count)
    )
    if not 0 <= index < pages:
        raise IntegrityError(f"the tree has no {kind} page {index}")
    return min(per_page, total - index * per_page)


def verify_page(header: TreeHeader, kind: str, index: int, page: bytes) -> None:
    """Raise `IntegrityError` unless `page` is the page the owner signed at `index`."""
    if kind not in (ENTRY_PAGES, HASH_PAGES):
        raise IntegrityError(f"no such page kind: {kind!r}")
    _expected_items(header, kind, index)  # the index exists
    if not crypto.same_bytes(page_hash(kind, index, page), header.page_hash(kind, index)):
        raise IntegrityError(f"{kind} page {index} does not match the signed tree header")


def verify_entry_page(header: TreeHeader, index: int, page: bytes) -> list[Entry]:
    """The entries of a page, once its hash matches the signed header."""
    from sfs.common.entry_page import decode_entries  # here: it imports this module

    verify_page(header, ENTRY_PAGES, index, page)
    try:
        entries = decode_entries(unpack(page), f"entry page {index}")
    except ProtocolError as exc:
        raise IntegrityError(f"the signed entry page {index} is malformed ({exc})") from exc
    if len(entries) != _expected_items(header, ENTRY_PAGES, index):
        raise IntegrityError(f"the signed entry page {index} holds the wrong number of entries")
    return entries


def verify_hash_page(header: TreeHeader, index: int, page: bytes) -> bytes:
    """The concatenated chunk hashes of a page, once its hash matches the signed header."""
    verify_page(header, HASH_PAGES, index, page)
    if len(page) != _expected_items(header, HASH_PAGES, index) * TREE_HASH_SIZE:
        raise IntegrityError(f"the signed hash page {index} holds the wrong number of hashes")
    return page
