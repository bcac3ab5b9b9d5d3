"""Integration fixtures: a real broker server and real peers, in this process, talking
over ZeroMQ on loopback with random ports. Each peer that serves runs its own `Peer`
in a thread, as `sfs-peer serve` would in its own process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from sfs.broker.server import BrokerServer
from sfs.broker.service import BrokerService, BrokerSettings
from sfs.broker.store import SqliteStore
from sfs.common.config import load_peer_config
from sfs.peer.node import Peer
from tests.harness import free_port


@dataclass
class RunningBroker:
    endpoint: str
    public_key: bytes
    store: SqliteStore
    server: BrokerServer
    thread: threading.Thread


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    public, secret = zmq.curve_keypair()
    store = SqliteStore(tmp_path / "broker.db")
    service = BrokerService(store, BrokerSettings(bcrypt_rounds=4, presence_ttl=3))
    server = BrokerServer(service, f"tcp://127.0.0.1:{free_port()}", secret, public, workers=2)
    thread = threading.Thread(target=server.serve, name="broker", daemon=True)
    thread.start()
    assert server.bound.wait(10), "the broker did not start"
    yield RunningBroker(server.endpoint, public, store, server, thread)
    server.stop()
    thread.join(10)
    assert not thread.is_alive(), "the broker did not stop"
    store.close()


@dataclass
class Server:
    stop: threading.Event
    thread: threading.Thread
    endpoint: str


@dataclass
class Network:
    """Peers of one test, all torn down at the end."""

    root: Path
    broker: RunningBroker
    peers: dict[str, Peer] = field(default_factory=dict)
    servers: dict[str, Server] = field(default_factory=dict)

    def config(self, name: str, **extra: object) -> Path:
        path = self.root / f"{name}.yaml"
        lines = [
            f"username: {name}",
            f"data_dir: {name}",
            f"download_dir: {name}/downloads",
            f"listen: tcp://127.0.0.1:{free_port()}",
            "broker:",
            f"  endpoint: {self.broker.endpoint}",
            f"  public_key: '{self.broker.public_key.decode()}'",
            "heartbeat_interval: 1",
            "timeout: 3",
        ] + [f"{key}: {value}" for key, value in extra.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def add(self, name: str, *, serve: bool = False, **extra: object) -> Peer:
        peer = Peer(load_peer_config(self.config(name, **extra)))
        self.peers[name] = peer
        peer.init()
        peer.register(f"{name}-password")
        if serve:
            self.serve(name)
        return peer

    def serve(self, name: str) -> Server:
        """Run `serve` for `name` with a Peer of its own, as a separate process would."""
        serving = Peer(self.peers[name].config)
        stop, ready = threading.Event(), threading.Event()
        endpoint: list[str] = []

        def on_ready(bound: str) -> None:
            endpoint.append(bound)
            ready.set()

        def run() -> None:
            try:
                serving.serve(stop, on_ready)
            finally:
                serving.close()

        thread = threading.Thread(target=run, name=f"{name}-serve", daemon=True)
        thread.start()
        assert ready.wait(10), f"{name} did not start serving"
        server = Server(stop, thread, endpoint[0])
        self.servers[name] = server
        return server

    def stop(self, name: str) -> None:
        server = self.servers.pop(name)
        server.stop.set()
        server.thread.join(10)
        assert not server.thread.is_alive(), f"{name} did not stop serving"

    def close(self) -> None:
        for name in list(self.servers):
            self.stop(name)
        for peer in self.peers.values():
            peer.close()


@pytest.fixture
def network(tmp_path: Path, broker: RunningBroker) -> Iterator[Network]:
    net = Network(tmp_path, broker)
    yield net
    net.close()
