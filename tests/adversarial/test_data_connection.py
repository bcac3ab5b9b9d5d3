"""The data connection (docs/PROTOCOL-v2.md section 4): chunks travel outside CurveZMQ,
on a plain ZMTP connection to the holder's data port, attached to one transfer by a proof
only the holder of the transfer key can make.

An observer (or anyone who can connect) of that connection must not be able to read a
chunk, forge one, replay one into another transfer or index, or attach without the
proof; and connecting to the data port must cost the holder bounded work. Against real
`sfs-broker` and `sfs-peer serve` processes (`tests.harness`); the attacker speaks the
protocol from this process (`Requester` of `test_hostile_peer.py` for control).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from sfs.common import crypto, protocol
from sfs.common.codec import from_wire, to_wire
from sfs.common.config import load_peer_config
from sfs.common.errors import IntegrityError
from sfs.peer import keys, session
from sfs.peer.client import BrokerClient
from sfs.peer.data_port import (
    ATTACH_DEADLINE,
    MAX_DATA_REQUEST_FRAME,
    MAX_UNATTACHED,
    MAX_UNATTACHED_PER_SOURCE,
)
from sfs.peer.node import Peer as LocalPeer
from sfs.peer.transfer import DATA_TICKET_SIZE
from tests.adversarial.test_hostile_peer import Requester
from tests.harness import Cluster, Peer

MiB = 1 << 20
WAIT_MS = 5000


@dataclass
class Transfer:
    """An offer alice made to bob, with what bob learns from it."""

    offer: protocol.Offer
    secret: crypto.TransferSecret
    requester: Requester

    @property
    def proof(self) -> bytes:
        return crypto.attach_proof(self.secret.key, self.offer.transfer_id, self.offer.data_ticket)


@dataclass
class World:
    cluster: Cluster
    alice: Peer
    bob: keys.Identity
    file_id: str
    content: bytes
    context: zmq.Context[zmq.Socket[bytes]]

    def transfer(self) -> Transfer:
        token = session.load_session(self.cluster.root / "bob", "bob")
        endpoint, key = self.cluster.broker_endpoint, self.cluster.broker_public_key()
        with BrokerClient(endpoint, key, self.bob.transport_key) as broker:
            lookup = broker.lookup(token.token, self.file_id)
        requester = Requester(self.context, self.bob, lookup.holders[0])
        envelope, _ = requester.ask("hello", requester.hello_body(self.file_id))
        assert envelope.op == "offer", envelope
        offer = from_wire(protocol.Offer, envelope.body)
        wrapped = crypto.unwrap(self.bob.signing_key, offer.wrapped_secret)
        return Transfer(offer, crypto.TransferSecret.from_bytes(wrapped), requester)

    def data(self, transfer: Transfer, reconnect: bool = True) -> zmq.Socket[bytes]:
        """A plain DEALER to the data endpoint the offer names; without `reconnect`, a
        connection the holder closes stays closed."""
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        if not reconnect:
            sock.reconnect_ivl = -1
        sock.connect(transfer.offer.data[0])
        return sock


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        cluster.add_peer("bob")
        content = os.urandom(3 * MiB)
        path: Path = cluster.root / "three.bin"
        path.write_bytes(content)
        file_id = alice.share(path)
        with LocalPeer(load_peer_config(cluster.root / "bob.yaml")) as bob:
            identity = bob.identity
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            yield World(cluster, alice, identity, file_id, content, context)
        finally:
            context.destroy(linger=0)


def send(sock: zmq.Socket[bytes], op: str, record: protocol.Record) -> None:
    sock.send(protocol.encode(op, record))


def attach_to(sock: zmq.Socket[bytes], transfer: Transfer) -> None:
    """Attach `sock` to `transfer`, asking for the holder's `attached` answer."""
    send(sock, "attach", protocol.Attach(transfer.offer.transfer_id, transfer.proof, answer=True))
    assert sock.poll(WAIT_MS), "the holder did not answer the attach"
    (frame,) = sock.recv_multipart()
    envelope = protocol.decode_envelope(frame)
    assert envelope.op == "attached", envelope
    answer = from_wire(protocol.DataAttached, envelope.body)
    assert answer.transfer_id == transfer.offer.transfer_id


