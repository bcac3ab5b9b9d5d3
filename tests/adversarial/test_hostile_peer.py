"""A hostile peer: carol, registered, speaks the peer protocol from this process, with
her own keys, to alice's real `sfs-peer serve`, and asks for what she may not have.

Every request must get an error reply (never an offer or a chunk), alice's serve must
stay up with no traceback in its log, and bob must still be able to download.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from sfs.common import crypto, protocol
from sfs.common.codec import from_wire, pack, to_wire
from sfs.common.errors import RemoteError
from sfs.peer import keys, session
from sfs.peer.client import BrokerClient
from sfs.peer.server import MAX_REQUEST_FRAME
from tests.harness import Cluster, Peer

TIMEOUT_MS = 10_000


class Requester:
    """One connection to a holder, speaking as `identity` (CurveZMQ with its own
    transport key, hellos signed with its own RSA key), as `ReceiverLink` does."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        identity: keys.Identity,
        holder: protocol.Holder,
        routing_id: bytes | None = None,
    ) -> None:
        self.identity, self.holder = identity, holder
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        if routing_id is not None:
            self.sock.routing_id = routing_id
        self.sock.curve_serverkey = holder.bundle.curve_z85()
        self.sock.curve_secretkey = identity.curve_secret_z85
        self.sock.curve_publickey = identity.curve_public_z85
        self.sock.connect(holder.endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)

    def hello_body(self, file_id: Any, *, requester: str | None = None) -> dict[str, Any]:
        """A signed hello for `file_id` (which need not be a string: the body is built
        as a map, so anything msgpack can carry goes on the wire)."""
        unsigned = protocol.Hello(
            file_id if isinstance(file_id, str) else "0" * 32,
            requester or self.identity.username,
            self.identity.bundle,
            crypto.random_bytes(32),
            self.holder.bundle.fingerprint(),
            b"",
        )
        signed = dataclasses.replace(
            unsigned, signature=self.identity.sign(protocol.hello_payload(unsigned))
        )
        body: dict[str, Any] = to_wire(signed)
        body["file_id"] = file_id
        return body

    def send(self, op: str, body: dict[str, Any]) -> None:
        self.sock.send(pack({"v": protocol.VERSION, "op": op, "rid": 0, "body": body}))

    def reply(self, timeout_ms: int = TIMEOUT_MS) -> tuple[protocol.Envelope, list[bytes]]:
        assert self.sock.poll(timeout_ms), "the holder did not answer"
        first, *rest = self.sock.recv_multipart()
        return protocol.decode_envelope(first), rest

    def ask(self, op: str, body: dict[str, Any]) -> tuple[protocol.Envelope, list[bytes]]:
        """Send until the answer is not `busy` (the holder checks a first-time
        requester's key with the broker in the background)."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while True:
            self.send(op, body)
            envelope, rest = self.reply()
            busy = envelope.op == "error" and envelope.body.get("code") == "busy"
            if not busy or time.monotonic() > deadline:
                return envelope, rest
            time.sleep(0.1)

    def refused(self, op: str, body: dict[str, Any]) -> tuple[str, str]:
        """Ask, expecting an error reply; its (code, message)."""
        envelope, rest = self.ask(op, body)
        assert envelope.op == "error", envelope
        assert rest == []
        error = from_wire(protocol.ErrorBody, envelope.body)
        return error.code, error.message


@dataclass
class World:
    cluster: Cluster
    alice: Peer
    bob: Peer
    public_id: str
    public: bytes
    private_id: str  # alice's, shared with bob only
    daves_id: str  # dave's, public; alice does not hold it
    carol: keys.Identity
    holder: protocol.Holder  # alice, as the broker lists her to carol
    context: zmq.Context[zmq.Socket[bytes]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        carol = cluster.add_peer("carol")
        dave = cluster.add_peer("dave")
        public = os.urandom(200_000)
        for name, data in (("public.bin", public), ("private.txt", b"bob only\n"), ("d", b"d")):
            (cluster.root / name).write_bytes(data)

        public_id = alice.share(cluster.root / "public.bin")
        private_id = alice.share(cluster.root / "private.txt", "--to", "bob")
        daves_id = dave.share(cluster.root / "d")
        bob.run("get", private_id).check()  # alice's holder now has bob pinned

        identity = keys.load_identity(carol.data_dir, "carol")
        token = session.load_session(carol.data_dir, "carol").token
        with BrokerClient(
            cluster.broker_endpoint, cluster.broker_public_key(), identity.transport_key
        ) as broker:
            (holder,) = broker.lookup(token, public_id).holders
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            yield World(
                cluster,
                alice,
                bob,
                public_id,
                public,
                private_id,
                daves_id,
                identity,
                holder,
                context,
            )
        finally:
            context.destroy(linger=0)


@pytest.fixture
def carol(world: World) -> Iterator[Requester]:
    requester = Requester(world.context, world.carol, world.holder)
    yield requester
    requester.close()
    alice_still_serves(world)


def alice_still_serves(world: World) -> None:
    server = world.alice.server
    assert server is not None and server.alive()
    assert "Traceback" not in server.output()


# --- file ids ----------------------------------------------------------------------------

NOT_AN_ID = "file_id: not a valid value"


@pytest.mark.parametrize(
    ("file_id", "code", "message"),
    [
        ("../../etc/passwd", "bad_request", NOT_AN_ID),
        ("/etc/passwd", "bad_request", NOT_AN_ID),
        ("..", "bad_request", NOT_AN_ID),
        ("a" * 60_000, "bad_request", "file_id: longer than 32"),  # sizes before patterns
        ("g" * 32, "bad_request", NOT_AN_ID),
        ("0123456789ABCDEF0123456789ABCDEF", "bad_request", NOT_AN_ID),  # upper case
        ("0" * 32 + "\n", "bad_request", "file_id: longer than 32"),
        ("0" * 31 + "\x00", "bad_request", NOT_AN_ID),
        ("0" * 16 + "/../" + "0" * 12, "bad_request", NOT_AN_ID),
        ("", "bad_request", NOT_AN_ID),
        (b"../../etc/passwd", "bad_request", "file_id: expected str"),
        (7, "bad_request", "file_id: expected str"),
        (None, "bad_request", "file_id: expected str"),
        (["../../etc/passwd"], "bad_request", "file_id: expected str"),
    ],
    ids=[
        "dot-dot",
        "absolute",
        "parent",
        "very long",
        "not hex",
        "upper case",
        "newline",
        "nul",
        "slash inside",
        "empty",
        "bytes",
        "int",
        "nil",
        "list",
    ],
)
def test_a_path_like_or_malformed_file_id_is_refused(
    carol: Requester, file_id: object, code: str, message: str
) -> None:
    """Stopped by: the codec's file id pattern, before any lookup (`from_wire`); and the
    holder only ever opens paths from its own share registry."""
    assert carol.refused("hello", carol.hello_body(file_id)) == (code, message)


def test_a_file_not_shared_with_her_is_refused(world: World, carol: Requester) -> None:
    """Stopped by: the holder's share registry (`Share.allows`)."""
    reply = carol.refused("hello", carol.hello_body(world.private_id))
    assert reply == ("forbidden", f"file {world.private_id} is not shared with you")
    assert world.alice.server is not None
    log = world.alice.server.output()
    assert f"refused carol: {world.private_id} is not shared with them" in log


