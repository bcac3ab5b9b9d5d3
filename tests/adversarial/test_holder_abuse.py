"""A holder under pressure: from requesters it lets in, and from its own disk.

- Throwaway accounts (Sybils) take every transfer slot of a public file.
- A requester keeps the offer it got after the owner ran `unshare`.
- A FIFO, or a file whose reads hang, sits where a shared file was.

Against real `sfs-broker` and `sfs-peer serve` processes (`tests.harness`); the attackers
speak the peer protocol from this process with registered accounts of their own, as in
`test_hostile_peer.py`. One test runs a `PeerServer` in this process instead, because a
read that hangs cannot be made on demand with a real file system here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from sfs.common import protocol
from sfs.common.codec import from_wire, to_wire
from sfs.common.config import load_peer_config
from sfs.common.manifest import file_id_of
from sfs.common.tree import decode_header
from sfs.common.tree_index import pack_pages, pages_of
from sfs.peer import keys, session
from sfs.peer.client import BrokerClient
from sfs.peer.node import Peer as LocalPeer
from sfs.peer.registry import Share
from sfs.peer.server import MAX_READS_PER_CONNECTION, PeerServer
from sfs.peer.transfer import (
    MAX_TRANSFERS,
    MAX_TRANSFERS_PER_REQUESTER,
    HolderService,
    ReceiverLink,
)
from sfs.peer.tree_scan import build_tree
from tests.adversarial.test_hostile_peer import Requester
from tests.harness import Cluster, Peer, one_line_error

MiB = 1 << 20


@dataclass
class World:
    cluster: Cluster
    alice: Peer
    bob: Peer
    public_id: str
    public: bytes
    context: zmq.Context[zmq.Socket[bytes]]

    def account(self, name: str) -> keys.Identity:
        """A registered user made in this process (faster than the CLI, for many)."""
        config = load_peer_config(self.cluster.write_peer_config(name))
        with LocalPeer(config) as peer:
            peer.init()
            peer.register(f"{name}-password")
            return peer.identity

    def requester(self, identity: keys.Identity, file_id: str) -> Requester:
        """A connection to alice, as the broker lists her to `identity`."""
        token = session.load_session(self.cluster.root / identity.username, identity.username)
        endpoint, key = self.cluster.broker_endpoint, self.cluster.broker_public_key()
        with BrokerClient(endpoint, key, identity.transport_key) as broker:
            (holder,) = broker.lookup(token.token, file_id).holders
        return Requester(self.context, identity, holder)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        public = os.urandom(3 * MiB)  # three chunks
        (cluster.root / "public.bin").write_bytes(public)
        public_id = alice.share(cluster.root / "public.bin")
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            yield World(cluster, alice, bob, public_id, public, context)
        finally:
            context.destroy(linger=0)


def still_serves(peer: Peer) -> None:
    assert peer.server is not None and peer.server.alive()
    assert "Traceback" not in peer.server.output()


def offer(requester: Requester, file_id: str) -> bytes:
    """Say hello for `file_id`; the transfer id of the offer."""
    envelope, _ = requester.ask("hello", requester.hello_body(file_id))
    assert envelope.op == "offer", envelope
    return from_wire(protocol.Offer, envelope.body).transfer_id


def ask_chunk(requester: Requester, transfer_id: bytes, index: int) -> protocol.Envelope:
    requester.send("get", to_wire(protocol.ChunkRequest(transfer_id, index)))
    envelope, _ = requester.reply()
    return envelope


# --- item 5: Sybil accounts ----------------------------------------------------------------


def test_sybil_accounts_cannot_lock_others_out_of_a_public_file(world: World) -> None:
    """16 throwaway accounts open 4 transfers each (every slot of the holder) and keep
    reading, so no idle timeout frees them. Stopped by: at the global limit, the holder
    evicts the idlest transfer of the user holding the most (`HolderService._make_room_for`);
    bob, holding none, gets a slot, and exactly one Sybil transfer is lost."""
    sybils: list[tuple[Requester, list[bytes]]] = []
    try:
        for number in range(MAX_TRANSFERS // MAX_TRANSFERS_PER_REQUESTER):
            requester = world.requester(world.account(f"sybil{number}"), world.public_id)
            transfers = [offer(requester, world.public_id) for _ in range(4)]
            sybils.append((requester, transfers))
        for requester, transfers in sybils:  # the oldest activity: sybil0's first transfer
            for transfer_id in transfers:
                assert ask_chunk(requester, transfer_id, 0).op == "chunk"

        got = world.bob.run("get", world.public_id, "--json").check().json()
        assert Path(got["path"]).read_bytes() == world.public

        lost = [
            (number, position)
            for number, (requester, transfers) in enumerate(sybils)
            for position, transfer_id in enumerate(transfers)
            if ask_chunk(requester, transfer_id, 1).op != "chunk"
        ]
        assert lost == [(0, 0)]
    finally:
        for requester, transfers in sybils:  # leave the slots free for the other tests
            for transfer_id in transfers:
                requester.send("finish", to_wire(protocol.Finish(transfer_id)))
            if transfers:  # answered in order: once this is, the finishes are done
                requester.refused("get", to_wire(protocol.ChunkRequest(transfers[0], 0)))
            requester.close()
    still_serves(world.alice)


# --- item 8: unshare with a transfer under way ----------------------------------------------


def test_unshare_stops_a_transfer_under_way(world: World) -> None:
    """carol holds an offer and reads chunk 0; alice runs `unshare` (another process).
    Stopped by: the holder looks the file up in its share registry for every chunk."""
    source = world.cluster.root / "unshared.bin"
    source.write_bytes(os.urandom(3 * MiB))
    file_id = world.alice.share(source)
    carol = world.requester(world.account("carol"), file_id)
    try:
        transfer_id = offer(carol, file_id)
        assert ask_chunk(carol, transfer_id, 0).op == "chunk"
        world.alice.run("unshare", file_id).check()
        assert carol.refused("get", to_wire(protocol.ChunkRequest(transfer_id, 1))) == (
            "not_found",
            f"file {file_id} is no longer shared here",
        )
        for index in (2, 1):  # that transfer is over
            assert carol.refused("get", to_wire(protocol.ChunkRequest(transfer_id, index))) == (
                "not_found",
                "unknown or expired transfer",
            )
        assert carol.refused("hello", carol.hello_body(file_id)) == (
            "not_found",
            f"file {file_id} is not shared here",
        )
    finally:
        carol.close()
    still_serves(world.alice)


# --- item 9: a FIFO, or reads that hang ------------------------------------------------------


def test_a_fifo_in_place_of_a_shared_file_is_refused_and_others_still_served(
    world: World,
) -> None:
    """Someone replaces a shared file with a FIFO: opening it would block the holder's
    only serving thread. Stopped by: `reads.read_chunk` opens with O_NONBLOCK and serves
    regular files only. (As root is fine: this is not about permissions.)"""
    frank = world.cluster.add_peer("frank", serve=True)
    fifo, other = world.cluster.root / "fifo.bin", world.cluster.root / "other.bin"
    fifo.write_bytes(os.urandom(100_000))
    other_bytes = os.urandom(100_000)
    other.write_bytes(other_bytes)
    fifo_id, other_id = frank.share(fifo), frank.share(other)
    fifo.unlink()
    os.mkfifo(fifo)

    refused = world.bob.run("get", fifo_id)
    assert one_line_error(refused) == (
        "error: frank: the holder cannot read fifo.bin any more: it is not a regular file"
    )
    got = world.bob.run("get", other_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == other_bytes
    assert frank.server is not None
    assert f"cannot serve fifo.bin from {fifo}: not a regular file (a FIFO)" in (
        frank.server.output()
    )
    still_serves(frank)


def test_a_shared_folder_swapped_for_a_link_is_not_followed_by_the_holder(
    world: World,
) -> None:
    """Someone swaps a folder inside a shared tree for a link to a copy elsewhere: the
    holder must not read outside the tree, even bytes that would pass the chunk's hash.
    Stopped by: `reads.read_pieces` walks from the share's folder, one component at a
    time, with O_NOFOLLOW."""
    grace = world.cluster.add_peer("grace", serve=True)
    tree = world.cluster.root / "swapped-tree"
    (tree / "docs").mkdir(parents=True)
    notes = os.urandom(50_000)
    (tree / "docs" / "notes.bin").write_bytes(notes)
    tree_id = grace.share(tree)
    elsewhere = world.cluster.root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.bin").write_bytes(notes)
    (tree / "docs").rename(world.cluster.root / "docs-moved")
    (tree / "docs").symlink_to(elsewhere)

    refused = world.bob.run("get", tree_id)
    assert one_line_error(refused) == "error: grace: the holder cannot read swapped-tree any more"
    assert grace.server is not None
    assert "cannot read" in grace.server.output()
    still_serves(grace)


@dataclass
class HangingHolder:
    """alice's `PeerServer` in this process, serving `stuck.bin`, whose reads wait for
    `release`, and `fine.bin`; bob's connection to it holds an offer for each."""

    sock: zmq.Socket[bytes]
    stuck: ReceiverLink
    fine: ReceiverLink
    fine_bytes: bytes
    release: threading.Event

    def chunk(self) -> tuple[protocol.Envelope, list[bytes]]:
        assert self.sock.poll(10_000), "the holder did not answer"
        first, *rest = self.sock.recv_multipart()
        return protocol.decode_envelope(first), rest