def chunk(sock: zmq.Socket[bytes]) -> tuple[protocol.ChunkHeader, bytes] | None:
    """The next chunk on `sock`, or None if nothing comes (or the holder hung up)."""
    if not sock.poll(WAIT_MS):
        return None
    first, *rest = sock.recv_multipart()
    envelope = protocol.decode_envelope(first)
    assert envelope.op == "chunk", envelope
    return from_wire(protocol.ChunkHeader, envelope.body), rest[0]


def associated(world: World, transfer: Transfer, index: int) -> bytes:
    return protocol.chunk_associated_data(transfer.offer.transfer_id, world.file_id, index, 3)


def still_serves(peer: Peer) -> None:
    assert peer.server is not None and peer.server.alive()
    assert "Traceback" not in peer.server.output()


def test_the_offer_names_a_data_endpoint_and_a_fresh_ticket(world: World) -> None:
    first, second = world.transfer(), world.transfer()
    for transfer in (first, second):
        (endpoint,) = transfer.offer.data
        assert protocol.valid_endpoint(endpoint)
        assert len(transfer.offer.data_ticket) == DATA_TICKET_SIZE
        transfer.requester.close()
    assert first.offer.data_ticket != second.offer.data_ticket


def test_attached_connection_carries_sealed_chunks_an_observer_cannot_read(world: World) -> None:
    """What crosses the data connection is the GCM ciphertext: no plaintext in it, and
    only the transfer key opens it."""
    transfer = world.transfer()
    data = world.data(transfer)
    try:
        attach_to(data, transfer)
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 1))
        got = chunk(data)
        assert got is not None
        header, ciphertext = got
        assert header.index == 1
        plaintext = world.content[MiB : 2 * MiB]
        assert plaintext[:64] not in ciphertext and len(ciphertext) == MiB + 16
        cipher = crypto.ChunkCipher(transfer.secret)
        assert cipher.open(1, ciphertext, associated(world, transfer, 1)) == plaintext
        # Forged: one flipped byte fails the tag.
        flipped = bytearray(ciphertext)
        flipped[100] ^= 1
        with pytest.raises(IntegrityError):
            cipher.open(1, bytes(flipped), associated(world, transfer, 1))
        # Replayed as another index, or into another transfer: the associated data differs.
        with pytest.raises(IntegrityError):
            cipher.open(2, ciphertext, associated(world, transfer, 2))
        other = world.transfer()
        with pytest.raises(IntegrityError):
            crypto.ChunkCipher(other.secret).open(1, ciphertext, associated(world, other, 1))
        other.requester.close()
    finally:
        data.close(linger=0)
        transfer.requester.close()
    still_serves(world.alice)


def test_an_attach_that_asks_no_answer_gets_none(world: World) -> None:
    """Requesters from before `attached` do not ask for it: their first reply is a chunk."""
    transfer = world.transfer()
    data = world.data(transfer)
    try:
        send(data, "attach", protocol.Attach(transfer.offer.transfer_id, transfer.proof))
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        got = chunk(data)  # asserts that it is a chunk
        assert got is not None and got[0].index == 0
    finally:
        data.close(linger=0)
        transfer.requester.close()


def test_attach_with_a_wrong_proof_gets_nothing(world: World) -> None:
    transfer = world.transfer()
    data = world.data(transfer)
    try:
        wrong = bytes(a ^ 1 for a in transfer.proof)
        send(data, "attach", protocol.Attach(transfer.offer.transfer_id, wrong))
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        assert chunk(data) is None
    finally:
        data.close(linger=0)
        transfer.requester.close()
    still_serves(world.alice)


def test_chunk_request_without_attach_gets_nothing(world: World) -> None:
    transfer = world.transfer()
    data = world.data(transfer)
    try:
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        assert chunk(data) is None
    finally:
        data.close(linger=0)
        transfer.requester.close()


