"""sfs.common.manifest: what an owner signs, and how a requester checks it."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfs.common import crypto
from sfs.common.codec import pack, to_wire
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.identity import KeyBundle
from sfs.common.manifest import (
    DEFAULT_CHUNK_SIZE,
    HASH_SIZE,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    Manifest,
    choose_chunk_size,
    decode_manifest,
    file_id_of,
    manifest_digest,
    verify_manifest,
)
from sfs.common.protocol import FILE_ID_PATTERN

CHUNK = MIN_CHUNK_SIZE
GiB = 1024**3
TiB = 1024**4


def content_of(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def make_manifest(
    content: bytes = b"hello world",
    chunk_size: int = CHUNK,
    owner_fp: bytes = b"\x07" * 32,
    **changes: Any,
) -> Manifest:
    hashes = b"".join(
        hashlib.sha256(content[i : i + chunk_size]).digest()
        for i in range(0, len(content), chunk_size)
    )
    manifest = Manifest(
        version=1,
        share_id=b"\x01" * 16,
        name="report.pdf",
        size=len(content),
        chunk_size=chunk_size,
        chunk_hashes=hashes,
        sha256=hashlib.sha256(content).digest(),
        owner="alice",
        owner_fp=owner_fp,
        keywords=["quarterly", "report"],
        created=1_700_000_000,
    )
    return dataclasses.replace(manifest, **changes)


def encode_raw(manifest: Manifest, **changes: Any) -> bytes:
    """Encode with arbitrary wire values, bypassing the record's own types."""
    wire = to_wire(manifest)
    for key, value in changes.items():
        if value is ...:
            del wire[key]
        else:
            wire[key] = value
    return pack(wire)


# --- encode / decode ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_encode_decode_round_trip(size: int) -> None:
    manifest = make_manifest(content_of(size))
    data = manifest.encode()
    assert decode_manifest(data) == manifest
    assert manifest.encode() == data  # deterministic: the signature is over these bytes
    assert decode_manifest(data).encode() == data


def test_round_trip_keeps_unicode_names_and_no_keywords() -> None:
    manifest = make_manifest(name="résumé ✓.txt", keywords=[])
    assert decode_manifest(manifest.encode()) == manifest


def test_empty_file() -> None:
    manifest = make_manifest(b"")
    assert manifest.chunk_count == 0
    assert manifest.chunk_hashes == b""
    assert decode_manifest(manifest.encode()).chunk_count == 0


def test_exactly_one_chunk() -> None:
    content = content_of(CHUNK)
    manifest = make_manifest(content)
    assert manifest.chunk_count == 1
    assert manifest.chunk_length(0) == CHUNK
    assert manifest.chunk_hash(0) == hashlib.sha256(content).digest()


def test_less_than_one_chunk() -> None:
    manifest = make_manifest(b"abc")
    assert manifest.chunk_count == 1
    assert manifest.chunk_length(0) == 3
    assert manifest.chunk_hash(0) == hashlib.sha256(b"abc").digest()


def test_multi_chunk_with_a_partial_last_chunk() -> None:
    content = content_of(2 * CHUNK + 100)
    manifest = make_manifest(content)
    assert manifest.chunk_count == 3
    assert [manifest.chunk_length(i) for i in range(3)] == [CHUNK, CHUNK, 100]
    for i in range(3):
        chunk = content[i * CHUNK : (i + 1) * CHUNK]
        assert len(chunk) == manifest.chunk_length(i)
        assert manifest.chunk_hash(i) == hashlib.sha256(chunk).digest()
    assert len({manifest.chunk_hash(i) for i in range(3)}) == 3


def test_multi_chunk_exact_multiple() -> None:
    manifest = make_manifest(content_of(3 * CHUNK))
    assert manifest.chunk_count == 3
    assert manifest.chunk_length(2) == CHUNK


@pytest.mark.parametrize(
    ("size", "chunk_size", "count"),
    [
        (0, DEFAULT_CHUNK_SIZE, 0),
        (1, DEFAULT_CHUNK_SIZE, 1),
        (DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, 1),
        (DEFAULT_CHUNK_SIZE + 1, DEFAULT_CHUNK_SIZE, 2),
        (10 * GiB, DEFAULT_CHUNK_SIZE, 10 * 1024),
        (MAX_CHUNKS * MAX_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_CHUNKS),
    ],
)
def test_chunk_count_arithmetic(size: int, chunk_size: int, count: int) -> None:
    manifest = make_manifest(b"", size=size, chunk_size=chunk_size)
    assert manifest.chunk_count == count
    if count:
        last = size - (count - 1) * chunk_size
        assert manifest.chunk_length(count - 1) == last
        assert 0 < last <= chunk_size