@pytest.mark.parametrize("whose", ["dave's", "unknown"])
def test_a_file_this_holder_does_not_hold_is_refused(
    world: World, carol: Requester, whose: str
) -> None:
    """Stopped by: the holder's share registry, looked up by id (no such row)."""
    file_id = world.daves_id if whose == "dave's" else crypto.random_bytes(16).hex()
    reply = carol.refused("hello", carol.hello_body(file_id))
    assert reply == ("not_found", f"file {file_id} is not shared here")


def test_a_request_over_the_frame_limit_is_dropped(world: World, carol: Requester) -> None:
    """Stopped by: the ROUTER's `maxmsgsize`, which drops the connection unanswered."""
    carol.send("hello", carol.hello_body("a" * MAX_REQUEST_FRAME))
    assert not carol.sock.poll(1000)
    again = Requester(world.context, world.carol, world.holder)
    try:
        envelope, _ = again.ask("hello", again.hello_body(world.public_id))
        assert envelope.op == "offer"
    finally:
        again.close()


# --- who is asking ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bob", "your key does not match the one this holder pinned for you"),
        ("dave", "your key is not the one registered for you"),
        ("nobody", "nobody is not registered"),
    ],
    ids=["pinned user", "registered user", "unknown user"],
)
def test_claiming_another_name_is_refused(carol: Requester, name: str, message: str) -> None:
    """carol signs a hello that names someone else, with her own keys. Stopped by: the
    holder's pin for that user, or else the key the broker has registered for them
    (`RequesterCheck`)."""
    assert carol.refused("hello", carol.hello_body("0" * 32, requester=name)) == (
        "forbidden",
        message,
    )


