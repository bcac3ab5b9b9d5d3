"""sfs.common.tree: the signed header, the paged index, and their checks."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc

import pytest
from blake3 import blake3

from sfs.common import crypto
from sfs.common.codec import pack, to_wire
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.identity import KeyBundle
from sfs.common.tree import (
    ENTRIES_PER_PAGE,
    ENTRY_PAGES,
    FOLDER_MARK,
    HASH_PAGES,
    HASHES_PER_PAGE,
    MAX_PAGES,
    TREE_VERSION,
    Entry,
    decode_header,
    kind_and_files,
    page_hash,
    verify_entry_page,
    verify_hash_page,
    verify_header,
    verify_page,
)
from sfs.common.tree_rules import TreeChecker, check_totals
from tests.unit.tree_records import CHUNK, file_manifest, folder_manifest, make_header, make_tree


def files(count: int, size: int = 1) -> list[Entry]:
    return [Entry(f"f{i:06}", "file", size, 0o644, 1_000 + i) for i in range(count)]


def hashes(count: int) -> bytes:
    return b"".join(i.to_bytes(32, "big") for i in range(count))


def test_page_hash_is_blake3_over_the_labelled_page() -> None:
    expected = blake3(pack(["sfs-page-v2", "entries", 3, b"page"])).digest()
    assert page_hash(ENTRY_PAGES, 3, b"page") == expected


def test_pages_verify_and_decode() -> None:
    entries = files(ENTRIES_PER_PAGE + 3)
    header, entry_pages, hash_pages = make_tree(entries, hashes(HASHES_PER_PAGE + 1))
    # The sizes are not the point here: a chunk count that needs two hash pages.
    header = dataclasses.replace(header, chunk_count=HASHES_PER_PAGE + 1)
    assert header.entry_page_count == 2 and len(entry_pages) == 2
    assert verify_entry_page(header, 0, entry_pages[0]) == entries[:ENTRIES_PER_PAGE]
    assert verify_entry_page(header, 1, entry_pages[1]) == entries[ENTRIES_PER_PAGE:]
    assert verify_hash_page(header, 1, hash_pages[1]) == hashes(HASHES_PER_PAGE + 1)[-32:]


def test_a_page_from_elsewhere_is_refused() -> None:
    header, entry_pages, hash_pages = make_tree(files(ENTRIES_PER_PAGE + 1), hashes(3))
    with pytest.raises(IntegrityError, match="entries page 1 does not match"):
        verify_page(header, ENTRY_PAGES, 1, entry_pages[0])  # right bytes, wrong index
    with pytest.raises(IntegrityError, match="entries page 0 does not match"):
        verify_entry_page(header, 0, entry_pages[0] + b"\x00")
    with pytest.raises(IntegrityError, match="hashes page 0 does not match"):
        verify_hash_page(header, 0, bytes(len(hash_pages[0])))
    with pytest.raises(IntegrityError, match="no entries page 2"):
        verify_entry_page(header, 2, entry_pages[0])
    with pytest.raises(IntegrityError, match="no such page kind"):
        verify_page(header, "other", 0, entry_pages[0])


def test_a_signed_page_with_the_wrong_count_is_refused() -> None:
    """A lying owner signs a short page: its hash matches, its count does not."""
    header, _, _ = make_tree(files(4), b"")
    short = pack(to_wire_page(files(3)))
    forged = dataclasses.replace(header, entry_pages=page_hash(ENTRY_PAGES, 0, short))
    with pytest.raises(IntegrityError, match="wrong number of entries"):
        verify_entry_page(forged, 0, short)
    malformed = pack({"entries": [{"path": 1}]})
    forged = dataclasses.replace(header, entry_pages=page_hash(ENTRY_PAGES, 0, malformed))
    with pytest.raises(IntegrityError, match="entry page 0 is malformed"):
        verify_entry_page(forged, 0, malformed)


def to_wire_page(entries: list[Entry]) -> dict[str, object]:
    return {"entries": [to_wire(e) for e in entries]}


def test_a_signed_hash_page_with_the_wrong_count_is_refused() -> None:
    header, _, _ = make_tree(files(1, size=3 * CHUNK), hashes(3))
    short = hashes(2)
    forged = dataclasses.replace(header, hash_pages=page_hash(HASH_PAGES, 0, short))
    with pytest.raises(IntegrityError, match="wrong number of hashes"):
        verify_hash_page(forged, 0, short)


def test_header_roundtrip_and_consistency() -> None:
    header, _, _ = make_tree(files(3, size=CHUNK), hashes(3))
    assert decode_header(header.encode()) == header
    bad = [
        (dict(name=""), "invalid share name"),
        (dict(name="a/b"), "invalid share name"),
        (dict(name=".."), "invalid share name"),
        (dict(chunk_count=2), "chunk count does not match"),
        (dict(files=ENTRIES_PER_PAGE + 1), "entry page hashes do not match"),
        (dict(hash_pages=b""), "hash page hashes do not match"),
        (dict(kind="file"), "a file share holds exactly one file"),
        (dict(version=1), "version: out of range"),
        (dict(entry_pages=bytes(32 * (MAX_PAGES + 1))), "entry_pages: longer than"),
    ]
    for change, message in bad:
        with pytest.raises(ProtocolError, match=message):
            decode_header(dataclasses.replace(header, **change).encode())  # type: ignore[arg-type]


def test_header_signature(bundle: KeyBundle, rsa_key: crypto.RsaPrivateKey) -> None:
    header = make_header(owner_fp=bundle.fingerprint())
    data = header.encode()
    signature = crypto.sign(rsa_key, data)
    assert verify_header(data, signature, bundle) == header
    with pytest.raises(IntegrityError):
        verify_header(data[:-1] + b"\x01", signature, bundle)
    other = make_header(owner_fp=b"\x09" * 32).encode()
    with pytest.raises(IntegrityError, match="different owner key"):
        verify_header(other, crypto.sign(rsa_key, other), bundle)


def test_header_bound_is_under_140_kib() -> None:
    full = make_header(
        name="n" * 255,
        keywords=["k" * 64] * 64,
        entry_pages=bytes(32 * MAX_PAGES),
        hash_pages=bytes(32 * MAX_PAGES),
    )
    assert len(full.encode()) < 140 * 1024


def test_index_of_100000_entries(capsys: pytest.CaptureFixture[str]) -> None:
    """Scale: build and verify the index of a 100,000-file share in memory. Reports its
    figures (run with -s); bounds memory, never time."""
    count = 100_000
    started = time.perf_counter()
    entries = [Entry(f"d{i // 1000:03}/f{i:06}.txt", "file", 4096, 0o644, i) for i in range(count)]
    entries += [Entry(f"d{i:03}", "folder", 0, 0o755, 0) for i in range(100)]
    entries.sort(key=lambda e: e.path.encode().replace(b"/", b"\0"))
    chunk_count = -(-count * 4096 // (1024 * 1024))
    header, entry_pages, hash_pages = make_tree(
        entries, hashes(chunk_count), chunk_size=1024 * 1024
    )
    del entries
    built = time.perf_counter()
    tracemalloc.start()  # only while verifying: it slows every allocation
    checker = TreeChecker()
    for index, page in enumerate(entry_pages):
        for entry in verify_entry_page(header, index, page):
            checker.add(entry)
    for index, page in enumerate(hash_pages):
        verify_hash_page(header, index, page)
    check_totals(header, checker.finish())
    verified = time.perf_counter()
    _, verify_peak = tracemalloc.get_traced_memory()  # the index is held outside
    tracemalloc.stop()
    header_bytes = len(header.encode())
    index_bytes = sum(map(len, entry_pages)) + sum(map(len, hash_pages))
    with capsys.disabled():
        print(
            f"\n100,000 files: header {header_bytes:,} B ({header.entry_page_count} entry + "
            f"{header.hash_page_count} hash pages), index {index_bytes:,} B; build "
            f"{built - started:.2f} s; verify {verified - built:.2f} s (traced), "
            f"traced peak {verify_peak / 2**20:.2f} MiB"
        )
    assert header.entry_page_count == 196 and header.version == TREE_VERSION
    assert header_bytes < 8 * 1024
    # Verifying keeps one page of entries and the open folders, not the tree: the
    # index itself (7 MB, held by the test) was allocated before tracing began.
    assert verify_peak < 4 * 2**20


def test_kind_and_files_of_a_stored_manifest() -> None:
    assert kind_and_files(folder_manifest(3)) == ("folder", 3)
    assert kind_and_files(file_manifest()) == ("file", 1)
    assert kind_and_files(b"a manifest from before tree headers") == ("file", 1)
    # Stores filter on these bytes before decoding: every folder header holds them.
    assert FOLDER_MARK in folder_manifest(0) and FOLDER_MARK not in file_manifest()