@pytest.mark.parametrize("delta", [-1, +1, -HASH_SIZE, +HASH_SIZE])
def test_decode_refuses_mismatched_chunk_hashes(delta: int) -> None:
    manifest = make_manifest(content_of(2 * CHUNK + 1))
    hashes = manifest.chunk_hashes
    wrong = hashes[:delta] if delta < 0 else hashes + b"\x00" * delta
    with pytest.raises(ProtocolError, match="chunk hashes do not match"):
        decode_manifest(encode_raw(manifest, chunk_hashes=wrong))


def test_decode_refuses_hashes_for_an_empty_file() -> None:
    manifest = make_manifest(b"")
    with pytest.raises(ProtocolError, match="chunk hashes"):
        decode_manifest(encode_raw(manifest, chunk_hashes=b"\x00" * HASH_SIZE))


def test_decode_refuses_no_hashes_for_a_non_empty_file() -> None:
    manifest = make_manifest(b"abc")
    with pytest.raises(ProtocolError, match="chunk hashes"):
        decode_manifest(encode_raw(manifest, chunk_hashes=b""))


@pytest.mark.parametrize("name", ["", "\0", "a\0b", "report.pdf\0", "é" * 128])
def test_decode_refuses_invalid_names(name: str) -> None:
    with pytest.raises(ProtocolError, match=r"invalid file name|NUL character"):
        decode_manifest(make_manifest(name=name).encode())


def test_name_limit_is_255_bytes_and_255_characters() -> None:
    assert decode_manifest(make_manifest(name="a" * 255).encode()).name == "a" * 255
    assert decode_manifest(make_manifest(name="é" * 127 + "a").encode()).name  # 255 bytes
    with pytest.raises(ProtocolError):
        decode_manifest(make_manifest(name="a" * 256).encode())


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 0},
        {"version": 2},
        {"version": True},
        {"share_id": b"\x01" * 15},
        {"share_id": b"\x01" * 17},
        {"size": -1},
        {"chunk_size": MIN_CHUNK_SIZE - 1},
        {"chunk_size": MAX_CHUNK_SIZE + 1},
        {"chunk_size": 0},
        {"sha256": b"\x00" * 31},
        {"owner": "Alice"},
        {"owner": ""},
        {"owner_fp": b"\x00" * 33},
        {"keywords": ["k" * 65]},
        {"keywords": ["k"] * 65},
        {"keywords": "report"},
        {"created": "yesterday"},
        {"created": ...},
        {"name": ...},
        {"extra": 1},
    ],
    ids=repr,
)
def test_decode_refuses_invalid_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_manifest(encode_raw(make_manifest(), **changes))


@pytest.mark.parametrize("data", [b"", b"junk", pack([1, 2, 3]), pack("manifest"), b"\xc1"])
def test_decode_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_manifest(data)


# --- ids and digests ----------------------------------------------------------------------------


def test_file_id_of() -> None:
    data = make_manifest().encode()
    file_id = file_id_of(data)
    assert re.fullmatch(FILE_ID_PATTERN, file_id)
    assert len(file_id) == 32
    assert file_id == hashlib.sha256(data).hexdigest()[:32]
    assert file_id_of(data) == file_id
    assert file_id_of(make_manifest(share_id=b"\x02" * 16).encode()) != file_id


def test_manifest_digest_is_sha256_of_the_exact_bytes() -> None:
    data = make_manifest().encode()
    assert manifest_digest(data) == hashlib.sha256(data).digest()
    assert manifest_digest(data + b"\x00") != manifest_digest(data)


# --- verify_manifest -------------------------------------------------------------------------


@pytest.fixture
def signed(rsa_key: crypto.RsaPrivateKey, bundle: KeyBundle) -> tuple[Manifest, bytes, bytes]:
    manifest = make_manifest(content_of(CHUNK + 1), owner_fp=bundle.fingerprint())
    data = manifest.encode()
    return manifest, data, crypto.sign(rsa_key, data)


def test_verify_manifest_accepts_the_owners_signature(
    signed: tuple[Manifest, bytes, bytes], bundle: KeyBundle
) -> None:
    manifest, data, signature = signed
    assert verify_manifest(data, signature, bundle) == manifest


@pytest.mark.parametrize("index", [0, 200, 383])
def test_verify_manifest_refuses_a_forged_signature(
    signed: tuple[Manifest, bytes, bytes], bundle: KeyBundle, index: int
) -> None:
    _, data, signature = signed
    forged = bytearray(signature)
    forged[index] ^= 0x80
    with pytest.raises(IntegrityError, match="manifest signature does not verify"):
        verify_manifest(data, bytes(forged), bundle)


