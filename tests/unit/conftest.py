"""Shared fixtures for the unit tests: RSA-3072 keys are slow to make, so make two once,
and the download tests' identities once per module."""

from __future__ import annotations

import pytest

from sfs.common import crypto
from sfs.common.identity import KeyBundle
from sfs.peer.keys import Identity, create_identity


@pytest.fixture(scope="session")
def rsa_key() -> crypto.RsaPrivateKey:
    return crypto.generate_rsa_key()


@pytest.fixture(scope="session")
def other_rsa_key() -> crypto.RsaPrivateKey:
    return crypto.generate_rsa_key()


def make_bundle(key: crypto.RsaPrivateKey, curve_public: bytes) -> KeyBundle:
    return KeyBundle(crypto.public_key_to_der(key.public_key()), curve_public)


@pytest.fixture(scope="session")
def bundle(rsa_key: crypto.RsaPrivateKey) -> KeyBundle:
    return make_bundle(rsa_key, b"\x01" * 32)


@pytest.fixture(scope="session")
def other_bundle(other_rsa_key: crypto.RsaPrivateKey) -> KeyBundle:
    return make_bundle(other_rsa_key, b"\x02" * 32)


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The owner of the shared file, and a holder."""
    return create_identity(tmp_path_factory.mktemp("alice"), "alice")


@pytest.fixture(scope="module")
def bob(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The downloader."""
    return create_identity(tmp_path_factory.mktemp("bob"), "bob")


@pytest.fixture(scope="module")
def carol(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """A seeder."""
    return create_identity(tmp_path_factory.mktemp("carol"), "carol")
