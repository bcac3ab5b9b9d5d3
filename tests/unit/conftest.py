"""Shared fixtures for the unit tests: RSA-3072 keys are slow to make, so make two once."""

from __future__ import annotations

import pytest

from sfs.common import crypto
from sfs.common.identity import KeyBundle


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