@pytest.fixture
def hanging(tmp_path: Path) -> Iterator[HangingHolder]:
    alice = keys.create_identity(tmp_path / "alice", "alice")
    bob = keys.create_identity(tmp_path / "bob", "bob")
    shares: dict[str, Share] = {}
    contents: dict[str, bytes] = {}
    for name in ("stuck.bin", "fine.bin"):
        path = tmp_path / name
        contents[name] = os.urandom(200_000)
        path.write_bytes(contents[name])
        built = build_tree(path, alice, [])
        manifest_bytes = built.header_bytes
        share = Share(
            file_id_of(manifest_bytes),
            path,
            name,
            len(contents[name]),
            manifest_bytes,
            alice.sign(manifest_bytes),
            None,
            [],
            0,
            pages=pack_pages(pages_of(built.entry_pages, built.hash_pages)),
        )
        shares[share.file_id] = share
    release = threading.Event()

    def read(share: Share, offset: int, length: int) -> bytes:
        if share.name == "stuck.bin":
            release.wait(60)
        return contents[share.name][offset : offset + length]

    def anyone(username: str, bundle: object) -> None:
        return None

    service = HolderService(alice, shares.get, anyone, read)
    ready, stop = threading.Event(), threading.Event()
    server = PeerServer(service, alice, "tcp://127.0.0.1:*", False, stop, lambda _: ready.set())
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    thread = threading.Thread(target=server.serve, args=(context,), daemon=True)
    thread.start()
    sock = context.socket(zmq.DEALER)
    try:
        assert ready.wait(10)
        sock.linger = 0
        sock.connect(server.endpoint)
        links = []
        for share in shares.values():
            header = decode_header(share.manifest)
            link = ReceiverLink(bob, share.file_id, header, share.manifest, "alice", alice.bundle)
            sock.send(protocol.encode("hello", link.hello()))
            assert sock.poll(10_000)
            envelope = protocol.decode_envelope(sock.recv_multipart()[0])
            link.accept_offer(from_wire(protocol.Offer, envelope.body))
            links.append(link)
        yield HangingHolder(sock, links[0], links[1], contents["fine.bin"], release)
    finally:
        release.set()
        sock.close(linger=0)
        stop.set()
        thread.join(10)
        context.destroy(linger=0)
    assert not thread.is_alive()


