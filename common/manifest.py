"""File manifests: what the owner signs when sharing a file.

A manifest names the file and fixes its content: size, chunk size, the SHA-256 of every
chunk and of the whole file, plus the owner, keywords and time. The owner signs the
exact encoded bytes; the file id is derived from those bytes, so the broker cannot
swap a manifest under an id without the requester noticing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

from sfs.common import crypto
from sfs.common.codec import MaxLen, Range, Record, Size, from_wire, pack, to_wire, unpack
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import Digest, Fingerprint, Keyword, Username

MANIFEST_VERSION = 1
HASH_SIZE = 32
MIN_CHUNK_SIZE = 64 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_CHUNKS = 256 * 1024
MAX_NAME_BYTES = 255


def choose_chunk_size(size: int) -> int:
    """1 MiB chunks up to 256 GiB; larger files get larger chunks to bound the manifest."""
    chunk = DEFAULT_CHUNK_SIZE
    while -(-size // chunk) > MAX_CHUNKS and chunk < MAX_CHUNK_SIZE:
        chunk *= 2
    return chunk


@dataclass(frozen=True)
class Manifest(Record):
    version: Annotated[int, Range(MANIFEST_VERSION, MANIFEST_VERSION)]
    share_id: Annotated[bytes, Size(16)]  # random: sharing a file twice gives two ids
    name: Annotated[str, MaxLen(MAX_NAME_BYTES)]
    size: Annotated[int, Range(0, MAX_CHUNKS * MAX_CHUNK_SIZE)]
    chunk_size: Annotated[int, Range(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)]
    chunk_hashes: Annotated[bytes, MaxLen(MAX_CHUNKS * HASH_SIZE)]  # concatenated SHA-256
    sha256: Digest
    owner: Username
    owner_fp: Fingerprint
    keywords: Annotated[list[Keyword], MaxLen(64)]
    created: int

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_hash(self, index: int) -> bytes:
        return self.chunk_hashes[index * HASH_SIZE : (index + 1) * HASH_SIZE]

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def encode(self) -> bytes:
        return pack(to_wire(self))


def decode_manifest(data: bytes) -> Manifest:
    manifest = from_wire(Manifest, unpack(data), "manifest")
    if len(manifest.chunk_hashes) != manifest.chunk_count * HASH_SIZE:
        raise ProtocolError("manifest: chunk hashes do not match the file size")
    if not manifest.name or len(manifest.name.encode()) > MAX_NAME_BYTES:  # NUL: the codec
        raise ProtocolError("manifest: invalid file name")
    return manifest


def file_id_of(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).digest()[:16].hex()


def manifest_digest(manifest_bytes: bytes) -> bytes:
    return crypto.sha256(manifest_bytes)


def verify_manifest(manifest_bytes: bytes, signature: bytes, owner_bundle: KeyBundle) -> Manifest:
    """Check the owner's signature over the exact bytes, then decode them.

    Raises `IntegrityError` if the signature fails or the manifest names another key.
    """
    crypto.verify(owner_bundle.rsa_key(), signature, manifest_bytes, "manifest")
    try:
        manifest = decode_manifest(manifest_bytes)
    except ProtocolError as exc:
        raise IntegrityError(f"the signed manifest is malformed ({exc})") from exc
    if not crypto.same_bytes(manifest.owner_fp, owner_bundle.fingerprint()):
        raise IntegrityError("the manifest names a different owner key than the one that signed it")
    return manifest
