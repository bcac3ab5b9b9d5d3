"""The safety code `sfs-peer verify` shows: the same on both sides, made from both full
fingerprints, and a half per user so that a key between them must match a second
preimage of the real key's half, not a collision."""

from __future__ import annotations

import hashlib
import re

import pytest

from sfs.common.codec import pack
from sfs.common.identity import FINGERPRINT_SIZE, safety_code

ALICE = ("alice", bytes(range(32)))
BOB = ("bob", bytes(range(100, 132)))


def _halves(code: str) -> tuple[str, str]:
    digits = code.replace(" ", "")
    return digits[:30], digits[30:]


def test_both_users_see_the_same_code() -> None:
    assert safety_code(ALICE, BOB) == safety_code(BOB, ALICE)


def test_sixty_digits_in_groups_of_five() -> None:
    assert re.fullmatch(r"\d{5}( \d{5}){11}", safety_code(ALICE, BOB))


def test_known_answer() -> None:
    """Pinned so that two versions of sfs keep showing two users the same code."""
    assert safety_code(ALICE, BOB) == (
        "19789 37980 90611 46247 29852 92889 52085 77405 66976 82803 62862 50108"
    )


def test_each_half_is_blake2b_of_the_name_and_fingerprint_mod_ten_to_the_thirty() -> None:
    """The recipe, recomputed with the standard library's BLAKE2b (not PyNaCl's)."""
    expected = ""
    for name, fingerprint in sorted((ALICE, BOB)):
        digest = hashlib.blake2b(pack(["sfs-safety-code-v1", name, fingerprint]), digest_size=32)
        expected += f"{int.from_bytes(digest.digest(), 'big') % 10**30:030d}"
    assert safety_code(BOB, ALICE).replace(" ", "") == expected


def test_a_changed_key_changes_only_its_own_half() -> None:
    """Someone between alice and bob who gives each a key of their own must make each
    forged key's half equal the real key's half: ~2**100 work per half, not a collision."""
    forged_bob = ("bob", bytes(range(101, 133)))
    before, after = _halves(safety_code(ALICE, BOB)), _halves(safety_code(ALICE, forged_bob))
    assert before[0] == after[0]  # alice's half (alice sorts first)
    assert before[1] != after[1]


def test_every_bit_of_the_fingerprint_counts() -> None:
    codes = {safety_code(ALICE, BOB)}
    for byte in range(FINGERPRINT_SIZE):
        changed = bytearray(BOB[1])
        changed[byte] ^= 0x80
        codes.add(safety_code(ALICE, ("bob", bytes(changed))))
    assert len(codes) == FINGERPRINT_SIZE + 1


def test_the_name_is_bound_to_its_key() -> None:
    """The same key presented under another name gives another half."""
    assert safety_code(ALICE, BOB) != safety_code(ALICE, ("bob2", BOB[1]))
    assert _halves(safety_code(ALICE, BOB))[1] != _halves(safety_code(ALICE, ("bobby", BOB[1])))[1]


def test_short_fingerprints_are_refused() -> None:
    with pytest.raises(ValueError, match="full fingerprints"):
        safety_code(ALICE, ("bob", b"\x01" * 16))