def test_an_attach_replayed_on_another_transfer_or_connection_is_refused(world: World) -> None:
    """An observer saw bob's attach: it proves nothing for another transfer, and the
    transfer it names has its data connection already."""
    transfer, other = world.transfer(), world.transfer()
    mine, replay_other, replay_same = (world.data(transfer) for _ in range(3))
    try:
        attach = protocol.Attach(transfer.offer.transfer_id, transfer.proof)
        attach_to(mine, transfer)
        send(mine, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        assert chunk(mine) is not None
        send(replay_other, "attach", protocol.Attach(other.offer.transfer_id, transfer.proof))
        send(replay_other, "get", protocol.ChunkRequest(other.offer.transfer_id, 0))
        assert chunk(replay_other) is None
        send(replay_same, "attach", attach)
        send(replay_same, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        assert chunk(replay_same) is None
        # The attached connection asks only for its own transfer.
        send(mine, "get", protocol.ChunkRequest(other.offer.transfer_id, 0))
        first, *_ = mine.recv_multipart() if mine.poll(WAIT_MS) else [b""]
        assert protocol.decode_envelope(first).op == "error"
    finally:
        for sock in (mine, replay_other, replay_same):
            sock.close(linger=0)
        transfer.requester.close()
        other.requester.close()
    still_serves(world.alice)


def test_finished_transfer_closes_its_data_connection(world: World) -> None:
    transfer = world.transfer()
    data = world.data(transfer)
    try:
        attach_to(data, transfer)
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        assert chunk(data) is not None
        transfer.requester.send("finish", to_wire(protocol.Finish(transfer.offer.transfer_id)))
        time.sleep(0.5)
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 1))
        assert chunk(data) is None
    finally:
        data.close(linger=0)
        transfer.requester.close()


def connected_to_data_port(world: World, count: int) -> list[zmq.Socket[bytes]]:
    transfer = world.transfer()
    transfer.requester.close()
    socks = []
    for _ in range(count):
        sock = world.data(transfer, reconnect=False)
        sock.send(b"x")  # anything: it is not an attach
        socks.append(sock)
    return socks


def holder_connections(world: World) -> int:
    """TCP connections established to alice's `sfs-peer serve`, from /proc."""
    assert world.alice.server is not None
    pid = world.alice.server.popen.pid
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def test_attach_flood_and_silent_connections_are_closed(world: World) -> None:
    """Connections that never attach: a frame that is not an attach is answered by
    closing the connection; silent ones are closed after the attach deadline, and at
    most MAX_UNATTACHED wait at once."""
    before = holder_connections(world)
    silent: list[zmq.Socket[bytes]] = []
    flood = connected_to_data_port(world, 2 * MAX_UNATTACHED)
    try:
        transfer = world.transfer()
        transfer.requester.close()
        for _ in range(2 * MAX_UNATTACHED):
            silent.append(world.data(transfer, reconnect=False))
        time.sleep(1.0)
        assert holder_connections(world) <= before + MAX_UNATTACHED + 2
        time.sleep(ATTACH_DEADLINE + 1.5)
        assert holder_connections(world) <= before + 2
    finally:
        for sock in flood + silent:
            sock.close(linger=0)
    still_serves(world.alice)


def test_oversized_frame_on_the_data_port_is_dropped(world: World) -> None:
    """Frames beyond MAX_DATA_REQUEST_FRAME are not read: the connection is cut."""
    transfer = world.transfer()
    data = world.data(transfer)
    monitor = data.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        data.send(b"\0" * (MAX_DATA_REQUEST_FRAME + 1))
        assert monitor.poll(WAIT_MS), "the holder kept the connection"
    finally:
        data.disable_monitor()
        monitor.close(linger=0)
        data.close(linger=0)
        transfer.requester.close()
    still_serves(world.alice)


