"""Key bundles and fingerprints.

A user's key bundle holds two public keys: RSA-3072 (key wrap and signatures) and
Curve25519 (the CurveZMQ transport key). The fingerprint is BLAKE2b-256, made with
PyNaCl, over a canonical encoding of both, shown in groups a person can read aloud.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated

import nacl.encoding
import nacl.hash
import zmq.utils.z85

from sfs.common import crypto
from sfs.common.codec import MaxLen, Record, Size, pack
from sfs.common.errors import UsageError

FINGERPRINT_SIZE = 32
_GROUP = 4


@dataclass(frozen=True)
class KeyBundle(Record):
    rsa_public: Annotated[bytes, MaxLen(1024)]  # DER SubjectPublicKeyInfo
    curve_public: Annotated[bytes, Size(32)]

    def fingerprint(self) -> bytes:
        canonical = pack(["sfs-bundle-v1", self.rsa_public, self.curve_public])
        return nacl.hash.blake2b(
            canonical, digest_size=FINGERPRINT_SIZE, encoder=nacl.encoding.RawEncoder
        )

    def rsa_key(self) -> crypto.RsaPublicKey:
        """The RSA key; raises `IntegrityError` if the bundle holds anything else."""
        return crypto.public_key_from_der(self.rsa_public)

    def curve_z85(self) -> bytes:
        return zmq.utils.z85.encode(self.curve_public)


def format_fingerprint(fingerprint: bytes) -> str:
    """`7XQ2-MB4K-...`: base32 in groups of four."""
    text = base64.b32encode(fingerprint).decode().rstrip("=")
    return "-".join(text[i : i + _GROUP] for i in range(0, len(text), _GROUP))


def parse_fingerprint(text: str) -> bytes:
    cleaned = "".join(ch for ch in text.upper() if ch not in "- ")
    try:
        raw = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"not a fingerprint: {text!r}") from exc
    if len(raw) != FINGERPRINT_SIZE:
        raise UsageError(f"not a fingerprint: {text!r} (wrong length)")
    return raw


SAFETY_CODE_LABEL = "sfs-safety-code-v1"
SAFETY_HALF_DIGITS = 30  # per user: 10**30 ≈ 2**99.7
_SAFETY_GROUP = 5


def safety_code(first: tuple[str, bytes], second: tuple[str, bytes]) -> str:
    """The code two users compare to know they hold each other's real keys: the same for
    both, whichever side computes it. Each (username, fingerprint) gives a half of 30
    digits from BLAKE2b over that user's name and full fingerprint alone, and the halves
    are put in the order of the names, as Signal's safety numbers are made.

    Halves, not one hash over both keys: someone between the two users who controls both
    keys they see would otherwise need only a collision (~2**50 work for 100 bits); a
    half of each real key must instead be matched by a second preimage (~2**100)."""
    halves = sorted((_safety_half(name, fingerprint) for name, fingerprint in (first, second)))
    digits = "".join(half for _, half in halves)
    groups = [digits[i : i + _SAFETY_GROUP] for i in range(0, len(digits), _SAFETY_GROUP)]
    return " ".join(groups)


def _safety_half(username: str, fingerprint: bytes) -> tuple[str, str]:
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise ValueError("a safety code needs full fingerprints")
    digest = nacl.hash.blake2b(
        pack([SAFETY_CODE_LABEL, username, fingerprint]),
        digest_size=32,
        encoder=nacl.encoding.RawEncoder,
    )
    # 256 bits reduced mod 10**30: the bias is far below anything measurable.
    number = int.from_bytes(digest, "big") % 10**SAFETY_HALF_DIGITS
    return username, f"{number:0{SAFETY_HALF_DIGITS}d}"
