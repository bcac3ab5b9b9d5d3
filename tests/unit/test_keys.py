"""sfs.peer.keys: making, storing and loading a user's identity."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import zmq.utils.z85
from cryptography.hazmat.primitives.asymmetric import rsa

from sfs.common import crypto
from sfs.common.errors import KeyFileError
from sfs.peer.keys import Identity, create_identity, identity_exists, load_identity


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Identity]:
    """One identity made with umask 0, so every mode checked comes from the code."""
    data_dir = tmp_path_factory.mktemp("alice") / "data"
    previous = os.umask(0)
    try:
        identity = create_identity(data_dir, "alice")
    finally:
        os.umask(previous)
    return data_dir, identity


@pytest.fixture
def copy(made: tuple[Path, Identity], tmp_path: Path) -> Path:
    """A private copy of the identity's data dir, free to damage."""
    target = tmp_path / "data"
    shutil.copytree(made[0], target)
    return target


def test_create_writes_private_key_files(made: tuple[Path, Identity]) -> None:
    data_dir, _ = made
    signing, transport = data_dir / "keys" / "signing.pem", data_dir / "keys" / "transport.key"
    assert mode_of(signing) == 0o600
    assert mode_of(transport) == 0o600
    assert mode_of(data_dir / "keys") == 0o700
    assert signing.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert len(zmq.utils.z85.decode(transport.read_bytes().strip())) == 32
    assert identity_exists(data_dir)


def test_created_identity_is_consistent(made: tuple[Path, Identity]) -> None:
    _, identity = made
    assert identity.username == "alice"
    assert identity.signing_key.key_size == crypto.RSA_BITS
    assert (
        identity.bundle.rsa_key().public_numbers()
        == identity.signing_key.public_key().public_numbers()
    )
    assert identity.bundle.curve_public == bytes(identity.transport_key.public_key)
    assert identity.fingerprint == identity.bundle.fingerprint()
    assert zmq.utils.z85.decode(identity.curve_public_z85) == identity.bundle.curve_public
    assert zmq.utils.z85.decode(identity.curve_secret_z85) == bytes(identity.transport_key)
    signature = identity.sign(b"data")
    crypto.verify(identity.bundle.rsa_key(), signature, b"data", "test")


def test_load_round_trips(made: tuple[Path, Identity]) -> None:
    data_dir, created = made
    loaded = load_identity(data_dir, "alice")
    assert loaded.username == "alice"
    assert loaded.fingerprint == created.fingerprint
    assert loaded.bundle == created.bundle
    assert loaded.curve_secret_z85 == created.curve_secret_z85
    # the loaded private key signs for the created public key
    crypto.verify(created.bundle.rsa_key(), loaded.sign(b"x"), b"x", "test")


def test_create_refuses_to_overwrite(made: tuple[Path, Identity], copy: Path) -> None:
    before = {p.name: p.read_bytes() for p in (copy / "keys").iterdir()}
    with pytest.raises(KeyFileError, match="already exists"):
        create_identity(copy, "alice")
    assert {p.name: p.read_bytes() for p in (copy / "keys").iterdir()} == before
    assert load_identity(copy, "alice").fingerprint == made[1].fingerprint


def test_create_refuses_when_only_one_key_file_is_left(copy: Path) -> None:
    (copy / "keys" / "signing.pem").unlink()
    with pytest.raises(KeyFileError):
        create_identity(copy, "alice")
    assert (copy / "keys" / "transport.key").exists()


@pytest.mark.parametrize("name", ["signing.pem", "transport.key"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_access_is_refused(copy: Path, name: str, mode: int) -> None:
    path = copy / "keys" / name
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600") as caught:
        load_identity(copy, "alice")
    assert str(path) in str(caught.value)


def test_a_missing_identity_says_to_run_init(tmp_path: Path) -> None:
    assert not identity_exists(tmp_path)
    with pytest.raises(KeyFileError, match="sfs-peer init"):
        load_identity(tmp_path, "alice")


@pytest.mark.parametrize("name", ["signing.pem", "transport.key"])
def test_a_missing_key_file_is_refused(copy: Path, name: str) -> None:
    (copy / "keys" / name).unlink()
    with pytest.raises(KeyFileError, match="does not exist"):
        load_identity(copy, "alice")


def write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"short",
        b"\n",
        b"~" * 40,  # not in the z85 alphabet
        b"#" * 40,  # z85 digits whose value does not fit 32 bits
        b"0" * 45,  # 36 bytes: the wrong length
        b"0" * 39,  # not a multiple of 5
        "é".encode() * 20,
        b"\xff" * 40,
    ],
)
def test_a_malformed_transport_key_is_refused(copy: Path, content: bytes) -> None:
    path = copy / "keys" / "transport.key"
    write_private(path, content)
    with pytest.raises(KeyFileError, match="transport key"):
        load_identity(copy, "alice")


