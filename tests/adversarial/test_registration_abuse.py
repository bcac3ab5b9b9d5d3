"""Abuse of registration against a real broker: blocking everyone's registrations with a
flood of challenges, and probing which usernames exist through `register`.

Every client in a harness comes from loopback, so these tests pick their source address
inside 127.0.0.0/8 (`tcp://SOURCE:0;127.0.0.1:PORT`): each address is its own
"network" to the broker, as a campus NAT or a home router would be.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nacl.public
import pytest
import zmq
import zmq.utils.z85

from sfs.common import protocol
from sfs.common.codec import from_wire
from sfs.common.errors import RemoteError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import ErrorBody
from sfs.peer.client import BrokerClient
from sfs.peer.keys import Identity, create_identity
from tests.harness import Cluster

# Today's pending challenge table holds 10,000: the floods below ask for more.
FLOOD = 12_000
BATCH = 100  # requests in flight on one connection


@pytest.fixture(scope="module")
def attacker_key(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """One RSA key for every throwaway identity: only the CurveZMQ keys change."""
    return create_identity(tmp_path_factory.mktemp("mallory"), "mallory")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A default broker with alice registered: probes of her name answer `conflict`."""
    with Cluster() as running:
        running.start_broker()
        running.add_peer("alice")
        yield running


def from_address(cluster: Cluster, source: str) -> str:
    """The broker's endpoint, connected to from `source` (a loopback address)."""
    return f"tcp://{source}:0;{cluster.broker_endpoint.removeprefix('tcp://')}"


def throwaway(identity: Identity) -> Identity:
    """`identity` with a fresh CurveZMQ key: a new "device", for free."""
    key = nacl.public.PrivateKey.generate()
    bundle = KeyBundle(identity.bundle.rsa_public, bytes(key.public_key))
    return dataclasses.replace(identity, transport_key=key, bundle=bundle)


def register(
    cluster: Cluster, source: str, who: Identity, username: str, password: str
) -> protocol.SessionResult:
    endpoint = from_address(cluster, source)
    with BrokerClient(endpoint, cluster.broker_public_key(), who.transport_key) as client:
        challenge = client.challenge()
        payload = protocol.register_payload(username, challenge, who.bundle)
        return client.register(username, password, who.bundle, challenge, who.sign(payload))


def register_error(
    cluster: Cluster, source: str, who: Identity, username: str, password: str = "pw-123456"
) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        register(cluster, source, who, username, password)
    return refused.value


def flood_challenges(cluster: Cluster, source: str, count: int) -> Counter[str]:
    """Ask for `count` challenges from `source` on one connection with a throwaway key,
    `BATCH` at a time and without the client's busy retries; the answers by kind."""
    answers: Counter[str] = Counter()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    key = nacl.public.PrivateKey.generate()
    sock = context.socket(zmq.DEALER)
    try:
        sock.linger = 0
        sock.curve_serverkey = cluster.broker_public_key()
        sock.curve_secretkey = zmq.utils.z85.encode(bytes(key))
        sock.curve_publickey = zmq.utils.z85.encode(bytes(key.public_key))
        sock.connect(from_address(cluster, source))
        for start in range(0, count, BATCH):
            batch = min(BATCH, count - start)
            for rid in range(start + 1, start + batch + 1):
                sock.send(protocol.encode("challenge", protocol.GetChallenge(), rid))
            for _ in range(batch):
                assert sock.poll(30_000), f"no answer to a challenge request from {source}"
                envelope = protocol.decode_envelope(sock.recv())
                if envelope.op == "result":
                    answers["issued"] += 1
                else:
                    answers[from_wire(ErrorBody, envelope.body).code] += 1
    finally:
        sock.close(linger=0)
        context.term()
    return answers


# --- item 4: registrations blocked by a flood of challenges ------------------------------


def test_one_address_flooding_challenges_cannot_block_another_addresses_registration(
    tmp_path: Path,
) -> None:
    with Cluster() as cluster:
        cluster.start_broker()
        answers = flood_challenges(cluster, "127.0.1.1", FLOOD)
        assert answers["busy"] > 0, answers  # the flooder is told to stop
        zoe = create_identity(tmp_path / "zoe", "zoe")
        # Before the fix: `busy` (the table held the flood's 10,000 challenges).
        assert register(cluster, "127.0.2.1", zoe, "zoe", "zoe-password").username == "zoe"


def test_many_addresses_flooding_challenges_cannot_block_a_registration(tmp_path: Path) -> None:
    flooders = 60  # each asking for FLOOD / flooders: no one address stands out
    with Cluster() as cluster:
        cluster.start_broker()
        answers: Counter[str] = Counter()
        for number in range(1, flooders + 1):
            answers += flood_challenges(cluster, f"127.0.1.{number}", FLOOD // flooders)
        assert answers["issued"] + answers["busy"] == FLOOD, answers
        zoe = create_identity(tmp_path / "zoe", "zoe")
        # Before the fix: `busy`. Now the address holding the most gives up its oldest.
        assert register(cluster, "127.0.2.1", zoe, "zoe", "zoe-password").username == "zoe"


# --- item 7: probing usernames through register ------------------------------------------


def test_a_bad_password_reads_the_same_for_a_taken_and_a_free_name(
    cluster: Cluster, attacker_key: Identity
) -> None:
    answers = {
        (error.code, str(error))
        for name in ("alice", "nobody")
        for error in [register_error(cluster, "127.0.3.1", attacker_key, name, "x" * 73)]
    }
    # Before the fix: alice answered `conflict`, nobody `bad_request`.
    assert len(answers) == 1, answers
    assert next(iter(answers))[0] == "bad_request"
    assert "72 bytes" in next(iter(answers))[1]


def test_probing_names_from_one_client_key_is_throttled(
    cluster: Cluster, attacker_key: Identity
) -> None:
    mallory = throwaway(attacker_key)
    codes = [register_error(cluster, "127.0.4.1", mallory, "alice").code for _ in range(40)]
    # Before the fix: 40 times `conflict`, each one telling that "alice" exists.
    assert "throttled" in codes, Counter(codes)
    assert codes.index("throttled") < 20
    assert set(codes[codes.index("throttled") :]) == {"throttled"}
    error = register_error(cluster, "127.0.4.1", mallory, "alice")
    assert "too many registrations" in str(error) and "try again in" in str(error)
    # Another device elsewhere is not affected.
    assert register_error(cluster, "127.0.4.2", throwaway(attacker_key), "alice").code == (
        "conflict"
    )


def test_probing_names_from_many_keys_at_one_address_is_throttled(
    cluster: Cluster, attacker_key: Identity
) -> None:
    codes: Counter[str] = Counter()
    for _ in range(400):
        code = register_error(cluster, "127.0.5.1", throwaway(attacker_key), "alice").code
        codes[code] += 1
        if code == "throttled":
            break
    # Before the fix: 400 times `conflict` from fresh keys at one address.
    assert codes["throttled"] == 1, codes
    assert register_error(cluster, "127.0.5.2", throwaway(attacker_key), "alice").code == (
        "conflict"
    )
