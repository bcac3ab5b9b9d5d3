"""Malformed frames sent to a running broker and a running peer: each is answered with
an error (or dropped, when it has no shape to answer), and both keep serving."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import nacl.public
import pytest
import zmq
import zmq.utils.z85

from sfs.common import protocol
from sfs.peer.client import BrokerClient
from sfs.peer.server import MAX_REQUEST_FRAME
from tests.integration.conftest import Network, RunningBroker

V = protocol.VERSION
GARBAGE = [
    b"",
    b"\x00",
    os.urandom(200),
    b"\xc1",  # never used in msgpack
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": V, "op": "ping"}),  # envelope without rid and body
    msgpack.packb({"v": V + 1, "op": "ping", "rid": 1, "body": {}}),  # `upgrade`
    msgpack.packb({"v": V, "op": "nonsense", "rid": 1, "body": {}}),
    msgpack.packb({"v": V, "op": "login", "rid": 1, "body": {"username": 7, "password": b""}}),
    msgpack.packb({"v": V, "op": "hello", "rid": 1, "body": {"file_id": "../../etc/passwd"}}),
    msgpack.packb({"v": V, "op": "get", "rid": 1, "body": {"transfer_id": b"x", "index": -1}}),
    b"\x91" * 100_000 + b"\xc0",  # nested far too deep
    msgpack.packb({"v": V, "op": "ping", "rid": 1, "body": {}}) + b"trailing",
]


class Sockets:
    """Raw client sockets for one test, all closed at its end."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.opened: list[zmq.Socket[bytes]] = []

    def dealer(self, endpoint: str, server_key: bytes | None) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.DEALER)
        self.opened.append(sock)
        sock.linger = 0
        if server_key is not None:
            key = nacl.public.PrivateKey.generate()
            sock.curve_serverkey = server_key
            sock.curve_secretkey = zmq.utils.z85.encode(bytes(key))
            sock.curve_publickey = zmq.utils.z85.encode(bytes(key.public_key))
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        for sock in self.opened:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    opened = Sockets()
    yield opened
    opened.close()


def expect_error(sock: zmq.Socket[bytes], code: str) -> None:
    assert sock.poll(5000), "no answer"
    frames = sock.recv_multipart()
    envelope = protocol.decode_envelope(frames[0])
    assert envelope.op == "error"
    assert envelope.body["code"] == code


def expected_code(frame: bytes) -> str:
    """`upgrade` for a well-formed request of another protocol version, else bad_request."""
    try:
        value = msgpack.unpackb(frame)
    except Exception:
        return "bad_request"
    newer = isinstance(value, dict) and value.get("v") == protocol.VERSION + 1
    return "upgrade" if newer and set(value) == {"v", "op", "rid", "body"} else "bad_request"


@pytest.mark.parametrize("frame", GARBAGE, ids=range(len(GARBAGE)))
def test_broker_answers_garbage_with_an_error_and_keeps_serving(
    broker: RunningBroker, sockets: Sockets, frame: bytes
) -> None:
    sock = sockets.dealer(broker.endpoint, broker.public_key)
    sock.send(frame)
    expect_error(sock, expected_code(frame))
    with BrokerClient(broker.endpoint, broker.public_key, timeout=5) as client:
        assert client.ping().version == protocol.VERSION


def test_broker_drops_frames_of_unexpected_shape_and_keeps_serving(
    broker: RunningBroker, sockets: Sockets
) -> None:
    sock = sockets.dealer(broker.endpoint, broker.public_key)
    sock.send_multipart([b"one", b"two", b"three"])
    sock.send_multipart([b"not-empty", protocol.encode("ping", protocol.Ping(), 9)])
    assert not sock.poll(500), "a frame with no valid shape got an answer"
    sock.send(protocol.encode("ping", protocol.Ping(), 10))
    assert sock.poll(5000)
    assert protocol.decode_envelope(sock.recv()).rid == 10


def test_broker_ignores_clients_without_curve(broker: RunningBroker, sockets: Sockets) -> None:
    sock = sockets.dealer(broker.endpoint, None)
    sock.send(protocol.encode("ping", protocol.Ping(), 1))
    assert not sock.poll(1000), "a plain-text client got an answer"


def test_broker_refuses_oversized_frames_and_keeps_serving(
    broker: RunningBroker, sockets: Sockets
) -> None:
    sock = sockets.dealer(broker.endpoint, broker.public_key)
    sock.send(b"\0" * (protocol.MAX_BROKER_FRAME + 1))
    assert not sock.poll(1000)
    with BrokerClient(broker.endpoint, broker.public_key, timeout=5) as client:
        assert client.ping().version == protocol.VERSION


def test_peer_answers_garbage_and_keeps_serving(
    network: Network, tmp_path: Path, sockets: Sockets
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    (tmp_path / "f.txt").write_bytes(b"still served")
    share = alice.share(tmp_path / "f.txt")
    endpoint = network.servers["alice"].endpoint

    for number, frame in enumerate(GARBAGE):
        sock = sockets.dealer(endpoint, alice.identity.curve_public_z85)
        sock.send(frame)
        if len(frame) > MAX_REQUEST_FRAME:  # ZeroMQ drops the connection before we see it
            assert not sock.poll(500), f"garbage {number} got an answer"
        else:
            expect_error(sock, expected_code(frame))
        sock.send_multipart([b"a", b"b", b"c"])  # no shape to answer: dropped
        assert not sock.poll(200), f"a 3-frame message got an answer after garbage {number}"

    assert bob.get(share.file_id).path.read_bytes() == b"still served"
