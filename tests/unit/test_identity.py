"""sfs.common.identity: key bundles, fingerprints and their human-readable form."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable

import msgpack
import pytest
import zmq.utils.z85
from hypothesis import given
from hypothesis import strategies as st

from sfs.common import crypto
from sfs.common.codec import from_wire, to_wire
from sfs.common.errors import IntegrityError, ProtocolError, UsageError
from sfs.common.identity import (
    FINGERPRINT_SIZE,
    KeyBundle,
    format_fingerprint,
    parse_fingerprint,
)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprint_is_deterministic(bundle: KeyBundle) -> None:
    copy = KeyBundle(bytes(bundle.rsa_public), bytes(bundle.curve_public))
    assert bundle.fingerprint() == bundle.fingerprint() == copy.fingerprint()
    assert len(bundle.fingerprint()) == FINGERPRINT_SIZE


def test_fingerprint_is_blake2b_over_the_canonical_encoding(bundle: KeyBundle) -> None:
    canonical = msgpack.packb(
        ["sfs-bundle-v1", bundle.rsa_public, bundle.curve_public], use_bin_type=True
    )
    assert bundle.fingerprint() == hashlib.blake2b(canonical, digest_size=32).digest()


def test_fingerprint_changes_with_the_rsa_key(bundle: KeyBundle, other_bundle: KeyBundle) -> None:
    swapped = KeyBundle(other_bundle.rsa_public, bundle.curve_public)
    assert swapped.fingerprint() != bundle.fingerprint()
    one_bit = KeyBundle(flip(bundle.rsa_public, len(bundle.rsa_public) - 1), bundle.curve_public)
    assert one_bit.fingerprint() != bundle.fingerprint()


def test_fingerprint_changes_with_the_curve_key(bundle: KeyBundle) -> None:
    for index in (0, 31):
        changed = KeyBundle(bundle.rsa_public, flip(bundle.curve_public, index))
        assert changed.fingerprint() != bundle.fingerprint()


def test_fingerprint_encoding_keeps_the_two_keys_apart() -> None:
    # Plain concatenation would give these two the same fingerprint.
    assert KeyBundle(b"ab", b"c").fingerprint() != KeyBundle(b"a", b"bc").fingerprint()


# --- format and parse ------------------------------------------------------------------------


def test_format_is_base32_in_groups_of_four(bundle: KeyBundle) -> None:
    text = format_fingerprint(bundle.fingerprint())
    assert re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){12}", text)
    assert text.replace("-", "") == base64.b32encode(bundle.fingerprint()).decode().rstrip("=")


def test_format_known_values() -> None:
    assert format_fingerprint(b"\x00" * 32) == "-".join(["AAAA"] * 13)
    assert format_fingerprint(b"\xff" * 32) == "-".join(["7777"] * 12 + ["777Q"])


def test_format_parse_round_trip(bundle: KeyBundle) -> None:
    fingerprint = bundle.fingerprint()
    assert parse_fingerprint(format_fingerprint(fingerprint)) == fingerprint


@given(st.binary(min_size=32, max_size=32))
def test_format_parse_round_trip_for_any_fingerprint(fingerprint: bytes) -> None:
    assert parse_fingerprint(format_fingerprint(fingerprint)) == fingerprint


@pytest.mark.parametrize(
    "transform",
    [
        str.lower,
        lambda text: text.replace("-", ""),
        lambda text: text.replace("-", "").lower(),
        lambda text: text.replace("-", " "),
        lambda text: f"  {text} ",
        lambda text: text.replace("-", "--"),
    ],
    ids=["lower", "no-dashes", "lower-no-dashes", "spaces", "padded", "double-dashes"],
)
def test_parse_is_lenient_about_case_and_separators(
    bundle: KeyBundle, transform: Callable[[str], str]
) -> None:
    fingerprint = bundle.fingerprint()
    assert parse_fingerprint(transform(format_fingerprint(fingerprint))) == fingerprint


VALID = format_fingerprint(bytes(range(32)))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-",
        "junk",
        "not a fingerprint at all!",
        "0" + VALID[1:],  # 0 is not in the base32 alphabet
        VALID[:-1] + "1",  # 1 is not base32
        VALID[:-1] + "!",
        VALID[:-1] + "é",
    ],
)
def test_parse_refuses_junk(text: str) -> None:
    with pytest.raises(UsageError, match="not a fingerprint"):
        parse_fingerprint(text)


@pytest.mark.parametrize(
    "text",
    [
        VALID[:-5],  # one group short
        VALID + "-AAAA",  # one group too many
        format_fingerprint(b"\x00" * 31),
        format_fingerprint(b"\x00" * 33),
        format_fingerprint(b"\x00" * 16),
        "AAAAAAAA",
    ],
)
def test_parse_refuses_the_wrong_length(text: str) -> None:
    with pytest.raises(UsageError, match="not a fingerprint"):
        parse_fingerprint(text)


# --- the bundle as a record --------------------------------------------------------------------


def test_rsa_key_returns_the_bundled_key(rsa_key: crypto.RsaPrivateKey, bundle: KeyBundle) -> None:
    assert bundle.rsa_key().public_numbers() == rsa_key.public_key().public_numbers()


@pytest.mark.parametrize("rsa_public", [b"", b"junk", b"\x30" * 400])
def test_rsa_key_of_a_bad_bundle_is_an_integrity_error(rsa_public: bytes) -> None:
    with pytest.raises(IntegrityError):
        KeyBundle(rsa_public, b"\x00" * 32).rsa_key()


def test_curve_z85(bundle: KeyBundle) -> None:
    text = bundle.curve_z85()
    assert len(text) == 40
    assert zmq.utils.z85.decode(text) == bundle.curve_public


def test_bundle_wire_round_trip(bundle: KeyBundle) -> None:
    assert from_wire(KeyBundle, to_wire(bundle)) == bundle


@pytest.mark.parametrize(
    "value",
    [
        {"rsa_public": b"x", "curve_public": b"\x00" * 31},
        {"rsa_public": b"x", "curve_public": b"\x00" * 33},
        {"rsa_public": b"x" * 1025, "curve_public": b"\x00" * 32},
        {"rsa_public": "x", "curve_public": b"\x00" * 32},
        {"rsa_public": b"x"},
        {"rsa_public": b"x", "curve_public": b"\x00" * 32, "ed25519": b""},
    ],
)
def test_bundle_wire_validation(value: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        from_wire(KeyBundle, value)
