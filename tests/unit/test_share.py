"""sfs.peer.share: building the manifest of a local file, and checking what a user typed."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from pathlib import Path

import pytest

from sfs.common.errors import UsageError
from sfs.common.manifest import DEFAULT_CHUNK_SIZE, decode_manifest, verify_manifest
from sfs.peer.keys import Identity, create_identity
from sfs.peer.share import (
    MAX_KEYWORD_LENGTH,
    MAX_KEYWORDS,
    build_manifest,
    build_stamped_manifest,
    check_usernames,
    normalise_keywords,
    shareable_file,
)
from sfs.peer.stamps import stamp_of

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return create_identity(tmp_path_factory.mktemp("alice"), "alice")


def expected_chunk_hashes(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    return b"".join(
        hashlib.sha256(data[i : i + chunk_size]).digest() for i in range(0, len(data), chunk_size)
    )


# --- build_manifest -------------------------------------------------------------------------


def test_sharing_records_the_stamp_of_the_file_hashed(tmp_path: Path, alice: Identity) -> None:
    """The holder skips its per-chunk hash while this stamp holds (see test_stamps)."""
    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 1000)
    manifest, stamp = build_stamped_manifest(path, alice, [])
    assert manifest == dataclasses.replace(
        build_manifest(path, alice, []), share_id=manifest.share_id, created=manifest.created
    )
    assert stamp == stamp_of(path.stat())


@pytest.mark.parametrize(
    ("size", "chunks"),
    [(0, 0), (1, 1), (MiB - 1, 1), (MiB, 1), (MiB + 1, 2), (2 * MiB + 12345, 3)],
)
def test_manifest_hashes_match_hashlib(
    tmp_path: Path, alice: Identity, size: int, chunks: int
) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    manifest = build_manifest(path, alice, ["k"])
    assert manifest.size == size
    assert manifest.chunk_size == DEFAULT_CHUNK_SIZE
    assert manifest.chunk_count == chunks
    assert manifest.chunk_hashes == expected_chunk_hashes(data)
    assert manifest.sha256 == hashlib.sha256(data).digest()
    for index in range(chunks):
        start = index * DEFAULT_CHUNK_SIZE
        chunk = data[start : start + DEFAULT_CHUNK_SIZE]
        assert manifest.chunk_hash(index) == hashlib.sha256(chunk).digest()
        assert manifest.chunk_length(index) == len(chunk)


def test_manifest_names_the_file_and_the_owner(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "Quarterly report.pdf"
    path.write_bytes(b"content")
    manifest = build_manifest(path, alice, ["finance", "q3"])
    assert manifest.name == "Quarterly report.pdf"
    assert manifest.owner == "alice"
    assert manifest.owner_fp == alice.fingerprint
    assert manifest.keywords == ["finance", "q3"]
    assert manifest.version == 1
    assert len(manifest.share_id) == 16
    assert build_manifest(path, alice, []).share_id != manifest.share_id  # random per share


def test_manifest_encodes_decodes_and_verifies_once_signed(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * (MiB + 3))
    manifest = build_manifest(path, alice, ["k"])
    encoded = manifest.encode()
    assert decode_manifest(encoded) == manifest
    assert verify_manifest(encoded, alice.sign(encoded), alice.bundle) == manifest


def test_progress_reports_every_chunk(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(2 * MiB + 5))
    calls: list[tuple[int, int]] = []
    build_manifest(path, alice, [], progress=lambda done, total: calls.append((done, total)))
    size = 2 * MiB + 5
    assert calls == [(MiB, size), (2 * MiB, size), (size, size)]


# --- normalise_keywords ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], []),
        (["Report"], ["report"]),
        (["Foo", "foo", "FOO", " foo "], ["foo"]),
        (["b", "a", "B"], ["b", "a"]),  # the order given, first occurrence wins
        (["Annual   Report", "annual report", "\tannual\nreport "], ["annual report"]),
        (["ÉTÉ"], ["été"]),
    ],
)
def test_normalise_keywords(given: list[str], expected: list[str]) -> None:
    assert normalise_keywords(given) == expected


def test_keywords_up_to_the_length_limit_pass() -> None:
    keyword = "k" * MAX_KEYWORD_LENGTH
    assert normalise_keywords([keyword.upper()]) == [keyword]


@pytest.mark.parametrize("keyword", ["k" * (MAX_KEYWORD_LENGTH + 1), "", "   ", "\n"])
def test_a_keyword_too_long_or_empty_is_refused(keyword: str) -> None:
    with pytest.raises(UsageError, match="keywords"):
        normalise_keywords(["fine", keyword])


def test_too_many_keywords_are_refused() -> None:
    assert len(normalise_keywords([f"k{i}" for i in range(MAX_KEYWORDS)])) == MAX_KEYWORDS
    # duplicates do not count
    assert len(normalise_keywords([f"K{i % MAX_KEYWORDS}" for i in range(200)])) == MAX_KEYWORDS
    with pytest.raises(UsageError, match="at most"):
        normalise_keywords([f"k{i}" for i in range(MAX_KEYWORDS + 1)])


# --- check_usernames ------------------------------------------------------------------------


def test_valid_usernames_are_sorted_and_deduplicated() -> None:
    assert check_usernames(["carol", "bob", "a.b-c_d", "bob", "0x"]) == [
        "0x",
        "a.b-c_d",
        "bob",
        "carol",
    ]
    assert check_usernames([]) == []
    assert check_usernames(["a" * 32]) == ["a" * 32]


@pytest.mark.parametrize(
    "name",
    ["", "Alice", "-bob", ".bob", "_bob", "bob smith", "a" * 33, "bob\n", "../x", "bob/x", "böb"],
)
def test_invalid_usernames_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="username"):
        check_usernames(["bob", name])


# --- shareable_file -------------------------------------------------------------------------


def test_a_regular_file_is_shareable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f.txt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    result = shareable_file(Path("f.txt"))
    assert result == tmp_path.resolve() / "f.txt"
    assert result.is_absolute()


def test_a_symlink_resolves_to_its_target(tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_bytes(b"x")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    assert shareable_file(tmp_path / "link.txt") == (tmp_path / "real.txt").resolve()


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a regular file"):
        shareable_file(tmp_path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        shareable_file(tmp_path / "missing.txt")


def test_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(UsageError, match="no such file"):
        shareable_file(tmp_path / "link")


def test_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UsageError, match="not a regular file"):
        shareable_file(tmp_path / "pipe")