def test_a_hello_with_a_bad_signature_is_refused(world: World, carol: Requester) -> None:
    """Stopped by: the hello signature (`crypto.verify` in `HolderService._hello`)."""
    body = carol.hello_body(world.public_id)
    body["signature"] = bytes([body["signature"][0] ^ 1]) + body["signature"][1:]
    assert carol.refused("hello", body) == ("forbidden", "the hello signature does not verify")


def test_a_hello_for_another_holder_is_refused(world: World, carol: Requester) -> None:
    """Stopped by: the holder fingerprint the hello is signed for."""
    body = carol.hello_body(world.public_id)
    body["holder_fp"] = carol.identity.fingerprint
    reply = carol.refused("hello", body)
    assert reply == ("bad_request", "this hello is addressed to another holder")


# --- transfers ----------------------------------------------------------------------------


def test_chunks_of_someone_elses_transfer_are_refused(world: World, carol: Requester) -> None:
    """carol gets an offer on one connection and asks for its chunks on another, or
    for a transfer id she made up. Stopped by: transfers belong to their connection."""
    envelope, _ = carol.ask("hello", carol.hello_body(world.public_id))
    assert envelope.op == "offer"
    transfer_id = from_wire(protocol.Offer, envelope.body).transfer_id
    other = Requester(world.context, world.carol, world.holder)
    try:
        for transfer in (transfer_id, crypto.random_bytes(16)):
            request = to_wire(protocol.ChunkRequest(transfer, 0))
            assert other.refused("get", request) == ("not_found", "unknown or expired transfer")
    finally:
        other.close()
    out_of_range = to_wire(protocol.ChunkRequest(transfer_id, 10_000))
    assert carol.refused("get", out_of_range) == ("bad_request", "chunk 10000 is out of range")
    carol.send("finish", to_wire(protocol.Finish(transfer_id)))


def test_a_routing_id_that_looks_relayed_is_still_answered_directly(world: World) -> None:
    """Relayed requesters' keys on the holder cannot be chosen as a ZMQ routing id (at
    most 255 bytes): a direct client naming itself like one is answered as itself."""
    for routing_id in (
        b"relay:" + os.urandom(16),
        b"\xffrelay" + bytes(249),
    ):  # 255 bytes, the most
        requester = Requester(world.context, world.carol, world.holder, routing_id)
        try:
            envelope, _ = requester.ask("hello", requester.hello_body(world.public_id))
            assert envelope.op == "offer", envelope
        finally:
            requester.close()
    alice_still_serves(world)


def test_bob_still_downloads_afterwards(world: World) -> None:
    alice_still_serves(world)
    got = world.bob.run("get", world.public_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == world.public
    carol_dir = world.cluster.peers["carol"].data_dir
    token = session.load_session(carol_dir, "carol").token
    endpoint, key = world.cluster.broker_endpoint, world.cluster.broker_public_key()
    with BrokerClient(endpoint, key, world.carol.transport_key) as broker:
        with pytest.raises(RemoteError) as refused:  # the broker still answers, and refuses
            broker.lookup(token, world.private_id)
        assert refused.value.code == "not_found"
