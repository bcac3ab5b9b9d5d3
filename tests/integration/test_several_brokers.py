"""Several brokers over one PostgreSQL database, in this process on loopback: clients
spread over them and fail over, `serve` keeps its presence when its broker goes away,
and what one broker is told (a logout, an unshare, an access change) holds on the
others from the next request on: no broker keeps an answer of its own."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from sfs.broker.postgres_store import PostgresStore
from sfs.broker.server import BrokerServer
from sfs.broker.service import BrokerService, BrokerSettings
from sfs.common import protocol
from sfs.common.config import load_peer_config
from sfs.common.errors import RemoteError, TransportError
from sfs.peer import client as client_module
from sfs.peer.client import BrokerClient
from sfs.peer.download import DownloadResult
from sfs.peer.node import Peer
from sfs.peer.session import NotLoggedIn, load_session
from tests.harness import free_port


@dataclass
class Broker:
    server: BrokerServer
    store: PostgresStore
    thread: threading.Thread

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the broker did not stop"


@dataclass
class Deployment:
    """Brokers sharing one key pair and one database, and the peers of a test."""

    root: Path
    public: bytes
    brokers: list[Broker]
    peers: list[Peer]

    def peer(self, name: str, endpoints: list[str], **extra: object) -> Peer:
        path = self.root / f"{name}-{len(self.peers)}.yaml"
        listed = "".join(f"\n    - {e}" for e in endpoints)
        lines = [
            f"username: {name}",
            f"data_dir: {name}",
            f"download_dir: {name}/downloads",
            f"listen: tcp://127.0.0.1:{free_port()}",
            "broker:",
            f"  endpoint:{listed}",
            f"  public_key: '{self.public.decode()}'",
            "heartbeat_interval: 1",
            "timeout: 3",
        ] + [f"{key}: {value}" for key, value in extra.items()]
        path.write_text("\n".join(lines) + "\n")
        peer = Peer(load_peer_config(path))
        self.peers.append(peer)
        return peer


def start_broker(url: str, public: bytes, secret: bytes) -> Broker:
    store = PostgresStore(url)
    service = BrokerService(store, BrokerSettings(bcrypt_rounds=4, presence_ttl=3))
    server = BrokerServer(service, f"tcp://127.0.0.1:{free_port()}", secret, public, workers=2)
    thread = threading.Thread(target=server.serve, name="broker", daemon=True)
    thread.start()
    assert server.bound.wait(10), "the broker did not start"
    return Broker(server, store, thread)


@pytest.fixture
def deployment(tmp_path: Path, postgres_url: str) -> Iterator[Deployment]:
    public, secret = zmq.curve_keypair()
    brokers = [start_broker(postgres_url, public, secret) for _ in range(2)]
    world = Deployment(tmp_path, public, brokers, [])
    yield world
    for peer in world.peers:
        peer.close()
    for broker in brokers:
        if broker.thread.is_alive():
            broker.stop()
        broker.store.close()


def test_a_client_fails_over_to_the_next_broker(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = deployment.brokers[0].endpoint
    refused = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: the connection is refused
    with socket.socket() as silent:  # accepts TCP, never speaks: only the timeout tells
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mute = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(client_module.random, "randrange", lambda n: 0)
        with BrokerClient([refused, mute, live], deployment.public, timeout=1) as client:
            assert client.ping().version == protocol.VERSION
            assert client.endpoint == live  # and it stays there
            assert client.ping().version == protocol.VERSION
            assert client.endpoint == live
        with (
            BrokerClient([refused, mute], deployment.public, timeout=1) as client,
            pytest.raises(TransportError, match="no answer from any of the brokers"),
        ):
            client.ping()


def test_clients_spread_over_the_brokers(deployment: Deployment) -> None:
    endpoints = [b.endpoint for b in deployment.brokers]
    seen = set()
    for _ in range(40):  # a client starts at a random broker: 40 all alike is 2 ** -39
        with BrokerClient(endpoints, deployment.public) as client:
            seen.add(client.endpoint)
    assert seen == set(endpoints)


def test_a_peer_and_its_server_stay_online_when_their_broker_goes(
    deployment: Deployment, tmp_path: Path
) -> None:
    endpoints = [b.endpoint for b in deployment.brokers]
    alice = deployment.peer("alice", endpoints)
    alice.init()
    alice.register("alice-password")
    bob = deployment.peer("bob", endpoints)
    bob.init()
    bob.register("bob-password")
    stop, ready = threading.Event(), threading.Event()
    serving = Peer(alice.config)  # as `sfs-peer serve` would, in a process of its own

    def serve() -> None:
        try:
            serving.serve(stop, lambda _: ready.set())
        finally:
            serving.close()

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert ready.wait(10)
        (tmp_path / "notes.txt").write_bytes(b"several brokers\n" * 1000)
        share = alice.share(tmp_path / "notes.txt", keywords=["brokers"])
        store = deployment.brokers[1].store
        deployment.brokers[0].stop()  # whichever broker each client was using
        gone = int(time.time())
        # Bob's commands go to the broker that is left; his session is in the database.
        assert [hit.file_id for hit in bob.search("brokers")] == [share.file_id]
        result = bob.get(share.file_id)
        assert isinstance(result, DownloadResult) and result.holders == ["alice"]
        assert (bob.config.download_dir / "notes.txt").read_bytes() == b"several brokers\n" * 1000
        # alice's server heartbeats to the other broker: her presence is renewed after
        # the first broker went (presence_ttl 3 s, heartbeats every second).
        deadline = time.monotonic() + 30
        while True:
            online = {name: until for name, _, until in store.stats(int(time.time())).online}
            if online.get("alice", 0) > gone + 3:
                break
            assert time.monotonic() < deadline, "alice's presence was not renewed"
            time.sleep(0.2)
        assert server.is_alive()
    finally:
        stop.set()
        server.join(15)
    assert not server.is_alive()


def test_logout_unshare_and_access_changes_hold_on_every_broker(
    deployment: Deployment, tmp_path: Path
) -> None:
    a, b = (broker.endpoint for broker in deployment.brokers)
    alice = deployment.peer("alice", [a])  # alice talks to one broker only,
    bob = deployment.peer("bob", [b])  # bob and carol to the other
    carol = deployment.peer("carol", [b])
    for peer in (alice, bob, carol):
        peer.init()
        peer.register(f"{peer.config.username}-password")
    (tmp_path / "plan.txt").write_text("the plan\n")
    share = alice.share(tmp_path / "plan.txt", keywords=["plan"], to=["bob"])
    (tmp_path / "open.txt").write_text("for everyone\n")
    public = alice.share(tmp_path / "open.txt")
    assert [hit.file_id for hit in bob.search("plan")] == [share.file_id]
    assert carol.search("plan") == []
    # Broker B caches bob's session and the lookup (the second is answered from memory).
    bob_token = load_session(bob.config.data_dir, "bob").token
    for _ in range(2):
        assert bob.broker.lookup(bob_token, share.file_id).access == ["bob"]

    # An access change through broker A: the same file, now for carol instead of bob.
    token = load_session(alice.config.data_dir, "alice").token
    access = protocol.normalise_access(["carol"], "alice")
    grant = alice.identity.sign(protocol.grant_payload(share.file_id, access))
    alice.broker.publish(token, share.manifest, share.signature, access, grant)
    assert bob.search("plan") == []
    with pytest.raises(RemoteError, match="no file"):
        bob.broker.lookup(bob_token, share.file_id)
    assert [hit.file_id for hit in carol.search("plan")] == [share.file_id]
    carol_token = load_session(carol.config.data_dir, "carol").token
    for _ in range(2):
        assert carol.broker.lookup(carol_token, share.file_id).access == ["carol"]

    # An unshare through A.
    alice.unshare(share.file_id)
    assert carol.search("plan") == []
    with pytest.raises(RemoteError, match="no file"):
        carol.broker.lookup(carol_token, share.file_id)

    # A logout through A ends the session on B at once: the same token, the next request.
    with BrokerClient(b, deployment.public, alice.identity.transport_key) as on_b:
        assert [hit.file_id for hit in on_b.search(token, "")] == [public.file_id]
        for _ in range(2):
            assert on_b.lookup(token, public.file_id).file_id == public.file_id
        alice.logout()
        with pytest.raises(RemoteError, match="not logged in"):
            on_b.lookup(token, public.file_id)
        with pytest.raises(RemoteError, match="not logged in"):
            on_b.search(token, "")
    with pytest.raises(NotLoggedIn):
        alice.search("plan")


def test_a_user_disabled_in_the_database_is_refused_by_every_broker(
    deployment: Deployment,
) -> None:
    a, b = (broker.endpoint for broker in deployment.brokers)
    bob = deployment.peer("bob", [b])
    bob.init()
    bob.register("bob-password")
    assert bob.search() == []
    # `sfs-broker user disable` writes the database; broker B has nothing to forget.
    assert deployment.brokers[0].store.set_disabled("bob", True)
    with pytest.raises(NotLoggedIn):
        bob.search()
    with pytest.raises(RemoteError, match="disabled") as refused:
        bob.login("bob-password")
    assert refused.value.code == "forbidden"
    with BrokerClient(a, deployment.public, bob.identity.transport_key) as on_a:
        with pytest.raises(RemoteError, match="disabled"):
            on_a.login("bob", "bob-password")
        assert deployment.brokers[1].store.set_disabled("bob", False)
        assert on_a.login("bob", "bob-password").username == "bob"
