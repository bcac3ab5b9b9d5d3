"""sfs.peer.transfer: the receiver (ReceiverLink, ChunkPlan) wired straight to the holder
(HolderService), frames passing through the real codec, no sockets."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfs.common import crypto, protocol
from sfs.common.codec import Record, from_wire, pack, to_wire, unpack
from sfs.common.errors import IntegrityError, ProtocolError, TrustError
from sfs.common.identity import KeyBundle
from sfs.common.manifest import MIN_CHUNK_SIZE, file_id_of, manifest_digest
from sfs.common.protocol import ErrorCode, Refused
from sfs.common.tree_index import IndexReader, TreeIndex
from sfs.peer import transfer
from sfs.peer.keys import Identity, create_identity
from sfs.peer.partial import PartialFile
from sfs.peer.registry import Share
from sfs.peer.transfer import ChunkPlan, HolderService, ReceiverLink
from tests.trees import FileTree, file_tree

CHUNK = MIN_CHUNK_SIZE
CONN = b"connection-1"
OTHER_CONN = b"connection-2"

# 3 full chunks and a short last one
DATA = random.Random(5).randbytes(3 * CHUNK + 1234)


# --- identities (RSA-3072 generation is slow: once per module) --------------------------


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The holder (and owner of the shared file)."""
    return create_identity(tmp_path_factory.mktemp("alice"), "alice")