def test_verify_manifest_refuses_a_random_signature(
    signed: tuple[Manifest, bytes, bytes], bundle: KeyBundle
) -> None:
    _, data, _ = signed
    with pytest.raises(IntegrityError):
        verify_manifest(data, crypto.random_bytes(384), bundle)


def test_verify_manifest_refuses_any_modified_byte(
    signed: tuple[Manifest, bytes, bytes], bundle: KeyBundle
) -> None:
    _, data, signature = signed
    for index in range(0, len(data), max(1, len(data) // 40)):
        modified = bytearray(data)
        modified[index] ^= 0x01
        with pytest.raises(IntegrityError):
            verify_manifest(bytes(modified), signature, bundle)
    with pytest.raises(IntegrityError):
        verify_manifest(data + b"\x00", signature, bundle)


def test_verify_manifest_refuses_a_re_encoded_manifest_with_other_content(
    signed: tuple[Manifest, bytes, bytes], bundle: KeyBundle
) -> None:
    manifest, _, signature = signed
    swapped = dataclasses.replace(manifest, sha256=b"\x66" * 32).encode()
    with pytest.raises(IntegrityError):
        verify_manifest(swapped, signature, bundle)


def test_verify_manifest_refuses_another_owners_bundle(
    signed: tuple[Manifest, bytes, bytes], other_bundle: KeyBundle
) -> None:
    _, data, signature = signed
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify_manifest(data, signature, other_bundle)


def test_verify_manifest_refuses_an_owner_fp_that_is_not_the_signer(
    rsa_key: crypto.RsaPrivateKey, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    # Correctly signed by rsa_key, but the manifest claims another key owns it.
    data = make_manifest(owner_fp=other_bundle.fingerprint()).encode()
    signature = crypto.sign(rsa_key, data)
    with pytest.raises(IntegrityError, match="different owner key"):
        verify_manifest(data, signature, bundle)


def test_verify_manifest_binds_the_curve_key_too(
    signed: tuple[Manifest, bytes, bytes], bundle: KeyBundle
) -> None:
    # Same RSA key (the signature verifies) but another transport key: another fingerprint.
    _, data, signature = signed
    other_curve = KeyBundle(bundle.rsa_public, b"\x09" * 32)
    with pytest.raises(IntegrityError, match="different owner key"):
        verify_manifest(data, signature, other_curve)


def test_verify_manifest_turns_a_signed_malformed_manifest_into_integrity_error(
    rsa_key: crypto.RsaPrivateKey, bundle: KeyBundle
) -> None:
    for data in (b"junk", encode_raw(make_manifest(owner_fp=bundle.fingerprint()), name="")):
        with pytest.raises(IntegrityError, match="malformed"):
            verify_manifest(data, crypto.sign(rsa_key, data), bundle)


def test_verify_manifest_with_a_bundle_that_holds_no_rsa_key(
    signed: tuple[Manifest, bytes, bytes],
) -> None:
    _, data, signature = signed
    with pytest.raises(IntegrityError):
        verify_manifest(data, signature, KeyBundle(b"junk", b"\x00" * 32))


# --- chunk size choice ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk"),
    [
        (0, DEFAULT_CHUNK_SIZE),
        (1, DEFAULT_CHUNK_SIZE),
        (GiB, DEFAULT_CHUNK_SIZE),
        (256 * GiB, DEFAULT_CHUNK_SIZE),
        (256 * GiB + 1, 2 * DEFAULT_CHUNK_SIZE),
        (512 * GiB, 2 * DEFAULT_CHUNK_SIZE),
        (512 * GiB + 1, 4 * DEFAULT_CHUNK_SIZE),
        (TiB, 4 * DEFAULT_CHUNK_SIZE),
        (2 * TiB, 8 * DEFAULT_CHUNK_SIZE),
        (4 * TiB, MAX_CHUNK_SIZE),
        (4 * TiB + 1, MAX_CHUNK_SIZE),  # capped; such a file cannot be shared
        (100 * TiB, MAX_CHUNK_SIZE),
    ],
)
def test_choose_chunk_size(size: int, chunk: int) -> None:
    assert choose_chunk_size(size) == chunk


@given(st.integers(0, MAX_CHUNKS * MAX_CHUNK_SIZE))
def test_chosen_chunk_size_is_the_smallest_that_bounds_the_manifest(size: int) -> None:
    chunk = choose_chunk_size(size)
    assert MIN_CHUNK_SIZE <= DEFAULT_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE
    assert chunk & (chunk - 1) == 0  # a power of two
    assert -(-size // chunk) <= MAX_CHUNKS
    if chunk > DEFAULT_CHUNK_SIZE:
        assert -(-size // (chunk // 2)) > MAX_CHUNKS
