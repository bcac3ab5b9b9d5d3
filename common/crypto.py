"""The crypto recipes: the only module in sfs that touches `cryptography.hazmat`.

Each recipe has no choices to get wrong. Checks raise `IntegrityError` instead of
returning a bool, and nonces are derived here, never passed in by callers.

- RSA-3072: RSA-OAEP-SHA256 to wrap a transfer key, RSA-PSS-SHA256 to sign.
- AES-256-GCM for file chunks: nonce = base nonce XOR chunk index.
- BLAKE2b-256 keyed with the transfer key: the proof that attaches a data connection.
- Ed25519 for the broker's relay tickets (relays hold only its public half).
- SHA-256 for content, bcrypt for passwords, random tokens stored as SHA-256 hashes.
- Secrets at rest under a passphrase: PKCS#8 encryption for the RSA key, and
  Argon2id + XSalsa20-Poly1305 (libsodium's SecretBox) for the Curve25519 key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass

import bcrypt
import msgpack
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sfs.common.errors import IntegrityError, KeyFileError, UsageError

RSA_BITS = 3072
AES_KEY_SIZE = 32
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
BCRYPT_MAX_PASSWORD_BYTES = 72

RsaPrivateKey = rsa.RSAPrivateKey
RsaPublicKey = rsa.RSAPublicKey

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


# --- randomness, hashing, comparison -------------------------------------------------


def random_bytes(size: int) -> bytes:
    return secrets.token_bytes(size)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def new_sha256() -> hashlib._Hash:
    return hashlib.sha256()


def attach_proof(transfer_key: bytes, transfer_id: bytes, data_ticket: bytes) -> bytes:
    """What a requester shows to attach a data connection to its transfer: BLAKE2b-256
    keyed with the transfer key over the transfer id and the offer's fresh ticket. Only
    who unwrapped the transfer key can make it; it names one transfer, so it attaches
    no other. Compare with `same_bytes`."""
    message = msgpack.packb(["sfs-attach-v2", transfer_id, data_ticket], use_bin_type=True)
    return hashlib.blake2b(message, key=transfer_key, digest_size=32).digest()


def same_bytes(a: bytes, b: bytes) -> bool:
    """Constant-time equality for digests, tokens and fingerprints."""
    return hmac.compare_digest(a, b)


# --- Ed25519: the broker's relay tickets ------------------------------------------------

ED25519_KEY_SIZE = 32


def generate_ticket_key() -> bytes:
    """A new Ed25519 private key, as its 32 raw bytes."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()


def ticket_public_key(private: bytes) -> bytes:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes_raw()


def ticket_sign(private: bytes, data: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(private).sign(data)


def ticket_verify(public: bytes, signature: bytes, data: bytes, what: str) -> None:
    """Raises `IntegrityError` unless `signature` is the key's over `data`."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError(f"bad signature on the {what}") from exc


# --- RSA: keys, signatures, key wrap -------------------------------------------------


def generate_rsa_key() -> RsaPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def private_key_to_pem(key: RsaPrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def private_key_from_pem(data: bytes, passphrase: bytes | None = None) -> RsaPrivateKey:
    """This user's own key, from its 0600 file. OpenSSL's check of a loaded key tests p and
    q for primality, which is most of a command's start-up (about 90 ms); `_consistent`
    does the arithmetic part, which catches a damaged file as surely, in microseconds.
    Other people's keys are only ever public ones (`public_key_from_der`)."""
    try:
        key = serialization.load_pem_private_key(
            data, password=passphrase, unsafe_skip_rsa_key_validation=True
        )
    except TypeError as exc:  # encrypted key without passphrase, or the reverse
        if passphrase is None:
            raise KeyFileError(
                "the private key is passphrase-protected; no passphrase given"
            ) from exc
        raise KeyFileError("the private key is not passphrase-protected; none is needed") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError("the private key could not be read (wrong passphrase?)") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != RSA_BITS:
        raise KeyFileError(f"the private key is not an RSA-{RSA_BITS} key")
    if not _consistent(key.private_numbers()):
        raise KeyFileError("the private key is damaged (its numbers disagree); restore a backup")
    return key


def _consistent(key: rsa.RSAPrivateNumbers) -> bool:
    """Whether an RSA private key's numbers agree with each other and its modulus (what
    a wrong CRT value would break: a signature made with one can reveal the key)."""
    p, q, n, e = key.p, key.q, key.public_numbers.n, key.public_numbers.e
    if p < 3 or q < 3 or p * q != n:
        return False
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    return (
        key.d * e % lam == 1
        and key.dmp1 == key.d % (p - 1)
        and key.dmq1 == key.d % (q - 1)
        and key.iqmp * q % p == 1
    )


def seal_with_passphrase(secret: bytes, passphrase: bytes) -> bytes:
    """`secret` encrypted under a key stretched from `passphrase` (salt included)."""
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    return salt + nacl.secret.SecretBox(_passphrase_key(passphrase, salt)).encrypt(secret)


def open_with_passphrase(sealed: bytes, passphrase: bytes) -> bytes:
    salt_size = nacl.pwhash.argon2id.SALTBYTES
    salt, box = sealed[:salt_size], sealed[salt_size:]
    if len(salt) != salt_size:
        raise KeyFileError("the encrypted key is truncated")
    try:
        return nacl.secret.SecretBox(_passphrase_key(passphrase, salt)).decrypt(box)
    except nacl.exceptions.CryptoError as exc:
        raise KeyFileError("the private key could not be read (wrong passphrase?)") from exc


def _passphrase_key(passphrase: bytes, salt: bytes) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        passphrase,
        salt,
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
    )


