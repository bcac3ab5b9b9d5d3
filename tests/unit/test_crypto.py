"""sfs.common.crypto: every check raises IntegrityError (or KeyFileError/UsageError)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sfs.common import crypto
from sfs.common.codec import pack
from sfs.common.crypto import ChunkCipher, TransferSecret
from sfs.common.errors import IntegrityError, KeyFileError, UsageError

BCRYPT_ROUNDS = 4


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


@pytest.fixture(scope="module")
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- hashing, randomness, comparison ------------------------------------------------------


def test_sha256_known_vector() -> None:
    assert crypto.sha256(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    hasher = crypto.new_sha256()
    hasher.update(b"a")
    hasher.update(b"bc")
    assert hasher.digest() == crypto.sha256(b"abc")


def test_random_bytes_have_the_size_asked_for_and_differ() -> None:
    assert len(crypto.random_bytes(0)) == 0
    assert len(crypto.random_bytes(32)) == 32
    assert crypto.random_bytes(32) != crypto.random_bytes(32)


def test_same_bytes() -> None:
    assert crypto.same_bytes(b"abc", b"abc")
    assert not crypto.same_bytes(b"abc", b"abd")
    assert not crypto.same_bytes(b"abc", b"ab")
    assert not crypto.same_bytes(b"", b"a")


# --- signatures -------------------------------------------------------------------------------


def test_sign_verify_round_trip(rsa_key: crypto.RsaPrivateKey) -> None:
    signature = crypto.sign(rsa_key, b"message")
    assert len(signature) == crypto.RSA_BITS // 8
    crypto.verify(rsa_key.public_key(), signature, b"message", "test")  # no exception


def test_signatures_are_randomised_but_both_verify(rsa_key: crypto.RsaPrivateKey) -> None:
    first, second = crypto.sign(rsa_key, b"m"), crypto.sign(rsa_key, b"m")
    assert first != second  # PSS salt
    crypto.verify(rsa_key.public_key(), first, b"m", "test")
    crypto.verify(rsa_key.public_key(), second, b"m", "test")


@pytest.mark.parametrize(
    "message", [b"Message", b"message ", b"messag", b"", b"message\x00"], ids=repr
)
def test_verify_refuses_a_modified_message(rsa_key: crypto.RsaPrivateKey, message: bytes) -> None:
    signature = crypto.sign(rsa_key, b"message")
    with pytest.raises(IntegrityError, match="the manifest signature does not verify"):
        crypto.verify(rsa_key.public_key(), signature, message, "manifest")


@pytest.mark.parametrize("index", [0, 100, 383])
def test_verify_refuses_a_modified_signature(rsa_key: crypto.RsaPrivateKey, index: int) -> None:
    signature = crypto.sign(rsa_key, b"message")
    with pytest.raises(IntegrityError):
        crypto.verify(rsa_key.public_key(), flip(signature, index), b"message", "test")


@pytest.mark.parametrize("signature", [b"", b"\x00", b"\x00" * 384, b"\xff" * 384, b"x" * 1024])
def test_verify_refuses_junk_signatures(rsa_key: crypto.RsaPrivateKey, signature: bytes) -> None:
    with pytest.raises(IntegrityError):
        crypto.verify(rsa_key.public_key(), signature, b"message", "test")


def test_verify_refuses_a_truncated_signature(rsa_key: crypto.RsaPrivateKey) -> None:
    signature = crypto.sign(rsa_key, b"message")
    with pytest.raises(IntegrityError):
        crypto.verify(rsa_key.public_key(), signature[:-1], b"message", "test")


def test_verify_refuses_another_keys_signature(
    rsa_key: crypto.RsaPrivateKey, other_rsa_key: crypto.RsaPrivateKey
) -> None:
    signature = crypto.sign(other_rsa_key, b"message")
    with pytest.raises(IntegrityError):
        crypto.verify(rsa_key.public_key(), signature, b"message", "test")


# --- key wrap ------------------------------------------------------------------------------------


def test_wrap_unwrap_round_trip(rsa_key: crypto.RsaPrivateKey) -> None:
    secret = TransferSecret.generate().to_bytes()
    wrapped = crypto.wrap(rsa_key.public_key(), secret)
    assert len(wrapped) == crypto.RSA_BITS // 8
    assert secret not in wrapped
    assert crypto.unwrap(rsa_key, wrapped) == secret


def test_wrap_is_randomised(rsa_key: crypto.RsaPrivateKey) -> None:
    secret = b"s" * 44
    first, second = (
        crypto.wrap(rsa_key.public_key(), secret),
        crypto.wrap(rsa_key.public_key(), secret),
    )
    assert first != second
    assert crypto.unwrap(rsa_key, first) == crypto.unwrap(rsa_key, second) == secret


@pytest.mark.parametrize("index", [0, 191, 383])
def test_unwrap_refuses_a_modified_ciphertext(rsa_key: crypto.RsaPrivateKey, index: int) -> None:
    wrapped = crypto.wrap(rsa_key.public_key(), b"s" * 44)
    with pytest.raises(IntegrityError, match="could not be unwrapped"):
        crypto.unwrap(rsa_key, flip(wrapped, index))


def test_unwrap_with_the_wrong_key_fails(
    rsa_key: crypto.RsaPrivateKey, other_rsa_key: crypto.RsaPrivateKey
) -> None:
    wrapped = crypto.wrap(rsa_key.public_key(), b"s" * 44)
    with pytest.raises(IntegrityError):
        crypto.unwrap(other_rsa_key, wrapped)


@pytest.mark.parametrize("wrapped", [b"", b"\x00", b"\x00" * 384, b"\xff" * 384, b"x" * 385])
def test_unwrap_refuses_junk(rsa_key: crypto.RsaPrivateKey, wrapped: bytes) -> None:
    with pytest.raises(IntegrityError):
        crypto.unwrap(rsa_key, wrapped)


# --- transfer secrets and the chunk cipher ----------------------------------------------------


def test_transfer_secret_sizes_and_round_trip() -> None:
    secret = TransferSecret.generate()
    assert len(secret.key) == crypto.AES_KEY_SIZE
    assert len(secret.base_nonce) == crypto.GCM_NONCE_SIZE
    assert len(secret.to_bytes()) == crypto.AES_KEY_SIZE + crypto.GCM_NONCE_SIZE
    assert TransferSecret.from_bytes(secret.to_bytes()) == secret
    assert TransferSecret.generate() != secret


@pytest.mark.parametrize("size", [0, 1, 43, 45, 64])
def test_transfer_secret_of_the_wrong_size_is_refused(size: int) -> None:
    with pytest.raises(IntegrityError, match="wrong size"):
        TransferSecret.from_bytes(b"k" * size)


@pytest.mark.parametrize("plaintext", [b"", b"x", bytes(range(256)) * 256], ids=len)
def test_chunk_seal_open_round_trip(plaintext: bytes) -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    sealed = cipher.seal(3, plaintext, b"ad")
    assert len(sealed) == len(plaintext) + crypto.GCM_TAG_SIZE
    if len(plaintext) >= 16:  # a shorter one may appear in random ciphertext by chance
        assert plaintext not in sealed
    assert cipher.open(3, sealed, b"ad") == plaintext


def test_a_chunk_opens_into_a_buffer_and_is_checked_as_it_is_without() -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    buffer = memoryview(bytearray(64))
    sealed = cipher.seal(3, b"plaintext", b"ad")
    opened = cipher.open_into(3, sealed, b"ad", buffer)
    assert bytes(opened) == b"plaintext" and isinstance(opened, memoryview)
    assert opened.obj is buffer.obj  # no new bytes
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    for wrong in [
        (3, tampered, b"ad"),
        (4, sealed, b"ad"),
        (3, sealed, b"other"),
        (3, b"x", b"ad"),
    ]:
        with pytest.raises(IntegrityError, match="failed authentication"):
            cipher.open_into(*wrong, buffer)
    longer = cipher.seal(5, b"y" * 100, b"ad")  # longer than the buffer: new bytes
    assert cipher.open_into(5, longer, b"ad", buffer) == b"y" * 100


def test_a_second_cipher_from_the_same_secret_opens_the_chunks() -> None:
    secret = TransferSecret.generate()
    sealed = ChunkCipher(secret).seal(7, b"chunk", b"ad")
    received = TransferSecret.from_bytes(secret.to_bytes())
    assert ChunkCipher(received).open(7, sealed, b"ad") == b"chunk"


def test_nonce_is_the_base_nonce_xor_the_index() -> None:
    secret = TransferSecret.generate()
    base = int.from_bytes(secret.base_nonce, "big")
    for index in (0, 1, 255, 2**32, 2**64 - 1):
        nonce = (base ^ index).to_bytes(crypto.GCM_NONCE_SIZE, "big")
        expected = AESGCM(secret.key).encrypt(nonce, b"data", b"ad")
        assert ChunkCipher(secret).seal(index, b"data", b"ad") == expected


def test_distinct_indexes_give_distinct_ciphertexts() -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    sealed = {cipher.seal(index, b"same plaintext", b"ad") for index in range(64)}
    assert len(sealed) == 64


def test_open_with_the_wrong_index_fails() -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    sealed = cipher.seal(1, b"chunk", b"ad")
    for index in (0, 2, 2**32 + 1):
        with pytest.raises(IntegrityError, match=f"chunk {index} failed authentication"):
            cipher.open(index, sealed, b"ad")


@pytest.mark.parametrize("associated_data", [b"", b"AD", b"ad\x00", b"a"])
def test_open_with_the_wrong_associated_data_fails(associated_data: bytes) -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    sealed = cipher.seal(0, b"chunk", b"ad")
    with pytest.raises(IntegrityError):
        cipher.open(0, sealed, associated_data)


def test_open_refuses_any_flipped_ciphertext_bit() -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    sealed = cipher.seal(0, b"chunk data", b"ad")
    for index in range(len(sealed)):  # body and tag
        for bit in (0, 7):
            with pytest.raises(IntegrityError):
                cipher.open(0, flip(sealed, index, bit), b"ad")


@pytest.mark.parametrize("cut", [1, 16, 26])
def test_open_refuses_truncated_ciphertext(cut: int) -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    sealed = cipher.seal(0, b"chunk data", b"ad")
    assert len(sealed) == 26
    with pytest.raises(IntegrityError):
        cipher.open(0, sealed[:-cut], b"ad")


def test_open_refuses_appended_bytes() -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    with pytest.raises(IntegrityError):
        cipher.open(0, cipher.seal(0, b"chunk", b"ad") + b"\x00", b"ad")


def test_open_with_another_transfer_secret_fails() -> None:
    secret = TransferSecret.generate()
    sealed = ChunkCipher(secret).seal(0, b"chunk", b"ad")
    with pytest.raises(IntegrityError):
        ChunkCipher(TransferSecret.generate()).open(0, sealed, b"ad")
    # same key, different base nonce: still refused
    with pytest.raises(IntegrityError):
        ChunkCipher(TransferSecret(secret.key, flip(secret.base_nonce, 11))).open(0, sealed, b"ad")
    # same base nonce, different key: still refused
    with pytest.raises(IntegrityError):
        ChunkCipher(TransferSecret(flip(secret.key, 0), secret.base_nonce)).open(0, sealed, b"ad")


@pytest.mark.parametrize("index", [-1, 2**64])
def test_chunk_index_outside_64_bits_is_a_programming_error(index: int) -> None:
    cipher = ChunkCipher(TransferSecret.generate())
    with pytest.raises(ValueError, match="chunk index out of range"):
        cipher.seal(index, b"x", b"")
    with pytest.raises(ValueError, match="chunk index out of range"):
        cipher.open(index, b"x" * 17, b"")


# --- key files ----------------------------------------------------------------------------------


def same_key(a: crypto.RsaPrivateKey, b: crypto.RsaPrivateKey) -> bool:
    return a.private_numbers() == b.private_numbers()


def test_private_key_pem_round_trip_without_passphrase(rsa_key: crypto.RsaPrivateKey) -> None:
    pem = crypto.private_key_to_pem(rsa_key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert same_key(crypto.private_key_from_pem(pem), rsa_key)


def test_private_key_pem_round_trip_with_passphrase(rsa_key: crypto.RsaPrivateKey) -> None:
    pem = crypto.private_key_to_pem(rsa_key, b"correct horse")
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert same_key(crypto.private_key_from_pem(pem, b"correct horse"), rsa_key)


def test_private_key_wrong_passphrase(rsa_key: crypto.RsaPrivateKey) -> None:
    pem = crypto.private_key_to_pem(rsa_key, b"correct horse")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        crypto.private_key_from_pem(pem, b"correct horsE")


def test_private_key_missing_passphrase(rsa_key: crypto.RsaPrivateKey) -> None:
    pem = crypto.private_key_to_pem(rsa_key, b"correct horse")
    with pytest.raises(KeyFileError, match="passphrase-protected; no passphrase given"):
        crypto.private_key_from_pem(pem)


def test_private_key_passphrase_given_for_a_plain_key(rsa_key: crypto.RsaPrivateKey) -> None:
    pem = crypto.private_key_to_pem(rsa_key)
    with pytest.raises(KeyFileError, match="not passphrase-protected"):
        crypto.private_key_from_pem(pem, b"unneeded")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"junk",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_private_key_junk_is_a_key_file_error(data: bytes) -> None:
    with pytest.raises(KeyFileError):
        crypto.private_key_from_pem(data)


def test_private_key_truncated_pem_is_a_key_file_error(rsa_key: crypto.RsaPrivateKey) -> None:
    pem = crypto.private_key_to_pem(rsa_key)
    with pytest.raises(KeyFileError):
        crypto.private_key_from_pem(pem[: len(pem) // 2])


def damaged(key: crypto.RsaPrivateKey, field: str) -> bytes:
    """The PEM of `key` with one private number changed (built without OpenSSL's check)."""
    numbers = key.private_numbers()
    values = {name: getattr(numbers, name) for name in ("p", "q", "d", "dmp1", "dmq1", "iqmp")}
    values[field] += 2  # stays odd where it was: only the arithmetic tells
    changed = rsa.RSAPrivateNumbers(**values, public_numbers=numbers.public_numbers)
    return changed.private_key(unsafe_skip_rsa_key_validation=True).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("field", ["d", "dmp1", "dmq1", "iqmp"])  # p, q: cannot be built
def test_a_damaged_private_key_is_refused(rsa_key: crypto.RsaPrivateKey, field: str) -> None:
    # Our own key is loaded without OpenSSL's slow primality tests (start-up time): the
    # numbers must still agree, or a signature made with them could leak the key.
    with pytest.raises(KeyFileError, match="damaged"):
        crypto.private_key_from_pem(damaged(rsa_key, field))


def test_private_key_of_another_size_or_type_is_refused(
    rsa_2048: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    for key in (rsa_2048, ec_key):
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with pytest.raises(KeyFileError, match="not an RSA-3072 key"):
            crypto.private_key_from_pem(pem)


def test_public_key_der_round_trip(rsa_key: crypto.RsaPrivateKey) -> None:
    der = crypto.public_key_to_der(rsa_key.public_key())
    assert crypto.public_key_from_der(der).public_numbers() == rsa_key.public_key().public_numbers()


@pytest.mark.parametrize("data", [b"", b"\x00", b"junk" * 100, b"\x30\x82\x01\xa2"])
def test_public_key_from_der_refuses_garbage(data: bytes) -> None:
    with pytest.raises(IntegrityError, match="malformed"):
        crypto.public_key_from_der(data)


def test_public_key_from_der_refuses_truncated_der(rsa_key: crypto.RsaPrivateKey) -> None:
    der = crypto.public_key_to_der(rsa_key.public_key())
    with pytest.raises(IntegrityError):
        crypto.public_key_from_der(der[:-1])
    with pytest.raises(IntegrityError):
        crypto.public_key_from_der(der + b"\x00")


def test_public_key_from_der_refuses_other_keys(
    rsa_2048: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    for key in (rsa_2048, ec_key):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with pytest.raises(IntegrityError, match="not an RSA-3072 key"):
            crypto.public_key_from_der(der)


# --- passwords and tokens --------------------------------------------------------------------


def test_password_hash_and_match() -> None:
    hashed = crypto.hash_password("correct horse", BCRYPT_ROUNDS)
    assert hashed.startswith(b"$2b$04$")
    assert crypto.password_matches("correct horse", hashed)


@pytest.mark.parametrize("attempt", ["correct hors", "correct horsE", "correct horse ", "x"])
def test_wrong_password_does_not_match(attempt: str) -> None:
    hashed = crypto.hash_password("correct horse", BCRYPT_ROUNDS)
    assert not crypto.password_matches(attempt, hashed)


def test_hashes_are_salted() -> None:
    first = crypto.hash_password("same", BCRYPT_ROUNDS)
    second = crypto.hash_password("same", BCRYPT_ROUNDS)
    assert first != second
    assert crypto.password_matches("same", first)
    assert crypto.password_matches("same", second)


def test_password_of_72_bytes_is_accepted_and_all_of_it_counts() -> None:
    password = "p" * 71 + "a"
    hashed = crypto.hash_password(password, BCRYPT_ROUNDS)
    assert crypto.password_matches(password, hashed)
    assert not crypto.password_matches("p" * 71 + "b", hashed)


@pytest.mark.parametrize("password", ["p" * 73, "p" * 1000, "é" * 37], ids=["73", "1000", "74utf8"])
def test_password_over_72_bytes_is_a_usage_error(password: str) -> None:
    with pytest.raises(UsageError, match="72 bytes"):
        crypto.hash_password(password, BCRYPT_ROUNDS)


def test_password_over_72_bytes_never_matches() -> None:
    # If bcrypt truncated silently, the 73-byte password would match its 72-byte prefix.
    prefix = "p" * 72
    hashed = crypto.hash_password(prefix, BCRYPT_ROUNDS)
    assert crypto.password_matches(prefix, hashed)
    assert not crypto.password_matches(prefix + "q", hashed)


def test_empty_password_is_refused_and_never_matches() -> None:
    with pytest.raises(UsageError, match="empty"):
        crypto.hash_password("", BCRYPT_ROUNDS)
    assert not crypto.password_matches("", crypto.hash_password("x", BCRYPT_ROUNDS))


@pytest.mark.parametrize("hashed", [b"", b"not a hash", b"$2b$04$short"])
def test_password_against_a_broken_hash_does_not_match(hashed: bytes) -> None:
    assert not crypto.password_matches("password", hashed)


def test_tokens_are_random_and_url_safe() -> None:
    tokens = {crypto.new_token() for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert len(token) == 43  # 32 bytes, base64url without padding
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_token_digest_is_deterministic_and_distinguishes_tokens() -> None:
    token = crypto.new_token()
    assert crypto.token_digest(token) == crypto.token_digest(token)
    assert crypto.token_digest(token) == hashlib.sha256(token.encode()).digest()
    assert crypto.token_digest(token) != crypto.token_digest(crypto.new_token())
    assert crypto.token_digest("a") != crypto.token_digest("b")
    assert crypto.token_digest("token") != crypto.token_digest("token ")
    assert len(crypto.token_digest("")) == 32


def test_attach_proof_binds_key_transfer_and_ticket() -> None:
    key, transfer, ticket = b"k" * 32, b"t" * 16, b"x" * 32
    proof = crypto.attach_proof(key, transfer, ticket)
    assert len(proof) == 32 and proof == crypto.attach_proof(key, transfer, ticket)
    others = {
        crypto.attach_proof(b"K" * 32, transfer, ticket),
        crypto.attach_proof(key, b"T" * 16, ticket),
        crypto.attach_proof(key, transfer, b"X" * 32),
    }
    assert proof not in others and len(others) == 3
    # Keyed BLAKE2b over the domain-separated triple, as docs/PROTOCOL-v2.md says.
    message = pack(["sfs-attach-v2", transfer, ticket])
    assert proof == hashlib.blake2b(message, key=key, digest_size=32).digest()