def test_a_transport_key_with_surrounding_whitespace_loads(
    copy: Path, made: tuple[Path, Identity]
) -> None:
    path = copy / "keys" / "transport.key"
    write_private(path, b"  " + path.read_bytes().strip() + b"\r\n\n")
    assert load_identity(copy, "alice").fingerprint == made[1].fingerprint


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_a_malformed_signing_key_is_refused(copy: Path, content: bytes) -> None:
    write_private(copy / "keys" / "signing.pem", content)
    with pytest.raises(KeyFileError):
        load_identity(copy, "alice")


def test_a_signing_key_of_the_wrong_size_is_refused(copy: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    write_private(copy / "keys" / "signing.pem", crypto.private_key_to_pem(small))
    with pytest.raises(KeyFileError, match="RSA-3072"):
        load_identity(copy, "alice")


# --- keys encrypted with a passphrase ------------------------------------------------------

PASSPHRASE = b"a long passphrase for the keys"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Identity]:
    data_dir = tmp_path_factory.mktemp("sealed") / "data"
    return data_dir, create_identity(data_dir, "alice", PASSPHRASE)


def test_encrypted_keys_hold_no_plain_secret(sealed: tuple[Path, Identity]) -> None:
    data_dir, identity = sealed
    pem = (data_dir / "keys" / "signing.pem").read_bytes()
    transport = (data_dir / "keys" / "transport.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert transport.startswith(b"sfs-sealed-v1 ")
    assert identity.curve_secret_z85 not in transport
    assert bytes(identity.transport_key) not in transport
    plain_pem = crypto.private_key_to_pem(identity.signing_key)
    body = b"".join(plain_pem.splitlines()[1:-1])
    assert body[:64] not in b"".join(pem.splitlines())
    for path in (data_dir / "keys").iterdir():
        assert mode_of(path) == 0o600


def test_encrypted_keys_load_with_the_passphrase(sealed: tuple[Path, Identity]) -> None:
    data_dir, identity = sealed
    loaded = load_identity(data_dir, "alice", lambda: PASSPHRASE)
    assert loaded.bundle == identity.bundle
    assert bytes(loaded.transport_key) == bytes(identity.transport_key)


@pytest.mark.parametrize("given", [None, b""])
def test_encrypted_keys_without_a_passphrase_say_how_to_give_one(
    sealed: tuple[Path, Identity], given: bytes | None
) -> None:
    with pytest.raises(KeyFileError, match="passphrase-protected; set SFS_PASSPHRASE"):
        load_identity(sealed[0], "alice", lambda: given)
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        load_identity(sealed[0], "alice")


def test_encrypted_keys_refuse_a_wrong_passphrase(sealed: tuple[Path, Identity]) -> None:
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_identity(sealed[0], "alice", lambda: b"not the passphrase")


def test_plain_keys_never_ask_for_a_passphrase(made: tuple[Path, Identity]) -> None:
    def ask() -> bytes:
        raise AssertionError("asked for a passphrase")

    assert load_identity(made[0], "alice", ask).bundle == made[1].bundle


def test_one_encrypted_and_one_plain_key_file_is_refused(
    sealed: tuple[Path, Identity], copy: Path
) -> None:
    shutil.copy(sealed[0] / "keys" / "transport.key", copy / "keys" / "transport.key")
    with pytest.raises(KeyFileError, match="not both encrypted or both plain"):
        load_identity(copy, "alice", lambda: PASSPHRASE)


@pytest.mark.parametrize("tail", [b"", b"!!!not base64", b"c2hvcnQ="])
def test_a_damaged_encrypted_transport_key_is_refused(
    sealed: tuple[Path, Identity], tmp_path: Path, tail: bytes
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(sealed[0], data_dir)
    path = data_dir / "keys" / "transport.key"
    path.write_bytes(b"sfs-sealed-v1 " + tail + b"\n")
    with pytest.raises(KeyFileError, match=r"transport key|truncated|wrong passphrase"):
        load_identity(data_dir, "alice", lambda: PASSPHRASE)