def test_a_share_whose_reads_hang_does_not_stop_the_others(hanging: HangingHolder) -> None:
    """A shared file on storage that stops answering (a dead network mount): its reads
    block. Stopped by: reads run off the serving loop, one lane per file
    (`reads.ReadLanes`), so only that file waits. A real `PeerServer` on loopback; the
    hang is an injected read that waits on an event."""
    hanging.sock.send(protocol.encode("get", hanging.stuck.request(0)))
    hanging.sock.send(protocol.encode("get", hanging.fine.request(0)))
    envelope, rest = hanging.chunk()
    assert envelope.op == "chunk", "one hung share stopped the holder"
    header = from_wire(protocol.ChunkHeader, envelope.body)
    assert header.transfer_id == hanging.fine.transfer_id
    assert hanging.fine.open_chunk(header, rest[0]) == hanging.fine_bytes
    hanging.release.set()  # the storage answers again: the waiting chunk follows
    envelope, rest = hanging.chunk()
    header = from_wire(protocol.ChunkHeader, envelope.body)
    assert header.transfer_id == hanging.stuck.transfer_id


def test_chunk_requests_past_a_window_are_refused_at_once(hanging: HangingHolder) -> None:
    """Reads run off the loop, so ZeroMQ's queues no longer bound how many a requester
    starts. Stopped by: at most `MAX_READS_PER_CONNECTION` under way per connection; the
    rest are answered `busy` without touching the disk."""
    for _ in range(MAX_READS_PER_CONNECTION + 5):
        hanging.sock.send(protocol.encode("get", hanging.stuck.request(0)))
    refusals = [hanging.chunk()[0] for _ in range(5)]
    assert {(e.op, e.body["code"]) for e in refusals} == {("error", "busy")}
    assert refusals[0].body["message"] == "too many chunk requests in flight; retry"
    hanging.release.set()
    answered = [hanging.chunk()[0].op for _ in range(MAX_READS_PER_CONNECTION)]
    assert answered == ["chunk"] * MAX_READS_PER_CONNECTION


def test_bob_still_downloads_afterwards(world: World) -> None:
    still_serves(world.alice)
    got = world.bob.run("get", world.public_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == world.public
