"""A user's identity on disk: the RSA key pair and the Curve25519 transport key pair.

    data_dir/keys/signing.pem     RSA-3072 private key, PKCS#8 PEM, mode 0600
    data_dir/keys/transport.key   Curve25519 secret key, z85, mode 0600
    data_dir/keys/public.bundle   both public keys (msgpack), so `whoami` needs no passphrase

Public keys are derived from the private ones, so nothing else needs storing. With a
passphrase, both files are encrypted: the PEM as an encrypted PKCS#8 key, the transport
key as a line `sfs-sealed-v1 <base64>` (see `crypto.seal_with_passphrase`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.public
import zmq.utils.z85

from sfs.common import crypto
from sfs.common.codec import from_wire, pack, to_wire, unpack
from sfs.common.errors import KeyFileError, ProtocolError, StorageError
from sfs.common.files import make_private_dir, read_private_file, write_private_file
from sfs.common.identity import KeyBundle

PassphraseSource = Callable[[], bytes | None]  # asked only when the keys are encrypted
_SEALED = b"sfs-sealed-v1"
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


@dataclass(frozen=True)
class Identity:
    username: str
    signing_key: crypto.RsaPrivateKey
    transport_key: nacl.public.PrivateKey
    bundle: KeyBundle

    @property
    def fingerprint(self) -> bytes:
        return self.bundle.fingerprint()

    @property
    def curve_secret_z85(self) -> bytes:
        return zmq.utils.z85.encode(bytes(self.transport_key))

    @property
    def curve_public_z85(self) -> bytes:
        return zmq.utils.z85.encode(bytes(self.transport_key.public_key))

    def sign(self, data: bytes) -> bytes:
        return crypto.sign(self.signing_key, data)


def _paths(data_dir: Path) -> tuple[Path, Path]:
    keys = data_dir / "keys"
    return keys / "signing.pem", keys / "transport.key"


def _bundle(signing_key: crypto.RsaPrivateKey, transport_key: nacl.public.PrivateKey) -> KeyBundle:
    return KeyBundle(
        crypto.public_key_to_der(signing_key.public_key()), bytes(transport_key.public_key)
    )


def _public_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "public.bundle"


def _save_public(data_dir: Path, bundle: KeyBundle) -> None:
    write_private_file(_public_path(data_dir), pack(to_wire(bundle)))


def load_public_bundle(
    data_dir: Path, username: str, passphrase: PassphraseSource | None = None
) -> KeyBundle:
    """The public keys, read without the private ones (no passphrase asked). Only for
    showing: whatever signs or decrypts loads the private keys, which rewrite this file
    if it ever disagrees with them. An identity made before the file existed is loaded
    in full once (asking for the passphrase if it is encrypted), which writes it."""
    path = _public_path(data_dir)
    if path.exists() and identity_exists(data_dir):
        signing_path, transport_path = _paths(data_dir)
        read_private_file(signing_path, "the signing key")  # refuses a key file others
        read_private_file(transport_path, "the transport key")  # can read, as ever
        with contextlib.suppress(KeyFileError, ProtocolError):
            raw = unpack(read_private_file(path, "the public keys"))
            return from_wire(KeyBundle, raw, "public keys")
    return load_identity(data_dir, username, passphrase).bundle


def identity_exists(data_dir: Path) -> bool:
    return any(path.exists() for path in _paths(data_dir))


def create_identity(data_dir: Path, username: str, passphrase: bytes | None = None) -> Identity:
    """Make and store new key pairs, encrypted when a `passphrase` is given.

    Refuses to overwrite existing ones."""
    if identity_exists(data_dir):
        raise KeyFileError(f"an identity already exists in {data_dir / 'keys'}; not replacing it")
    signing_path, transport_path = _paths(data_dir)
    make_private_dir(signing_path.parent)
    signing_key = crypto.generate_rsa_key()
    transport_key = nacl.public.PrivateKey.generate()
    transport_text = zmq.utils.z85.encode(bytes(transport_key))
    if passphrase:
        sealed = crypto.seal_with_passphrase(bytes(transport_key), passphrase)
        transport_text = _SEALED + b" " + base64.b64encode(sealed)
    write_private_file(signing_path, crypto.private_key_to_pem(signing_key, passphrase))
    write_private_file(transport_path, transport_text + b"\n")
    bundle = _bundle(signing_key, transport_key)
    _save_public(data_dir, bundle)
    return Identity(username, signing_key, transport_key, bundle)


def load_identity(
    data_dir: Path, username: str, passphrase: PassphraseSource | None = None
) -> Identity:
    signing_path, transport_path = _paths(data_dir)
    if not identity_exists(data_dir):
        raise KeyFileError(f"no identity in {data_dir / 'keys'}; run `sfs-peer init` first")
    pem = read_private_file(signing_path, "the signing key")
    text = read_private_file(transport_path, "the transport key").strip()
    encrypted = (pem.lstrip().startswith(_ENCRYPTED_PEM), text.startswith(_SEALED))
    if encrypted[0] != encrypted[1]:
        raise KeyFileError(
            f"the keys in {signing_path.parent} are not both encrypted or both plain; "
            "restore them from a backup"
        )
    secret = None
    if encrypted[0]:
        secret = passphrase() if passphrase is not None else None
        if not secret:
            raise KeyFileError(
                f"the private keys in {signing_path.parent} are passphrase-protected; "
                "set SFS_PASSPHRASE or run from a terminal"
            )
    signing_key = crypto.private_key_from_pem(pem, secret)
    transport_key = _transport_key(text, secret, transport_path)
    bundle = _bundle(signing_key, transport_key)
    _refresh_public(data_dir, bundle)
    return Identity(username, signing_key, transport_key, bundle)


def _refresh_public(data_dir: Path, bundle: KeyBundle) -> None:
    """Write public.bundle if it is missing or disagrees with the private keys (best
    effort: a read-only data folder still works, `whoami` then loads the keys)."""
    wanted = pack(to_wire(bundle))
    with contextlib.suppress(OSError):
        if _public_path(data_dir).read_bytes() == wanted:
            return
    with contextlib.suppress(StorageError):
        write_private_file(_public_path(data_dir), wanted)


def _transport_key(text: bytes, passphrase: bytes | None, path: Path) -> nacl.public.PrivateKey:
    try:
        if passphrase is not None:
            sealed = base64.b64decode(text[len(_SEALED) :].strip(), validate=True)
            raw = crypto.open_with_passphrase(sealed, passphrase)
        else:
            raw = zmq.utils.z85.decode(text)
        if len(raw) != 32:
            raise ValueError("wrong length")
        return nacl.public.PrivateKey(raw)
    except (ValueError, KeyError, struct.error, binascii.Error) as exc:  # z85 raises the first 3
        raise KeyFileError(f"the transport key {path} is malformed") from exc