@pytest.fixture(scope="module")
def bob(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The requester."""
    return create_identity(tmp_path_factory.mktemp("bob"), "bob")


@pytest.fixture(scope="module")
def mallory(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Someone else with a valid key of their own."""
    return create_identity(tmp_path_factory.mktemp("mallory"), "mallory")


# --- helpers ------------------------------------------------------------------------------


def make_manifest(owner: Identity, data: bytes, name: str = "data.bin") -> FileTree:
    return file_tree(data, CHUNK, name=name, owner=owner.username, owner_fp=owner.fingerprint)


@dataclasses.dataclass
class Shared:
    manifest: TreeIndex
    manifest_bytes: bytes
    share: Share

    @property
    def file_id(self) -> str:
        return self.share.file_id


def share_of(
    owner: Identity, data: bytes, access: list[str] | None = None, name: str = "data.bin"
) -> Shared:
    tree = make_manifest(owner, data, name)
    manifest_bytes = tree.header_bytes
    share = Share(
        file_id=file_id_of(manifest_bytes),
        path=Path("/nonexistent") / name,  # never read: read_chunk is injected
        name=name,
        size=len(data),
        manifest=manifest_bytes,
        signature=owner.sign(manifest_bytes),
        access=access,
        keywords=[],
        shared_at=1_700_000_000,
        pages=tree.packed_pages,
    )
    return Shared(tree.index, manifest_bytes, share)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A holder serving `shared` files, plus helpers to talk to it like a peer would."""

    def __init__(
        self,
        holder: Identity,
        files: dict[str, bytes],
        shares: list[Shared],
        check_requester: Callable[[str, KeyBundle], None] | None = None,
        read_chunk: Callable[[Share, int, int], bytes] | None = None,
    ) -> None:
        self.holder = holder
        self.files = files  # share name -> content on the holder's "disk"
        self.shares = {s.file_id: s.share for s in shares}
        self.checked: list[tuple[str, bytes]] = []
        self.clock = Clock()

        def record_check(username: str, bundle: KeyBundle) -> None:
            self.checked.append((username, bundle.fingerprint()))

        def read(share: Share, offset: int, length: int) -> bytes:
            return self.files[share.name][offset : offset + length]

        self.service = HolderService(
            holder,
            lookup_share=self.shares.get,
            check_requester=check_requester or record_check,
            read_chunk=read_chunk or read,
            clock=self.clock,
        )

    def send(
        self,
        op: str,
        record: Record,
        connection: bytes = CONN,
        client_key: bytes | None = None,
    ) -> list[bytes]:
        return self.service.handle(connection, client_key, protocol.encode(op, record))


def link_for(
    requester: Identity, holder_bundle: KeyBundle, shared: Shared, file_id: str | None = None
) -> ReceiverLink:
    return ReceiverLink(
        requester,
        file_id or shared.file_id,
        shared.manifest.header,
        shared.manifest_bytes,
        "alice",
        holder_bundle,
    )


def as_offer(frames: list[bytes]) -> protocol.Offer:
    assert len(frames) == 1
    envelope = protocol.decode_envelope(frames[0])
    assert envelope.op == "offer", envelope
    return from_wire(protocol.Offer, envelope.body, "offer")


def as_chunk(frames: list[bytes]) -> tuple[protocol.ChunkHeader, bytes]:
    assert len(frames) == 2
    envelope = protocol.decode_envelope(frames[0])
    assert envelope.op == "chunk", envelope
    return from_wire(protocol.ChunkHeader, envelope.body, "chunk"), frames[1]


def as_error(frames: list[bytes], code: ErrorCode) -> str:
    """The message of the single error frame in `frames`, checking its code."""
    assert len(frames) == 1
    envelope = protocol.decode_envelope(frames[0])
    assert envelope.op == "error"
    error = from_wire(protocol.ErrorBody, envelope.body, "error")
    assert error.code == code.value, error
    return error.message


def connect(rig: Rig, link: ReceiverLink, connection: bytes = CONN) -> protocol.Offer:
    offer = as_offer(rig.send("hello", link.hello(), connection))
    link.accept_offer(offer)
    return offer


def resign(offer: protocol.Offer, signer: Identity, **changes: Any) -> protocol.Offer:
    changed = dataclasses.replace(offer, **changes)
    return dataclasses.replace(changed, signature=signer.sign(protocol.offer_payload(changed)))


def flip(data: bytes, index: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.fixture
def shared(alice: Identity) -> Shared:
    return share_of(alice, DATA)


@pytest.fixture
def rig(alice: Identity, shared: Shared) -> Rig:
    return Rig(alice, {"data.bin": DATA}, [shared])


# --- the whole exchange -------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3, 8])
def test_full_transfer_reassembles_the_exact_bytes(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, window: int
) -> None:
    assert shared.manifest.chunk_count == 4
    link = link_for(bob, alice.bundle, shared)
    offer = connect(rig, link)
    assert link.transfer_id == offer.transfer_id
    assert rig.service.active_transfers == 1

    plan = ChunkPlan(shared.manifest, window)
    received: dict[int, bytes] = {}
    requested: list[int] = []
    pending: list[list[bytes]] = []
    while not plan.complete:
        for index in plan.next_requests():
            requested.append(index)
            pending.append(rig.send("get", link.request(index)))
        assert 0 < len(plan.in_flight) <= window
        # answer the newest request first, so chunks arrive out of order
        header, ciphertext = as_chunk(pending.pop())
        sealed = ciphertext[: -crypto.GCM_TAG_SIZE]
        assert sealed != DATA[header.index * CHUNK : (header.index + 1) * CHUNK]
        plaintext = link.open_chunk(header, ciphertext)
        plan.accept(header.index, plaintext)  # raises unless it matches the manifest
        received[header.index] = plaintext
    assert not pending
    assert sorted(requested) == list(range(4))  # each chunk asked for exactly once
    assert plan.bytes_done == len(DATA)
    assert b"".join(received[i] for i in range(4)) == DATA

    assert rig.send("finish", protocol.Finish(link.transfer_id)) == []
    assert rig.service.active_transfers == 0
    assert rig.checked == [("bob", bob.fingerprint)]


def test_full_transfer_into_a_partial_file(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, tmp_path: Path
) -> None:
    """The download engine's loop without the socket: offer, window, verify, write, finish."""
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    plan = ChunkPlan(shared.manifest, window=2)
    partial = PartialFile(tmp_path, shared.file_id, shared.manifest)
    for index in partial.resume():
        plan.adopt(index)
    assert plan.resumed == 0
    while not plan.complete:
        for index in plan.next_requests():
            header, ciphertext = as_chunk(rig.send("get", link.request(index)))
            plaintext = link.open_chunk(header, ciphertext)
            plan.accept(header.index, plaintext)
            partial.write(header.index, plaintext)
    path = partial.finish("data.bin")
    assert path == tmp_path / "data.bin"
    assert path.read_bytes() == DATA


def test_an_interrupted_transfer_resumes_where_it_stopped(
    alice: Identity, bob: Identity, shared: Shared, tmp_path: Path
) -> None:
    """A first attempt asks for chunks 0 to 2 and gets 0 and 2 before its holder goes;
    the next attempt finds them in the partial file and asks only for the others."""
    reads: list[int] = []

    def read(share: Share, offset: int, length: int) -> bytes:
        reads.append(offset // CHUNK)
        return DATA[offset : offset + length]

    rig = Rig(alice, {}, [shared], read_chunk=read)

    def start() -> tuple[ReceiverLink, ChunkPlan, PartialFile]:
        link = link_for(bob, alice.bundle, shared)
        connect(rig, link)
        plan = ChunkPlan(shared.manifest, window=2)
        partial = PartialFile(tmp_path, shared.file_id, shared.manifest)
        for index in partial.resume():
            plan.adopt(index)
        return link, plan, partial

    def fetch(link: ReceiverLink, plan: ChunkPlan, partial: PartialFile, index: int) -> None:
        header, ciphertext = as_chunk(rig.send("get", link.request(index)))
        plaintext = link.open_chunk(header, ciphertext)
        plan.accept(header.index, plaintext)
        partial.write(header.index, plaintext)

    link, plan, partial = start()
    assert plan.claim(3) == [0, 1, 2]
    fetch(link, plan, partial, 2)
    fetch(link, plan, partial, 0)
    partial.keep()  # chunk 1 never came

    reads.clear()
    link, plan, partial = start()
    assert plan.have == {0, 2}
    assert (plan.resumed, plan.bytes_resumed, plan.bytes_done) == (2, 2 * CHUNK, 2 * CHUNK)
    while not plan.complete:
        for index in plan.next_requests():
            fetch(link, plan, partial, index)
    assert reads == [1, 3]  # only what the first attempt lacked
    assert plan.bytes_done == len(DATA)
    assert plan.bytes_done - plan.bytes_resumed == len(DATA) - 2 * CHUNK
    assert partial.finish("data.bin").read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


# --- index pages ---------------------------------------------------------------------------


def as_page(frames: list[bytes]) -> tuple[protocol.PageHeader, bytes]:
    assert len(frames) == 2
    envelope = protocol.decode_envelope(frames[0])
    assert envelope.op == "page", envelope
    return from_wire(protocol.PageHeader, envelope.body, "page"), frames[1]


def test_the_index_pages_come_sealed_and_check_against_the_header(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    reader = IndexReader(shared.manifest.header)
    for kind, index in reader.wanted():
        header, sealed = as_page(rig.send("page", link.page_request(kind, index)))
        assert sealed != shared.manifest.pages.page(kind, index)  # not in the clear
        reader.add(kind, index, link.open_page(header, sealed))
    tree = reader.finish()
    assert [entry.path for entry in tree.entries] == ["data.bin"]
    assert tree.chunk_hashes == shared.manifest.chunk_hashes


def test_a_page_out_of_range_or_of_no_transfer_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    assert "unknown or expired" in as_error(
        rig.send("page", protocol.PageRequest(b"\x00" * 16, "entries", 0)), ErrorCode.NOT_FOUND
    )
    connect(rig, link)
    message = as_error(rig.send("page", link.page_request("hashes", 1)), ErrorCode.BAD_REQUEST)
    assert message == "hashes page 1 is out of range"


def test_a_page_sealed_for_another_index_fails_authentication(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    header, sealed = as_page(rig.send("page", link.page_request("hashes", 0)))
    moved = dataclasses.replace(header, kind="entries")
    with pytest.raises(IntegrityError, match="entries page 0 from alice failed authentication"):
        link.open_page(moved, sealed)


def test_a_page_that_is_not_the_signed_one_is_refused(shared: Shared) -> None:
    reader = IndexReader(shared.manifest.header)
    page = shared.manifest.pages.page("hashes", 0)
    assert page is not None
    with pytest.raises(IntegrityError, match="hashes page 0 does not match the signed tree header"):
        reader.add("hashes", 0, flip(page))
    with pytest.raises(IntegrityError, match="index is incomplete"):
        reader.finish()


def test_a_share_from_before_the_tree_manifest_is_not_served(
    alice: Identity, bob: Identity
) -> None:
    old = share_of(alice, DATA)
    old = dataclasses.replace(old, share=dataclasses.replace(old.share, pages=b""))
    rig = Rig(alice, {"data.bin": DATA}, [old])
    message = as_error(
        rig.send("hello", link_for(bob, alice.bundle, old).hello()), ErrorCode.NOT_FOUND
    )
    assert message == "data.bin was shared with an older sfs: share it again"


def test_empty_file_needs_no_chunks(alice: Identity, bob: Identity) -> None:
    shared = share_of(alice, b"", name="empty")
    rig = Rig(alice, {"empty": b""}, [shared])
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    plan = ChunkPlan(shared.manifest, window=4)
    assert plan.complete
    assert plan.next_requests() == []
    as_error(rig.send("get", link.request(0)), ErrorCode.BAD_REQUEST)


def test_access_list_naming_the_requester_is_served(alice: Identity, bob: Identity) -> None:
    shared = share_of(alice, DATA, access=["carol", "bob"])
    rig = Rig(alice, {"data.bin": DATA}, [shared])
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    header, ciphertext = as_chunk(rig.send("get", link.request(3)))
    assert link.open_chunk(header, ciphertext) == DATA[3 * CHUNK :]


def test_matching_client_key_is_accepted(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    frames = rig.send("hello", link.hello(), client_key=bob.bundle.curve_public)
    link.accept_offer(as_offer(frames))


def test_each_transfer_gets_a_fresh_key(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    first, second = link_for(bob, alice.bundle, shared), link_for(bob, alice.bundle, shared)
    connect(rig, first)
    connect(rig, second)
    assert first.transfer_id != second.transfer_id
    _, one = as_chunk(rig.send("get", first.request(0)))
    _, two = as_chunk(rig.send("get", second.request(0)))
    assert one != two


def test_offer_is_signed_by_the_holder_and_bound_to_the_hello(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    hello = link.hello()
    offer = as_offer(rig.send("hello", hello))
    crypto.verify(alice.bundle.rsa_key(), offer.signature, protocol.offer_payload(offer), "t")
    assert offer.file_id == shared.file_id
    assert offer.requester_nonce == hello.nonce
    assert offer.requester_fp == bob.fingerprint
    assert offer.holder_fp == alice.fingerprint
    assert offer.manifest_digest == manifest_digest(shared.manifest_bytes)


# --- the holder refuses -------------------------------------------------------------------


def test_unknown_file_id_is_not_found(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared, file_id="0" * 32)
    message = as_error(rig.send("hello", link.hello()), ErrorCode.NOT_FOUND)
    assert "0" * 32 in message
    assert rig.service.active_transfers == 0


def test_user_not_on_the_access_list_is_forbidden(alice: Identity, bob: Identity) -> None:
    shared = share_of(alice, DATA, access=["carol"])
    rig = Rig(alice, {"data.bin": DATA}, [shared])
    link = link_for(bob, alice.bundle, shared)
    message = as_error(rig.send("hello", link.hello()), ErrorCode.FORBIDDEN)
    assert "not shared with you" in message
    assert rig.service.active_transfers == 0


def test_empty_access_list_serves_nobody(alice: Identity, bob: Identity) -> None:
    shared = share_of(alice, DATA, access=[])
    rig = Rig(alice, {"data.bin": DATA}, [shared])
    link = link_for(bob, alice.bundle, shared)
    as_error(rig.send("hello", link.hello()), ErrorCode.FORBIDDEN)


def test_hello_with_a_bad_signature_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    hello = link_for(bob, alice.bundle, shared).hello()
    forged = dataclasses.replace(hello, signature=flip(hello.signature, 10))
    message = as_error(rig.send("hello", forged), ErrorCode.FORBIDDEN)
    assert "signature" in message
    assert rig.service.active_transfers == 0
    assert rig.checked == []


def test_hello_with_a_changed_field_no_longer_verifies(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    hello = link_for(bob, alice.bundle, shared).hello()
    as_error(
        rig.send("hello", dataclasses.replace(hello, nonce=flip(hello.nonce))), ErrorCode.FORBIDDEN
    )
    as_error(rig.send("hello", dataclasses.replace(hello, requester="carol")), ErrorCode.FORBIDDEN)


def test_hello_signed_by_another_key_than_its_bundle_is_refused(
    rig: Rig, shared: Shared, bob: Identity, mallory: Identity, alice: Identity
) -> None:
    """Mallory claims to be bob with bob's bundle, but cannot sign with bob's key."""
    hello = link_for(bob, alice.bundle, shared).hello()
    forged = dataclasses.replace(hello, signature=mallory.sign(protocol.hello_payload(hello)))
    as_error(rig.send("hello", forged), ErrorCode.FORBIDDEN)
    assert rig.checked == []


def test_hello_with_a_truncated_signature_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    hello = link_for(bob, alice.bundle, shared).hello()
    for signature in (b"", b"\x00", hello.signature[:-1]):
        frames = rig.send("hello", dataclasses.replace(hello, signature=signature))
        as_error(frames, ErrorCode.FORBIDDEN)


def test_hello_addressed_to_another_holder_is_refused(
    rig: Rig, shared: Shared, bob: Identity, mallory: Identity
) -> None:
    link = link_for(bob, mallory.bundle, shared)  # bob thinks he talks to mallory
    message = as_error(rig.send("hello", link.hello()), ErrorCode.BAD_REQUEST)
    assert "another holder" in message
    assert rig.service.active_transfers == 0


def test_hello_whose_curve_key_is_not_the_connections_is_refused(
    rig: Rig, shared: Shared, bob: Identity, mallory: Identity, alice: Identity
) -> None:
    """A hello replayed by mallory over her own CurveZMQ connection."""
    link = link_for(bob, alice.bundle, shared)
    frames = rig.send("hello", link.hello(), client_key=mallory.bundle.curve_public)
    message = as_error(frames, ErrorCode.FORBIDDEN)
    assert "connection" in message
    assert rig.service.active_transfers == 0


def test_hello_with_a_malformed_bundle_key_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    hello = link_for(bob, alice.bundle, shared).hello()
    bundle = KeyBundle(b"not a DER key", bob.bundle.curve_public)
    frames = rig.send("hello", dataclasses.replace(hello, bundle=bundle))
    as_error(frames, ErrorCode.FORBIDDEN)


@pytest.mark.parametrize(
    ("exception", "code"),
    [
        (Refused(ErrorCode.FORBIDDEN, "your key is not the one registered for you"), "forbidden"),
        (Refused(ErrorCode.BUSY, "the holder cannot check your key now"), "busy"),
        (TrustError("the key of bob has changed"), "forbidden"),
        (RuntimeError("a bug in the checker"), "internal"),
    ],
)
def test_check_requester_raising_is_answered_with_an_error(
    alice: Identity, bob: Identity, shared: Shared, exception: Exception, code: str
) -> None:
    calls: list[str] = []

    def refuse(username: str, bundle: KeyBundle) -> None:
        calls.append(username)
        raise exception

    rig = Rig(alice, {"data.bin": DATA}, [shared], check_requester=refuse)
    link = link_for(bob, alice.bundle, shared)
    message = as_error(rig.send("hello", link.hello()), ErrorCode(code))
    assert calls == ["bob"]
    if code == "internal":
        assert "a bug in the checker" not in message  # internals stay on the holder
    else:
        assert message == str(exception)
    assert rig.service.active_transfers == 0


def test_chunk_request_from_another_connection_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link, CONN)
    as_error(rig.send("get", link.request(0), OTHER_CONN), ErrorCode.NOT_FOUND)
    as_chunk(rig.send("get", link.request(0), CONN))  # the right connection still works


@pytest.mark.parametrize("index", [4, 5, 2**32])
def test_chunk_index_out_of_range_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, index: int
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    message = as_error(rig.send("get", link.request(index)), ErrorCode.BAD_REQUEST)
    assert "out of range" in message
    as_chunk(rig.send("get", link.request(3)))  # the last real chunk


def test_unknown_transfer_id_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    other = protocol.ChunkRequest(flip(link.transfer_id), 0)
    message = as_error(rig.send("get", other), ErrorCode.NOT_FOUND)
    assert "unknown" in message


def test_file_that_got_shorter_on_disk_is_refused(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    truncated = DATA[: 2 * CHUNK + 10]
    rig = Rig(alice, {"data.bin": truncated}, [shared])
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    as_chunk(rig.send("get", link.request(1)))  # still complete
    message = as_error(rig.send("get", link.request(2)), ErrorCode.INTERNAL)
    assert "changed" in message
    # The transfer is over; a later request is told why.
    assert as_error(rig.send("get", link.request(3)), ErrorCode.INTERNAL) == message


def test_file_that_cannot_be_read_any_more_is_refused(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    def gone(share: Share, offset: int, length: int) -> bytes:
        raise FileNotFoundError(2, "No such file or directory")

    rig = Rig(alice, {}, [shared], read_chunk=gone)
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    message = as_error(rig.send("get", link.request(0)), ErrorCode.INTERNAL)
    assert "cannot read" in message


def test_read_chunk_is_asked_for_each_chunks_offset_and_length(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    reads: list[tuple[int, int]] = []

    def read(share: Share, offset: int, length: int) -> bytes:
        assert share is shared.share
        reads.append((offset, length))
        return DATA[offset : offset + length]

    rig = Rig(alice, {}, [shared], read_chunk=read)
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    for index in (3, 0):
        as_chunk(rig.send("get", link.request(index)))
    assert reads == [(3 * CHUNK, 1234), (0, CHUNK)]


def test_a_requester_at_the_limit_loses_its_least_active_transfer_whatever_the_connection(
    rig: Rig, shared: Shared, bob: Identity, mallory: Identity, alice: Identity
) -> None:
    # Dead downloads never say finish; refusing would lock bob out until they expire.
    limit = transfer.MAX_TRANSFERS_PER_REQUESTER
    links = []
    for number in range(limit):
        links.append(link_for(bob, alice.bundle, shared))
        connect(rig, links[-1], f"bob-{number}".encode())
        rig.clock.now += 1
    as_chunk(rig.send("get", links[0].request(0), b"bob-0"))  # now bob-1 is the idlest
    connect(rig, link_for(mallory, alice.bundle, shared), b"other")
    connect(rig, link_for(bob, alice.bundle, shared), b"bob-extra")
    assert rig.service.active_transfers == limit + 1  # bob still has only `limit`
    as_error(rig.send("get", links[1].request(0), b"bob-1"), ErrorCode.NOT_FOUND)
    for number in (0, 2, 3):
        as_chunk(rig.send("get", links[number].request(0), f"bob-{number}".encode()))


def test_at_the_limit_in_all_the_user_holding_the_most_loses_its_idlest_transfer(
    rig: Rig,
    shared: Shared,
    bob: Identity,
    mallory: Identity,
    alice: Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sybils: accounts made to fill every slot must not lock anyone out.
    monkeypatch.setattr(transfer, "MAX_TRANSFERS", 4)
    mallorys = []
    for number in range(4):
        mallorys.append(link_for(mallory, alice.bundle, shared))
        connect(rig, mallorys[-1], f"m-{number}".encode())
        rig.clock.now += 1
    as_chunk(rig.send("get", mallorys[0].request(0), b"m-0"))  # now m-1 is the idlest
    connect(rig, link_for(bob, alice.bundle, shared), b"bob")
    assert rig.service.active_transfers == 4
    as_error(rig.send("get", mallorys[1].request(0), b"m-1"), ErrorCode.NOT_FOUND)
    for number in (0, 2, 3):
        as_chunk(rig.send("get", mallorys[number].request(0), f"m-{number}".encode()))


def test_at_the_limit_in_all_nobody_loses_a_slot_to_someone_holding_as_many(
    rig: Rig,
    shared: Shared,
    bob: Identity,
    mallory: Identity,
    alice: Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fair shares are stable: a slot moves only from a user who would still hold at
    least as many as the one who takes it, so equal users never evict each other."""
    monkeypatch.setattr(transfer, "MAX_TRANSFERS", 4)
    for number in range(3):
        connect(rig, link_for(mallory, alice.bundle, shared), f"m-{number}".encode())
    bobs = link_for(bob, alice.bundle, shared)
    connect(rig, bobs, b"bob")
    connect(rig, link_for(alice, alice.bundle, shared), b"alice")  # 0 < 3 - 1: evicts
    # Now mallory 2, bob 1, alice 1: full, and nobody holds 2 more than another.
    for who, connection in ((mallory, b"m-9"), (bob, b"bob-2"), (alice, b"alice-2")):
        refused = rig.send("hello", link_for(who, alice.bundle, shared).hello(), connection)
        assert "too many transfers" in as_error(refused, ErrorCode.BUSY)
    as_chunk(rig.send("get", bobs.request(0), b"bob"))
    assert rig.service.active_transfers == 4


def test_dropping_a_connection_forgets_its_transfers(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link, CONN)
    connect(rig, link_for(bob, alice.bundle, shared), OTHER_CONN)
    rig.service.drop_connection(CONN)
    assert rig.service.active_transfers == 1
    as_error(rig.send("get", link.request(0), CONN), ErrorCode.NOT_FOUND)


def test_too_many_transfers_in_all_are_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "MAX_TRANSFERS", 2)
    connect(rig, link_for(bob, alice.bundle, shared), b"c1")
    first = link_for(bob, alice.bundle, shared)
    connect(rig, first, b"c2")
    as_error(rig.send("hello", link_for(bob, alice.bundle, shared).hello(), b"c3"), ErrorCode.BUSY)
    rig.send("finish", protocol.Finish(first.transfer_id), b"c2")
    connect(rig, link_for(bob, alice.bundle, shared), b"c3")


# --- a file that stops being shared, or readable, during a transfer -----------------------


def test_unshare_ends_a_transfer_under_way(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    as_chunk(rig.send("get", link.request(0)))
    del rig.shares[shared.file_id]  # `unshare`, in another process
    message = as_error(rig.send("get", link.request(1)), ErrorCode.NOT_FOUND)
    assert message == f"file {shared.file_id} is no longer shared here"
    assert rig.service.active_transfers == 0
    as_error(rig.send("get", link.request(1)), ErrorCode.NOT_FOUND)  # and stays over


def test_a_transfer_ends_when_the_access_list_leaves_its_requester_out(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    rig.shares[shared.file_id] = dataclasses.replace(shared.share, access=["mallory"])
    message = as_error(rig.send("get", link.request(0)), ErrorCode.FORBIDDEN)
    assert message == f"file {shared.file_id} is no longer shared with you"
    assert rig.service.active_transfers == 0


def test_a_transfer_reads_from_where_the_registry_says_now(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    paths: list[Path] = []

    def read(share: Share, offset: int, length: int) -> bytes:
        paths.append(share.path)
        return DATA[offset : offset + length]

    rig = Rig(alice, {}, [shared], read_chunk=read)
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    as_chunk(rig.send("get", link.request(0)))
    moved = dataclasses.replace(shared.share, path=Path("/elsewhere/data.bin"))
    rig.shares[shared.file_id] = moved  # a copy downloaded again, to another folder
    as_chunk(rig.send("get", link.request(1)))
    assert paths == [shared.share.path, moved.path]


@pytest.mark.parametrize(
    ("failure", "message", "changed"),
    [
        (
            transfer.NotRegularFile("a FIFO"),
            "the holder cannot read data.bin any more: it is not a regular file",
            False,
        ),
        (FileNotFoundError(2, "No such file"), "the holder cannot read data.bin any more", False),
        (None, "data.bin changed on the holder since it was shared", True),
    ],
    ids=["not a regular file", "gone", "changed"],
)
def test_a_failed_read_ends_the_transfer_and_is_reported_once(
    alice: Identity,
    bob: Identity,
    shared: Shared,
    failure: Exception | None,
    message: str,
    changed: bool,
) -> None:
    reported: list[tuple[str, bool]] = []

    def read(share: Share, offset: int, length: int) -> bytes:
        if failure is not None:
            raise failure
        return b"\0" * length

    rig = Rig(alice, {}, [shared], read_chunk=read)
    rig.service = HolderService(
        alice,
        rig.shares.get,
        lambda username, bundle: None,
        read,
        rig.clock,
        on_failed_read=lambda share, was_changed: reported.append((share.file_id, was_changed)),
    )
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    jobs = [
        rig.service.receive(CONN, None, protocol.encode("get", link.request(i))) for i in (0, 1)
    ]
    replies = []
    for job in jobs:
        assert isinstance(job, transfer.ChunkJob)
        replies.append(rig.service.complete(job, rig.service.read(job)))
    assert as_error(replies[0], ErrorCode.INTERNAL) == message
    # The transfer ended with the first; a request sent before that, whose reply may come
    # first on the other connection, and any later one, get the same reason.
    assert as_error(replies[1], ErrorCode.INTERNAL) == message
    again = rig.service.receive(CONN, None, protocol.encode("get", link.request(1)))
    assert isinstance(again, list) and as_error(again, ErrorCode.INTERNAL) == message
    elsewhere = rig.service.receive(b"other", None, protocol.encode("get", link.request(1)))
    assert isinstance(elsewhere, list)
    as_error(elsewhere, ErrorCode.NOT_FOUND)  # not its transfer: told nothing of it
    assert reported == [(shared.file_id, changed)]


def test_a_chunk_read_in_the_background_is_not_sent_once_its_transfer_ended(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    job = rig.service.receive(CONN, None, protocol.encode("get", link.request(0)))
    assert isinstance(job, transfer.ChunkJob)
    assert job.lane == shared.file_id
    outcome = rig.service.read(job)  # elsewhere, while the loop goes on:
    assert rig.send("finish", protocol.Finish(link.transfer_id)) == []
    as_error(rig.service.complete(job, outcome), ErrorCode.NOT_FOUND)


def test_a_chunk_read_in_the_background_opens_like_any_other(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    job = rig.service.receive(CONN, None, protocol.encode("get", link.request(3)))
    assert isinstance(job, transfer.ChunkJob)
    header, payload = as_chunk(rig.service.complete(job, rig.service.read(job)))
    assert link.open_chunk(header, payload) == DATA[3 * CHUNK :]


# --- expiry and finish --------------------------------------------------------------------


def test_idle_transfers_expire(rig: Rig, shared: Shared, bob: Identity, alice: Identity) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    rig.clock.now += transfer.TRANSFER_IDLE_TIMEOUT - 1
    as_chunk(rig.send("get", link.request(0)))  # activity keeps it alive...
    rig.clock.now += transfer.TRANSFER_IDLE_TIMEOUT - 1
    as_chunk(rig.send("get", link.request(1)))
    assert rig.service.active_transfers == 1
    rig.clock.now += transfer.TRANSFER_IDLE_TIMEOUT + 1  # ...idleness ends it
    rig.service.expire_idle()
    assert rig.service.active_transfers == 0
    as_error(rig.send("get", link.request(2)), ErrorCode.NOT_FOUND)


def test_idle_transfers_expire_on_the_next_frame(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    rig.clock.now += transfer.TRANSFER_IDLE_TIMEOUT + 1
    as_error(rig.send("get", link.request(0)), ErrorCode.NOT_FOUND)
    assert rig.service.active_transfers == 0


def test_expiry_spares_active_transfers(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    idle, busy = link_for(bob, alice.bundle, shared), link_for(bob, alice.bundle, shared)
    connect(rig, idle)
    rig.clock.now += transfer.TRANSFER_IDLE_TIMEOUT / 2 + 1
    connect(rig, busy)
    rig.clock.now += transfer.TRANSFER_IDLE_TIMEOUT / 2
    rig.service.expire_idle()
    assert rig.service.active_transfers == 1
    as_error(rig.send("get", idle.request(0)), ErrorCode.NOT_FOUND)
    as_chunk(rig.send("get", busy.request(0)))


def test_finish_frees_the_transfer(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    assert rig.send("finish", protocol.Finish(link.transfer_id)) == []
    assert rig.service.active_transfers == 0
    as_error(rig.send("get", link.request(0)), ErrorCode.NOT_FOUND)


def test_finish_from_another_connection_is_ignored(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link, CONN)
    assert rig.send("finish", protocol.Finish(link.transfer_id), OTHER_CONN) == []
    assert rig.service.active_transfers == 1
    as_chunk(rig.send("get", link.request(0), CONN))


def test_finish_of_an_unknown_transfer_is_silent(rig: Rig) -> None:
    assert rig.send("finish", protocol.Finish(b"\x00" * 16)) == []


# --- the receiver refuses offers ------------------------------------------------------------


def test_offer_with_a_bad_signature_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    offer = as_offer(rig.send("hello", link.hello()))
    with pytest.raises(IntegrityError, match="signature"):
        link.accept_offer(dataclasses.replace(offer, signature=flip(offer.signature, 5)))
    with pytest.raises(IntegrityError, match="signature"):
        link.accept_offer(dataclasses.replace(offer, transfer_id=flip(offer.transfer_id)))
    assert link.transfer_id == b""
    link.accept_offer(offer)  # the genuine one still works
    assert link.transfer_id == offer.transfer_id


def test_offer_signed_by_another_key_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, mallory: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    offer = as_offer(rig.send("hello", link.hello()))
    with pytest.raises(IntegrityError, match="signature"):
        link.accept_offer(resign(offer, mallory))


def test_offer_replayed_from_an_earlier_hello_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    earlier = link_for(bob, alice.bundle, shared)
    old_offer = as_offer(rig.send("hello", earlier.hello()))
    link = link_for(bob, alice.bundle, shared)
    offer = as_offer(rig.send("hello", link.hello()))
    assert old_offer.requester_nonce != offer.requester_nonce
    with pytest.raises(IntegrityError, match="replayed"):
        link.accept_offer(old_offer)
    link.accept_offer(offer)


@pytest.mark.parametrize(
    "field", ["file_id", "manifest_digest", "requester_fp", "requester_nonce", "holder_fp"]
)
def test_offer_bound_to_something_else_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, field: str
) -> None:
    """Correctly signed by the holder, but for another file, manifest, requester, hello or
    holder: each binding is checked on its own."""
    link = link_for(bob, alice.bundle, shared)
    offer = as_offer(rig.send("hello", link.hello()))
    other = "f" * 32 if field == "file_id" else flip(getattr(offer, field))
    with pytest.raises(IntegrityError, match="not for this request"):
        link.accept_offer(resign(offer, alice, **{field: other}))
    link.accept_offer(resign(offer, alice))  # re-signing alone changes nothing


def test_offer_for_another_shared_file_is_refused(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    """The holder answers a hello for file B; that offer cannot serve file A's link."""
    other = share_of(alice, DATA[:100], name="other.bin")
    rig = Rig(alice, {"data.bin": DATA, "other.bin": DATA[:100]}, [shared, other])
    link_a = link_for(bob, alice.bundle, shared)
    link_b = link_for(bob, alice.bundle, other)
    offer_b = as_offer(rig.send("hello", link_b.hello()))
    with pytest.raises(IntegrityError):
        link_a.accept_offer(offer_b)


def test_offer_for_the_same_file_id_but_another_manifest_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    """A receiver that holds another manifest than the holder serves (a broker swapping
    manifests) refuses the holder's offer."""
    swapped = make_manifest(alice, DATA)
    link = ReceiverLink(
        bob, shared.file_id, swapped.header, swapped.header_bytes, "alice", alice.bundle
    )
    offer = as_offer(rig.send("hello", link.hello()))
    with pytest.raises(IntegrityError, match="not for this request"):
        link.accept_offer(offer)


def test_offer_whose_key_is_wrapped_for_someone_else_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, mallory: Identity
) -> None:
    link = link_for(bob, alice.bundle, shared)
    offer = as_offer(rig.send("hello", link.hello()))
    wrapped = crypto.wrap(mallory.bundle.rsa_key(), crypto.TransferSecret.generate().to_bytes())
    with pytest.raises(IntegrityError, match="unwrapped"):
        link.accept_offer(resign(offer, alice, wrapped_secret=wrapped))


# --- the receiver refuses chunks ------------------------------------------------------------


@pytest.fixture
def linked(rig: Rig, shared: Shared, bob: Identity, alice: Identity) -> ReceiverLink:
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    return link


def test_chunk_opens_when_untouched(rig: Rig, linked: ReceiverLink) -> None:
    header, ciphertext = as_chunk(rig.send("get", linked.request(1)))
    assert header == protocol.ChunkHeader(linked.transfer_id, 1)
    assert linked.open_chunk(header, ciphertext) == DATA[CHUNK : 2 * CHUNK]


@pytest.mark.parametrize("position", [0, CHUNK // 2, -1])
def test_chunk_with_a_flipped_bit_is_refused(rig: Rig, linked: ReceiverLink, position: int) -> None:
    header, ciphertext = as_chunk(rig.send("get", linked.request(1)))
    with pytest.raises(IntegrityError, match="authentication"):
        linked.open_chunk(header, flip(ciphertext, position))


def test_truncated_chunk_is_refused(rig: Rig, linked: ReceiverLink) -> None:
    header, ciphertext = as_chunk(rig.send("get", linked.request(1)))
    for cut in (ciphertext[:-1], ciphertext[:10], b""):
        with pytest.raises(IntegrityError):
            linked.open_chunk(header, cut)


def test_chunk_sealed_for_another_index_is_refused(rig: Rig, linked: ReceiverLink) -> None:
    _, ciphertext = as_chunk(rig.send("get", linked.request(1)))
    with pytest.raises(IntegrityError):
        linked.open_chunk(protocol.ChunkHeader(linked.transfer_id, 2), ciphertext)
    with pytest.raises(IntegrityError):
        linked.open_chunk(protocol.ChunkHeader(linked.transfer_id, 0), ciphertext)


def test_chunk_of_another_transfer_is_refused(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, linked: ReceiverLink
) -> None:
    other = link_for(bob, alice.bundle, shared)
    connect(rig, other)
    header, ciphertext = as_chunk(rig.send("get", other.request(0)))
    # as labelled by the holder
    with pytest.raises(IntegrityError, match="another transfer"):
        linked.open_chunk(header, ciphertext)
    # relabelled with this transfer's id: the key differs, so the tag fails
    with pytest.raises(IntegrityError, match="authentication"):
        linked.open_chunk(protocol.ChunkHeader(linked.transfer_id, 0), ciphertext)


def test_chunk_before_any_offer_is_a_protocol_error(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity, linked: ReceiverLink
) -> None:
    header, ciphertext = as_chunk(rig.send("get", linked.request(0)))
    fresh = link_for(bob, alice.bundle, shared)
    with pytest.raises(ProtocolError):
        fresh.open_chunk(header, ciphertext)


def test_holder_refuses_to_send_content_that_changed_since_sharing(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    """The holder's file changed but kept its size: sending it would leak new content."""
    changed = DATA[:CHUNK] + flip(DATA[CHUNK:], 77)
    rig = Rig(alice, {"data.bin": changed}, [shared])
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    as_chunk(rig.send("get", link.request(0)))
    message = as_error(rig.send("get", link.request(1)), ErrorCode.INTERNAL)
    assert "changed on the holder since it was shared" in message
    assert rig.service.active_transfers == 0


def test_receiver_refuses_authentic_chunks_that_do_not_match_the_manifest(
    alice: Identity, bob: Identity, shared: Shared
) -> None:
    """A modified holder seals other content under a valid key: the tag verifies, the
    owner's signed chunk hash does not."""
    rig = Rig(alice, {"data.bin": DATA}, [shared])
    link = link_for(bob, alice.bundle, shared)
    connect(rig, link)
    plan = ChunkPlan(shared.manifest, window=4)
    assert plan.next_requests() == [0, 1, 2, 3]
    header, ciphertext = as_chunk(rig.send("get", link.request(0)))
    plaintext = link.open_chunk(header, ciphertext)
    with pytest.raises(IntegrityError, match="manifest"):
        plan.accept(header.index, flip(plaintext, 5))
    assert plan.have == set()
    plan.accept(header.index, plaintext)
    assert plan.have == {0}


# --- ChunkPlan ------------------------------------------------------------------------------


def zero_manifest(chunks: int, last: int = CHUNK) -> TreeIndex:
    """A tree whose chunks are all zero bytes (the last one `last` long)."""
    return file_tree(bytes((chunks - 1) * CHUNK + last), CHUNK, name="zeros").index


def chunk_of(manifest: TreeIndex, index: int) -> bytes:
    return bytes(manifest.chunk_length(index))


def test_plan_keeps_at_most_window_in_flight() -> None:
    manifest = zero_manifest(10)
    plan = ChunkPlan(manifest, window=3)
    assert plan.next_requests() == [0, 1, 2]
    assert plan.next_requests() == []  # the window is full
    plan.accept(1, chunk_of(manifest, 1))
    assert plan.next_requests() == [3]
    assert plan.in_flight == {0, 2, 3}
    plan.accept(0, chunk_of(manifest, 0))
    plan.accept(3, chunk_of(manifest, 3))
    assert plan.next_requests() == [4, 5]
    assert len(plan.in_flight) == 3


def test_plan_never_rerequests_chunks_it_has() -> None:
    manifest = zero_manifest(6)
    plan = ChunkPlan(manifest, window=2, have={0, 2, 3})
    assert plan.next_requests() == [1, 4]
    plan.accept(4, chunk_of(manifest, 4))
    assert plan.next_requests() == [5]
    plan.accept(1, chunk_of(manifest, 1))
    plan.accept(5, chunk_of(manifest, 5))
    assert plan.complete
    assert plan.next_requests() == []


def test_plan_refuses_a_chunk_never_requested() -> None:
    manifest = zero_manifest(5)
    plan = ChunkPlan(manifest, window=2)
    assert plan.next_requests() == [0, 1]
    with pytest.raises(IntegrityError, match="without being requested"):
        plan.accept(3, chunk_of(manifest, 3))
    plan.accept(0, chunk_of(manifest, 0))
    with pytest.raises(IntegrityError, match="without being requested"):
        plan.accept(0, chunk_of(manifest, 0))  # a duplicate is not requested either
    assert plan.have == {0}


def test_plan_refuses_a_chunk_of_the_wrong_length() -> None:
    manifest = zero_manifest(2, last=100)
    plan = ChunkPlan(manifest, window=2)
    plan.next_requests()
    with pytest.raises(IntegrityError):
        plan.accept(1, bytes(CHUNK))  # a full chunk where a 100-byte one belongs
    with pytest.raises(IntegrityError):
        plan.accept(1, bytes(99))
    with pytest.raises(IntegrityError):
        plan.accept(0, b"\x01" + bytes(CHUNK - 1))
    assert plan.in_flight == {0, 1}
    plan.accept(1, bytes(100))
    assert plan.bytes_done == 100
    assert not plan.complete


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.integers(1, 12),
    window=st.integers(1, 6),
    seed=st.integers(0, 2**32),
)
def test_plan_completes_in_any_arrival_order(chunks: int, window: int, seed: int) -> None:
    manifest = zero_manifest(chunks, last=1 + seed % CHUNK)
    plan = ChunkPlan(manifest, window)
    chooser = random.Random(seed)
    requested: list[int] = []
    while not plan.complete:
        requested += plan.next_requests()
        assert 0 < len(plan.in_flight) <= window
        index = chooser.choice(sorted(plan.in_flight))
        plan.accept(index, chunk_of(manifest, index))
    assert sorted(requested) == list(range(chunks))
    assert plan.bytes_done == manifest.size
    assert plan.next_requests() == []


def test_claim_gives_at_most_count_and_skips_what_is_had() -> None:
    plan = ChunkPlan(zero_manifest(8), window=2, have={1, 4})
    assert plan.claim(0) == []
    assert plan.claim(-1) == []
    assert plan.claim(3) == [0, 2, 3]
    assert plan.claim(1) == [5]
    assert plan.claim(10) == [6, 7]  # beyond the window: each holder keeps its own
    assert plan.claim(10) == []
    assert plan.in_flight == {0, 2, 3, 5, 6, 7}
    assert plan.next_requests() == []  # the plan's own window is more than full


def test_adopted_chunks_count_as_resumed_and_are_never_claimed() -> None:
    manifest = zero_manifest(5, last=100)
    plan = ChunkPlan(manifest, window=8)
    plan.adopt(1)
    plan.adopt(4)
    plan.adopt(4)  # twice counts once
    assert plan.have == {1, 4}
    assert (plan.resumed, plan.bytes_resumed, plan.bytes_done) == (2, CHUNK + 100, CHUNK + 100)
    assert plan.next_requests() == [0, 2, 3]
    for index in (0, 2, 3):
        plan.accept(index, chunk_of(manifest, index))
    assert plan.complete
    assert plan.claim(5) == []
    assert (plan.resumed, plan.bytes_resumed, plan.bytes_done) == (2, CHUNK + 100, manifest.size)
    with pytest.raises(IntegrityError, match="without being requested"):
        plan.accept(1, chunk_of(manifest, 1))  # found on disk, so never asked for


def test_a_plan_with_every_chunk_adopted_asks_for_nothing() -> None:
    manifest = zero_manifest(3, last=7)
    plan = ChunkPlan(manifest, window=2)
    for index in range(3):
        plan.adopt(index)
    assert plan.complete
    assert plan.next_requests() == []
    assert plan.bytes_done == plan.bytes_resumed == manifest.size


def test_released_chunks_are_claimed_again_lowest_first_before_new_ones() -> None:
    plan = ChunkPlan(zero_manifest(10), window=4)
    assert plan.claim(3) == [0, 1, 2]  # one holder
    assert plan.claim(3) == [3, 4, 5]  # another
    plan.release({5, 3})  # the second fails with 3 and 5 outstanding (4 came)
    assert plan.in_flight == {0, 1, 2, 4}
    plan.release({1})  # the first fails later on
    assert plan.in_flight == {0, 2, 4}
    assert plan.claim(2) == [1, 3]
    assert plan.claim(3) == [5, 6, 7]
    assert plan.in_flight == {0, 1, 2, 3, 4, 5, 6, 7}


def test_release_of_chunks_not_in_flight_changes_nothing() -> None:
    manifest = zero_manifest(6)
    plan = ChunkPlan(manifest, window=2)
    assert plan.claim(2) == [0, 1]
    plan.accept(0, chunk_of(manifest, 0))
    plan.release({0, 1, 4})  # 0 was delivered, 4 never claimed
    plan.release({1})  # released already
    assert plan.in_flight == set()
    assert plan.claim(10) == [1, 2, 3, 4, 5]  # each once, and 0 not again
    assert plan.have == {0}


def test_a_chunk_from_a_holder_that_released_it_is_refused() -> None:
    manifest = zero_manifest(2)
    plan = ChunkPlan(manifest, window=2)
    assert plan.claim(1) == [0]
    plan.release({0})
    with pytest.raises(IntegrityError, match="without being requested"):
        plan.accept(0, chunk_of(manifest, 0))
    assert plan.claim(1) == [0]  # whoever claims it again may deliver it
    plan.accept(0, chunk_of(manifest, 0))
    assert plan.have == {0}


def test_two_holders_claiming_in_turn_never_share_a_chunk() -> None:
    manifest = zero_manifest(7)
    plan = ChunkPlan(manifest, window=2)
    first, second = plan.claim(2), plan.claim(2)
    assert (first, second) == ([0, 1], [2, 3])
    plan.accept(0, chunk_of(manifest, 0))
    first = [1, *plan.claim(1)]
    assert first == [1, 4]
    second += plan.claim(1)
    assert second == [2, 3, 5]
    plan.release(set(second))  # the second holder fails
    assert plan.claim(3) == [2, 3, 5]  # the first takes its chunks over...
    assert plan.claim(3) == [6]  # ...then the rest
    assert plan.in_flight == {1, 2, 3, 4, 5, 6}


_HOLDERS = 3
_steps = st.lists(
    st.tuples(
        st.integers(0, _HOLDERS - 1),
        st.sampled_from(["claim", "accept", "fail"]),
        st.integers(0, 4),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.integers(1, 12), adopted=st.sets(st.integers(0, 11)), steps=_steps)
def test_holders_sharing_a_plan_deliver_every_chunk_exactly_once(
    chunks: int, adopted: set[int], steps: list[tuple[int, str, int]]
) -> None:
    """Three holders claim, deliver and fail in any interleaving (as the download's
    threads do, one at a time under its lock); then they finish the download. No chunk is
    ever held by two, none is lost, none is fetched twice, none found on disk is fetched."""
    manifest = zero_manifest(chunks, last=1 + chunks)
    plan = ChunkPlan(manifest, window=4)
    resumed = {index for index in adopted if index < chunks}
    for index in sorted(resumed):
        plan.adopt(index)
    mine: list[set[int]] = [set() for _ in range(_HOLDERS)]
    delivered: list[int] = []

    def step(holder: int, action: str, number: int) -> None:
        held = mine[holder]
        if action == "claim":
            claimed = plan.claim(number)
            assert len(claimed) <= number
            assert len(set(claimed)) == len(claimed)
            assert not set(claimed) & set().union(*mine)  # nobody else holds them
            held.update(claimed)
        elif action == "accept" and held:
            index = sorted(held)[number % len(held)]
            plan.accept(index, chunk_of(manifest, index))
            held.discard(index)
            delivered.append(index)
        elif action == "fail":
            plan.release(held)
            held.clear()
        assert sum(len(claims) for claims in mine) == len(plan.in_flight)  # disjoint...
        assert set().union(*mine) == plan.in_flight  # ...and all accounted for
        assert not plan.in_flight & plan.have

    for holder, action, number in steps:
        step(holder, action, number)
    for _ in range(chunks + 1):  # each round delivers at least one chunk per holder
        if plan.complete:
            break
        for holder in range(_HOLDERS):
            step(holder, "claim", 2)
            step(holder, "accept", 0)
    assert plan.complete
    assert plan.in_flight == set()
    assert sorted(delivered) == sorted(set(range(chunks)) - resumed)  # each exactly once
    assert plan.bytes_done == manifest.size
    assert plan.bytes_done - plan.bytes_resumed == sum(
        manifest.chunk_length(index) for index in delivered
    )
    assert plan.resumed == len(resumed)


# --- malformed frames never break the holder ------------------------------------------------


def envelope(op: Any = "get", body: Any = None, v: Any = protocol.VERSION, rid: Any = 0) -> bytes:
    return pack({"v": v, "op": op, "rid": rid, "body": {} if body is None else body})


TID = b"\x11" * 16


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # truncated array
        pack([1, 2, 3]),
        pack({"v": protocol.VERSION, "op": "get", "rid": 0}),  # no body
        pack({"v": protocol.VERSION, "op": "get", "rid": 0, "body": {}, "extra": 1}),
        envelope(v=True, body={"transfer_id": TID, "index": 0}),
        envelope(v=0, body={"transfer_id": TID, "index": 0}),
        envelope(v=2**16, body={"transfer_id": TID, "index": 0}),
        envelope(rid=-1, body={"transfer_id": TID, "index": 0}),
        envelope(op=7),
        envelope(op="offer"),  # a reply, not a request
        envelope(op="chunk", body={"transfer_id": TID, "index": 0}),
        envelope(op="register"),  # a broker request
        envelope(op="nonsense"),
        envelope(body=[1, 2]),
        envelope(body={"transfer_id": TID, "index": "0"}),
        envelope(body={"transfer_id": TID, "index": -1}),
        envelope(body={"transfer_id": TID, "index": 1.0}),
        envelope(body={"transfer_id": TID, "index": True}),
        envelope(body={"transfer_id": TID, "index": 2**32 + 1}),
        envelope(body={"transfer_id": TID[:15], "index": 0}),
        envelope(body={"transfer_id": "x" * 16, "index": 0}),
        envelope(body={"transfer_id": TID}),
        envelope(body={"transfer_id": TID, "index": 0, "more": 1}),
        envelope(op="finish", body={"transfer_id": None}),
        envelope(op="hello", body={"file_id": "0" * 32}),
        envelope(
            op="hello",
            body={
                "file_id": "../../etc/passwd",
                "requester": "bob",
                "bundle": {"rsa_public": b"x", "curve_public": b"\x00" * 32},
                "nonce": b"\x00" * 32,
                "holder_fp": b"\x00" * 32,
                "signature": b"",
            },
        ),
        envelope(
            op="hello",
            body={
                "file_id": "0" * 32,
                "requester": "bob",
                "bundle": "not a bundle",
                "nonce": b"\x00" * 32,
                "holder_fp": b"\x00" * 32,
                "signature": b"",
            },
        ),
    ],
)
def test_malformed_frames_get_one_bad_request_reply(rig: Rig, frame: bytes) -> None:
    as_error(rig.service.handle(CONN, None, frame), ErrorCode.BAD_REQUEST)


def test_another_protocol_version_is_told_to_upgrade_in_its_own_envelope(rig: Rig) -> None:
    """The error envelope reads the same in every version: a requester of version 1
    learns that this holder speaks 2, rather than failing to decode the reply."""
    (reply,) = rig.service.handle(CONN, None, envelope(v=1, body={"transfer_id": TID, "index": 0}))
    raw = unpack(reply)
    assert (raw["v"], raw["op"]) == (1, "error")
    assert raw["body"] == {
        "code": "upgrade",
        "message": "upgrade sfs: this peer speaks version 2, you speak 1",
    }


def test_hello_with_wrong_types_inside_a_valid_hello(
    rig: Rig, shared: Shared, bob: Identity, alice: Identity
) -> None:
    body = to_wire(link_for(bob, alice.bundle, shared).hello())
    for key, bad in [("nonce", 5), ("holder_fp", "x" * 32), ("requester", "Bob!"), ("bundle", {})]:
        frame = pack({"v": protocol.VERSION, "op": "hello", "rid": 0, "body": {**body, key: bad}})
        as_error(rig.service.handle(CONN, None, frame), ErrorCode.BAD_REQUEST)
    assert rig.service.active_transfers == 0


def decodes_to_finish(frame: bytes) -> bool:
    try:
        request = protocol.decode_body(protocol.decode_envelope(frame), protocol.PEER_REQUESTS)
    except ProtocolError:
        return False
    return isinstance(request, protocol.Finish)


def check_never_raises(service: HolderService, frame: bytes) -> None:
    frames = service.handle(CONN, None, frame)
    if frames == [] and decodes_to_finish(frame):
        return
    assert len(frames) == 1
    reply = protocol.decode_envelope(frames[0])
    assert reply.op == "error"
    error = from_wire(protocol.ErrorBody, reply.body, "error")
    allowed = {ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN, ErrorCode.UPGRADE}
    assert error.code in allowed


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["transfer_id", "index", "file_id", "requester", "bundle", "nonce", "holder_fp", "signature"]
)
_bodies = st.dictionaries(_field_names | st.text(max_size=12), _values, max_size=7)


@pytest.fixture(scope="module")
def fuzz_service(alice: Identity) -> HolderService:
    shared = share_of(alice, DATA)
    return Rig(alice, {"data.bin": DATA}, [shared]).service


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=200))
def test_random_bytes_never_break_the_holder(fuzz_service: HolderService, frame: bytes) -> None:
    check_never_raises(fuzz_service, frame)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["hello", "get", "finish", "offer", "error"]) | st.text(max_size=10),
    body=_bodies,
    version=st.sampled_from([1, 1, 1, 0, 2, "1"]),
    rid=st.sampled_from([0, 7, -1, 2**63]),
)
def test_random_envelopes_never_break_the_holder(
    fuzz_service: HolderService, op: str, body: dict[str, Any], version: Any, rid: int
) -> None:
    check_never_raises(fuzz_service, pack({"v": version, "op": op, "rid": rid, "body": body}))


@pytest.mark.parametrize("known", [True, False], ids=["shared-file", "unknown-file"])
def test_a_stranger_learns_nothing_about_what_is_shared(
    alice: Identity, bob: Identity, shared: Shared, known: bool
) -> None:
    def stranger(username: str, bundle: KeyBundle) -> None:
        raise Refused(ErrorCode.FORBIDDEN, f"{username} is not registered")

    rig = Rig(alice, {"data.bin": DATA}, [shared], check_requester=stranger)
    link = link_for(bob, alice.bundle, shared, None if known else "f" * 32)
    # The same answer whether or not the file exists: the identity check comes first.
    assert as_error(rig.send("hello", link.hello()), ErrorCode.FORBIDDEN) == "bob is not registered"