def test_a_real_download_uses_the_data_connection(world: World, tmp_path: Path) -> None:
    """`sfs-peer get` attaches and pulls the chunks there: alice's log says so."""
    assert world.alice.server is not None
    attached = world.alice.server.output().count("bob attached a data connection")
    bob = world.cluster.peers["bob"]
    result = bob.run("get", world.file_id, "--out", str(tmp_path), "--json").check().json()
    assert Path(result["path"]).read_bytes() == world.content
    assert world.alice.server.output().count("bob attached a data connection") == attached + 1


# --- squatters: connections that wait and never attach (issue 12) ---------------------


def squat(endpoint: str, count: int) -> list[socket.socket]:
    """`count` silent TCP connections to the data port (no ZMTP, no attach), from a few
    loopback addresses in turn (the oldest first)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    made = []
    for i in range(count):
        sock = socket.socket()
        sock.settimeout(WAIT_MS / 1000)
        sock.bind((f"127.0.0.{10 + i % 9}", 0))
        sock.connect((host, int(port)))
        made.append(sock)
    return made


def shut_by_holder(sock: socket.socket) -> bool:
    """Whether the holder closed this silent connection (reading its greeting first)."""
    try:
        while data := sock.recv(4096):
            del data
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_a_full_data_port_still_takes_an_honest_attach(world: World) -> None:
    """MAX_UNATTACHED + 4 silent connections fill the waiting places: the requester who
    comes next is not the one closed (the oldest waiting are), and its attach is answered."""
    transfer = world.transfer()
    squatters = squat(transfer.offer.data[0], MAX_UNATTACHED + 4)
    time.sleep(0.5)  # accepted by the holder
    data = world.data(transfer, reconnect=False)
    try:
        attach_to(data, transfer)
        send(data, "get", protocol.ChunkRequest(transfer.offer.transfer_id, 0))
        assert chunk(data) is not None
        for sock in squatters[:4]:
            sock.settimeout(1.0)
        assert all(shut_by_holder(sock) for sock in squatters[:4])
    finally:
        data.close(linger=0)
        for sock in squatters:
            sock.close()
        transfer.requester.close()
    still_serves(world.alice)


def test_one_address_waits_in_at_most_its_share_of_places(world: World) -> None:
    transfer = world.transfer()
    transfer.requester.close()
    host, port = transfer.offer.data[0].removeprefix("tcp://").rsplit(":", 1)
    squatters = []
    try:
        for _ in range(MAX_UNATTACHED_PER_SOURCE + 3):
            sock = socket.create_connection((host, int(port)), timeout=1.0)
            squatters.append(sock)
        time.sleep(0.5)
        assert [shut_by_holder(sock) for sock in squatters[:3]] == [True] * 3
        for sock in squatters[3:]:  # all checked well within the attach deadline
            sock.settimeout(0.2)
        assert not any(shut_by_holder(sock) for sock in squatters[3:])
    finally:
        for sock in squatters:
            sock.close()
    still_serves(world.alice)


def test_a_download_goes_on_while_the_data_port_is_squatted(world: World, tmp_path: Path) -> None:
    """The reviewer's attack: MAX_UNATTACHED + 4 silent connections, renewed every 4 s,
    must not make `sfs-peer get` fail (before the fix: "did not send the next chunk")."""
    transfer = world.transfer()
    transfer.requester.close()
    stop = threading.Event()

    def renew() -> None:
        while not stop.is_set():
            squatters = squat(transfer.offer.data[0], MAX_UNATTACHED + 4)
            stop.wait(4.0)
            for sock in squatters:
                sock.close()

    squatter = threading.Thread(target=renew, daemon=True)
    squatter.start()
    try:
        time.sleep(1.0)
        bob = world.cluster.peers["bob"]
        for attempt in range(2):
            out = tmp_path / str(attempt)
            result = bob.run("get", world.file_id, "--out", str(out), "--json").check().json()
            assert Path(result["path"]).read_bytes() == world.content
    finally:
        stop.set()
        squatter.join()
    still_serves(world.alice)