def public_key_to_der(key: RsaPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_from_der(data: bytes) -> RsaPublicKey:
    """Parse a peer's public key; anything but an RSA-3072 key is an integrity failure."""
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IntegrityError("a public key in a key bundle is malformed") from exc
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != RSA_BITS:
        raise IntegrityError(f"a public key in a key bundle is not an RSA-{RSA_BITS} key")
    return key


def sign(key: RsaPrivateKey, data: bytes) -> bytes:
    return key.sign(data, _PSS, hashes.SHA256())


def verify(key: RsaPublicKey, signature: bytes, data: bytes, what: str) -> None:
    """Raise `IntegrityError` naming `what` unless `signature` is valid for `data`."""
    try:
        key.verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature as exc:
        raise IntegrityError(f"the {what} signature does not verify") from exc


def wrap(key: RsaPublicKey, secret: bytes) -> bytes:
    return key.encrypt(secret, _OAEP)


def unwrap(key: RsaPrivateKey, wrapped: bytes) -> bytes:
    try:
        return key.decrypt(wrapped, _OAEP)
    except ValueError as exc:
        raise IntegrityError("the wrapped transfer key could not be unwrapped") from exc


# --- AES-256-GCM chunk cipher ----------------------------------------------------------


@dataclass(frozen=True)
class TransferSecret:
    """The key and base nonce of one transfer, wrapped together for the receiver."""

    key: bytes
    base_nonce: bytes

    @classmethod
    def generate(cls) -> TransferSecret:
        return cls(random_bytes(AES_KEY_SIZE), random_bytes(GCM_NONCE_SIZE))

    def to_bytes(self) -> bytes:
        return self.key + self.base_nonce

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferSecret:
        if len(data) != AES_KEY_SIZE + GCM_NONCE_SIZE:
            raise IntegrityError("the unwrapped transfer key has the wrong size")
        return cls(data[:AES_KEY_SIZE], data[AES_KEY_SIZE:])


class ChunkCipher:
    """Seals and opens the chunks of one transfer. Each index gets its own nonce
    (base nonce XOR index), so no nonce repeats under one key."""

    def __init__(self, secret: TransferSecret) -> None:
        self._aead = AESGCM(secret.key)
        self._base = int.from_bytes(secret.base_nonce, "big")

    def _nonce(self, index: int) -> bytes:
        if not 0 <= index < 2**64:
            raise ValueError("chunk index out of range")
        return (self._base ^ index).to_bytes(GCM_NONCE_SIZE, "big")

    def seal(self, index: int, plaintext: bytes, associated_data: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(index), plaintext, associated_data)

    def open(self, index: int, ciphertext: bytes | memoryview, associated_data: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index), ciphertext, associated_data)
        except InvalidTag as exc:
            raise IntegrityError(f"chunk {index} failed authentication (tampered?)") from exc

    def open_into(
        self, index: int, ciphertext: bytes | memoryview, associated_data: bytes, into: memoryview
    ) -> bytes | memoryview:
        """As `open`, decrypted into `into` (at least as long as the plaintext) and the
        filled part returned, with no allocation; a ciphertext too long for it is
        decrypted into new bytes."""
        length = len(ciphertext) - GCM_TAG_SIZE
        if not 0 <= length <= len(into):
            return self.open(index, ciphertext, associated_data)
        try:
            self._aead.decrypt_into(self._nonce(index), ciphertext, associated_data, into[:length])
        except InvalidTag as exc:
            raise IntegrityError(f"chunk {index} failed authentication (tampered?)") from exc
        return into[:length]


# --- passwords and session tokens --------------------------------------------------------


def check_password_length(password: str) -> bytes:
    data = password.encode()
    if len(data) > BCRYPT_MAX_PASSWORD_BYTES:
        raise UsageError(
            f"passwords are limited to {BCRYPT_MAX_PASSWORD_BYTES} bytes (bcrypt); "
            f"this one is {len(data)} bytes"
        )
    if not data:
        raise UsageError("the password is empty")
    return data


def hash_password(password: str, rounds: int) -> bytes:
    return bcrypt.hashpw(check_password_length(password), bcrypt.gensalt(rounds))


def password_matches(password: str, hashed: bytes) -> bool:
    """bcrypt's own comparison is constant time; a too-long password never matches."""
    try:
        return bcrypt.checkpw(check_password_length(password), hashed)
    except (UsageError, ValueError):
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    """What the broker stores: tokens are 256-bit random, so a plain hash suffices."""
    return sha256(token.encode())
