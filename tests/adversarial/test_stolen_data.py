"""A stolen data folder: keys encrypted at rest are useless without the passphrase, and
key files that others can read are refused."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, Peer, one_line_error

PASSPHRASE = "correct horse battery staple, but longer"
WITH_PASSPHRASE = {"SFS_PASSPHRASE": PASSPHRASE}
NO_PASSPHRASE = {"SFS_PASSPHRASE": ""}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        yield running


@pytest.fixture(scope="module")
def dora(cluster: Cluster) -> Peer:
    """A peer whose keys were made with `init` under SFS_PASSPHRASE, as a service would."""
    dora = cluster.add_peer("dora", register=False, init=False)
    made = dora.run("init", env=WITH_PASSPHRASE).check()
    assert "encrypted with your passphrase" in made.stdout
    registered = dora.run(
        "register", "--password-stdin", input=dora.password + "\n", env=WITH_PASSPHRASE
    )
    registered.check()
    return dora


def test_encrypted_key_files_hold_no_usable_secret(dora: Peer) -> None:
    keys = dora.data_dir / "keys"
    assert (keys / "signing.pem").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    assert (keys / "transport.key").read_bytes().startswith(b"sfs-sealed-v1 ")
    assert {oct(path.stat().st_mode & 0o777) for path in keys.iterdir()} == {"0o600"}


def test_a_thief_without_the_passphrase_cannot_use_the_keys(dora: Peer) -> None:
    for command in (["search"], ["serve"], ["login", "--password-stdin"]):
        refused = dora.run(*command, env=NO_PASSPHRASE, input=dora.password + "\n", timeout=30)
        assert "passphrase-protected; set SFS_PASSPHRASE" in one_line_error(refused)
        assert refused.returncode == 1
    # The public keys need no passphrase (whoami shows them); they sign nothing.
    shown = dora.run("whoami", "--json", env=NO_PASSPHRASE).check().json()
    assert shown["username"] == "dora"


def test_a_wrong_passphrase_is_refused(dora: Peer) -> None:
    refused = dora.run("search", env={"SFS_PASSPHRASE": "guess"})
    assert "wrong passphrase" in one_line_error(refused)


def test_the_owner_with_the_passphrase_shares_and_serves(
    cluster: Cluster, dora: Peer, tmp_path: Path
) -> None:
    shared = tmp_path / "plans.txt"
    shared.write_bytes(os.urandom(5000))
    file_id = (
        dora.run("share", str(shared), "--json", env=WITH_PASSPHRASE).check().json()["file_id"]
    )
    dora.serve(env=WITH_PASSPHRASE)
    erin = cluster.add_peer("erin")
    erin.run("get", file_id, "--json").check()
    fetched = (erin.download_dir / "plans.txt").read_bytes()
    assert hashlib.sha256(fetched).digest() == hashlib.sha256(shared.read_bytes()).digest()
    dora.stop()


@pytest.mark.parametrize(("name", "mode"), [("signing.pem", 0o644), ("transport.key", 0o640)])
def test_key_files_others_can_read_are_refused(cluster: Cluster, name: str, mode: int) -> None:
    frank = cluster.add_peer(f"frank{mode:o}", register=False)
    path = frank.data_dir / "keys" / name
    path.chmod(mode)
    refused = frank.run("whoami")
    message = one_line_error(refused)
    assert f"{path} is accessible by other users (mode {mode:o}); run: chmod 600 {path}" in message
    path.chmod(0o600)
    frank.run("whoami").check()
