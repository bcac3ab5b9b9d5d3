"""No secrets in logs: a full scenario with the servers at debug level, then every log,
every command's output and `sfs-broker status` are searched for the secrets it used."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.utils.z85

from tests.harness import Cluster

PASSWORD_TYPO = "alice-passwore"  # a failed guess can be a typo of the real password


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, bytes]]:
    """alice shares a file with bob, bob fetches it, carol is refused, someone mistypes."""
    secret_text = b"the launch code is " + os.urandom(16).hex().encode()
    with Cluster(debug=True) as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        carol = cluster.add_peer("carol")
        shared = tmp_path_factory.mktemp("files") / "launch.txt"
        shared.write_bytes(secret_text * 1000)
        file_id = alice.run("share", str(shared), "--to", "bob", "--json").check().json()
        file_id = file_id["file_id"]
        bob.run("get", file_id, "--json").check()
        assert carol.run("get", file_id).returncode != 0
        assert alice.run("login", "--password-stdin", input=PASSWORD_TYPO + "\n").returncode
        alice.run("login", "--password-stdin", input=alice.password + "\n").check()
        bob.run("search", "launch").check()
        cluster.broker_status()
        cluster.run("sfs-broker", "status", "--config", str(cluster.broker_config)).check()
        bob.run("logout").check()
        alice.stop()
        assert cluster.broker is not None
        cluster.broker.stop()
        yield cluster, secret_text


def secrets_of(cluster: Cluster) -> dict[str, bytes]:
    """Every secret the scenario used, in each form it could be printed in."""
    found: dict[str, bytes] = {"typo": PASSWORD_TYPO.encode()}
    for name, peer in cluster.peers.items():
        found[f"{name} password"] = peer.password.encode()
        keys = peer.data_dir / "keys"
        pem_lines = (keys / "signing.pem").read_bytes().splitlines()[1:-1]
        found[f"{name} rsa key"] = pem_lines[len(pem_lines) // 2]  # a line from its middle
        transport = (keys / "transport.key").read_bytes().strip()
        found[f"{name} transport key"] = transport
        found[f"{name} transport key (hex)"] = zmq.utils.z85.decode(transport).hex().encode()
        session = peer.data_dir / "session.json"
        if session.exists():
            found[f"{name} token"] = json.loads(session.read_text())["token"].encode()
    broker_key = (cluster.root / "broker" / "broker.key").read_bytes().strip()
    found["broker secret key"] = broker_key
    return found


def everything_printed(cluster: Cluster) -> bytes:
    outputs = [f"{r.stdout}\n{r.stderr}" for r in cluster.results]
    logs = [path.read_text(errors="replace") for path in cluster.root.glob("*.log")]
    return "\n".join(outputs + logs).encode()


def test_the_scenario_logged_enough_to_be_worth_searching(
    scenario: tuple[Cluster, bytes],
) -> None:
    printed = everything_printed(scenario[0])
    for expected in (b"DEBUG", b"registered alice", b"login alice", b"wrong username or password"):
        assert expected in printed


def test_no_password_token_key_or_content_is_printed_or_logged(
    scenario: tuple[Cluster, bytes],
) -> None:
    cluster, secret_text = scenario
    printed = everything_printed(cluster)
    secrets = secrets_of(cluster)
    secrets["file contents"] = secret_text
    secrets["file contents (base64)"] = base64.b64encode(secret_text * 3)[:40]
    assert len(secrets) >= 14
    leaked = sorted(name for name, secret in secrets.items() if secret in printed)
    assert leaked == []


def test_session_tokens_are_stored_only_as_hashes(scenario: tuple[Cluster, bytes]) -> None:
    cluster, _ = scenario
    database = b"".join(path.read_bytes() for path in (cluster.root / "broker").glob("broker.db*"))
    tokens = {n: s for n, s in secrets_of(cluster).items() if "token" in n and "transport" not in n}
    passwords = {n: s for n, s in secrets_of(cluster).items() if "password" in n}
    assert tokens  # alice's session is still saved
    assert [n for n, s in {**tokens, **passwords}.items() if s in database] == []


def test_key_and_session_files_are_private(scenario: tuple[Cluster, bytes]) -> None:
    cluster, _ = scenario
    private = [cluster.root / "broker" / "broker.key"]
    for peer in cluster.peers.values():
        private += [*(peer.data_dir / "keys").iterdir(), peer.data_dir / "session.json"]
    modes = {
        str(path.relative_to(cluster.root)): path.stat().st_mode & 0o777
        for path in private
        if Path(path).exists()
    }
    assert set(modes.values()) == {0o600}, modes
