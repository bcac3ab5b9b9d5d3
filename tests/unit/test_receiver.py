"""sfs.peer.receiver: one holder's conversation, driven by hand against a real
`HolderService`, with the time passed in: no sockets, no threads, no waiting."""

from __future__ import annotations

import random

import pytest

from sfs.common import protocol
from sfs.common.errors import IntegrityError, ProtocolError, RemoteError, TransportError
from sfs.common.protocol import ErrorCode, Refused
from sfs.common.tree import decode_header
from sfs.common.tree_index import index_of, unpack_pages
from sfs.peer.keys import Identity
from sfs.peer.receiver import Chunk, Offered, ReceiverSession, Sealed, SetAside, Stage
from sfs.peer.registry import Share
from sfs.peer.transfer import ChunkPlan, HolderService, ReceiverLink
from tests.unit.memory_holders import CHUNK, share_of

DATA = random.Random(7).randbytes(5 * CHUNK + 99)  # chunks 0-5
CONN = b"conn"
TIMEOUT = 5.0
HELLO_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def share(alice: Identity) -> Share:
    return share_of(alice, DATA)


class Holder:
    """alice's `HolderService`; `busy` hellos are answered `busy` first."""

    def __init__(self, alice: Identity, share: Share, busy: int = 0) -> None:
        self.busy = busy

        def check(requester: str, bundle: object) -> None:
            if self.busy:
                self.busy -= 1
                raise Refused(ErrorCode.BUSY, "checking your key; retry")

        self.service = HolderService(
            alice,
            lambda file_id: share if file_id == share.file_id else None,
            check,
            lambda _share, offset, length: DATA[offset : offset + length],
        )

    def answer(self, frames: list[bytes]) -> list[bytes]:
        (frame,) = frames
        return self.service.handle(CONN, None, frame)


def session_for(bob: Identity, alice: Identity, share: Share, window: int = 2) -> ReceiverSession:
    link = ReceiverLink(
        bob, share.file_id, decode_header(share.manifest), share.manifest, "alice", alice.bundle
    )
    return ReceiverSession(link, window, TIMEOUT, HELLO_TIMEOUT, now=100.0)


def offered(session: ReceiverSession, holder: Holder, now: float = 100.0) -> None:
    (hello,) = [session.connected("memory://alice", now)]
    assert session.receive(holder.answer(hello), now) == Offered()
    assert session.stage is Stage.RECEIVING


def test_a_whole_file_through_a_session(alice: Identity, bob: Identity, share: Share) -> None:
    holder = Holder(alice, share)
    session = session_for(bob, alice, share, window=2)
    assert session.room == 0  # nothing may be asked before the offer
    offered(session, holder)
    plan = ChunkPlan(index_of(share.manifest, unpack_pages(share.pages)), 2)
    received: dict[int, bytes] = {}
    while not plan.complete:
        requests = session.ask(plan.claim(session.room), 100.0)
        assert 0 < len(session.mine) <= 2
        replies = [holder.answer(frames) for frames in requests]
        for reply in reversed(replies):  # out of order: each chunk names its index
            chunk = session.receive(reply, 100.0)
            assert isinstance(chunk, Chunk)
            plan.accept(chunk.index, chunk.plaintext)
            session.stored(chunk.index)
            received[chunk.index] = chunk.plaintext
    assert b"".join(received[i] for i in sorted(received)) == DATA
    assert session.mine == frozenset()
    assert holder.service.active_transfers == 1
    finish = session.finish()
    assert finish is not None and holder.answer(finish) == []
    assert holder.service.active_transfers == 0


def test_no_finish_before_an_offer(alice: Identity, bob: Identity, share: Share) -> None:
    assert session_for(bob, alice, share).finish() is None


def test_busy_means_hello_again_after_a_growing_pause(
    alice: Identity, bob: Identity, share: Share
) -> None:
    holder = Holder(alice, share, busy=2)
    session = session_for(bob, alice, share)
    hello = session.connected("memory://alice", 100.0)
    assert session.receive(holder.answer(hello), 100.0) is None
    assert session.stage is Stage.BACKOFF
    assert session.due(100.04) == []  # the first pause is 0.05 s
    assert session.wait(100.04) == pytest.approx(0.01)
    session.expire(100.04, others_delivering=False)  # no deadline while waiting to retry
    (again,) = session.due(100.05)
    assert again == hello  # the same signed hello: the holder binds its offer to it
    assert session.receive(holder.answer(again), 100.1) is None
    assert session.due(100.19) == []  # then 0.1 s
    (third,) = session.due(100.2)
    assert session.receive(holder.answer(third), 100.2) == Offered()


def test_busy_past_the_timeout_gives_up(alice: Identity, bob: Identity, share: Share) -> None:
    holder = Holder(alice, share, busy=1)
    session = session_for(bob, alice, share)
    hello = session.connected("memory://alice", 100.0)
    late = 100.0 + TIMEOUT - 0.01  # the pause would end past the first hello's timeout
    with pytest.raises(RemoteError, match=r"^alice: checking your key; retry$") as refused:
        session.receive(holder.answer(hello), late)
    assert refused.value.code == ErrorCode.BUSY


def test_a_hello_never_answered_times_out(alice: Identity, bob: Identity, share: Share) -> None:
    session = session_for(bob, alice, share)
    session.connected("memory://alice", 100.0)
    session.expire(100.0 + TIMEOUT, others_delivering=False)  # at the deadline: still waiting
    with pytest.raises(
        TransportError, match=r"^alice at memory://alice did not answer the request within 5 s$"
    ):
        session.expire(100.0 + TIMEOUT + 0.01, others_delivering=False)


def test_a_chunk_never_sent_times_out(alice: Identity, bob: Identity, share: Share) -> None:
    holder = Holder(alice, share)
    session = session_for(bob, alice, share)
    offered(session, holder)
    session.expire(1000.0, others_delivering=False)  # nothing asked: nothing awaited
    session.ask([0], 1000.0)
    session.expire(1000.0 + TIMEOUT, others_delivering=True)
    with pytest.raises(
        TransportError, match=r"^alice at memory://alice did not send the next chunk within 5 s$"
    ):
        session.expire(1000.0 + TIMEOUT + 0.01, others_delivering=True)


def test_each_chunk_restarts_the_wait(alice: Identity, bob: Identity, share: Share) -> None:
    holder = Holder(alice, share)
    session = session_for(bob, alice, share)
    offered(session, holder)
    first, second = (holder.answer(f) for f in session.ask([0, 1], 100.0))
    session.receive(first, 104.0)
    session.stored(0)
    session.expire(108.0, others_delivering=False)  # 4 s after chunk 0, not 8 after asking
    assert isinstance(session.receive(second, 108.0), Chunk)


@pytest.mark.parametrize("stage", ["connecting", "hello", "backoff"])
def test_set_aside_only_while_others_deliver(
    alice: Identity, bob: Identity, share: Share, stage: str
) -> None:
    session = session_for(bob, alice, share)
    if stage != "connecting":
        hello = session.connected("memory://alice", 100.0)
        if stage == "backoff":
            assert session.receive(Holder(alice, share, busy=1).answer(hello), 100.0) is None
    late = 100.0 + HELLO_TIMEOUT + 0.01
    session.expire(100.0 + HELLO_TIMEOUT, others_delivering=True)
    session.expire(late, others_delivering=False)
    with pytest.raises(SetAside):
        session.expire(late, others_delivering=True)


def test_never_set_aside_once_offered(alice: Identity, bob: Identity, share: Share) -> None:
    session = session_for(bob, alice, share)
    offered(session, Holder(alice, share))
    session.expire(100.0 + 10 * HELLO_TIMEOUT, others_delivering=True)


def test_a_chunk_not_asked_for_is_refused(alice: Identity, bob: Identity, share: Share) -> None:
    holder = Holder(alice, share)
    session = session_for(bob, alice, share)
    offered(session, holder)
    (request,) = session.ask([1], 100.0)
    reply = holder.answer(request)
    session.receive(reply, 100.0)
    session.stored(1)
    with pytest.raises(IntegrityError, match=r"^chunk 1 from alice arrived without being"):
        session.receive(reply, 100.0)  # the same chunk again


def test_a_tampered_chunk_names_the_holder(alice: Identity, bob: Identity, share: Share) -> None:
    holder = Holder(alice, share)
    session = session_for(bob, alice, share)
    offered(session, holder)
    (request,) = session.ask([2], 100.0)
    header, ciphertext = holder.answer(request)
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(IntegrityError, match=r"^chunk 2 from alice failed authentication"):
        session.receive([header, tampered], 100.0)
    assert session.mine == {2}  # still the holder's to release for others


def test_a_refusal_instead_of_an_offer(alice: Identity, bob: Identity, share: Share) -> None:
    session = session_for(bob, alice, share)
    session.connected("memory://alice", 100.0)
    refusal = protocol.encode_error(ErrorCode.FORBIDDEN, "not shared with you")
    with pytest.raises(RemoteError, match=r"^alice: not shared with you$"):
        session.receive([refusal], 100.0)


def test_a_chunk_instead_of_an_offer(alice: Identity, bob: Identity, share: Share) -> None:
    session = session_for(bob, alice, share)
    session.connected("memory://alice", 100.0)
    chunk = protocol.encode("chunk", protocol.ChunkHeader(bytes(16), 0))
    with pytest.raises(ProtocolError, match=r"^alice sent 'chunk', not an offer$"):
        session.receive([chunk, b"ciphertext"], 100.0)


def test_an_empty_message_is_malformed(alice: Identity, bob: Identity, share: Share) -> None:
    session = session_for(bob, alice, share)
    session.connected("memory://alice", 100.0)
    with pytest.raises(ProtocolError, match=r"^alice sent a frame of unexpected shape$"):
        session.receive([], 100.0)


def test_asking_beyond_the_window_is_a_bug(alice: Identity, bob: Identity, share: Share) -> None:
    session = session_for(bob, alice, share, window=2)
    with pytest.raises(ValueError):
        session.ask([0], 100.0)  # before the offer
    offered(session, Holder(alice, share))
    with pytest.raises(ValueError):
        session.ask([0, 1, 2], 100.0)


def test_a_chunk_arriving_again_while_it_is_stored_is_refused(
    alice: Identity, bob: Identity, share: Share
) -> None:
    """`take` leaves the chunk sealed for a worker: until `stored`, it is still asked of
    this holder, yet a second copy (replayed on the wire) is not accepted."""
    holder = Holder(alice, share)
    session = session_for(bob, alice, share)
    offered(session, holder)
    (request,) = session.ask([0], 100.0)
    reply = holder.answer(request)
    sealed = session.take(reply, 100.0)
    assert isinstance(sealed, Sealed) and sealed.open() == DATA[:CHUNK]
    with pytest.raises(IntegrityError, match="chunk 0 from alice arrived without being requested"):
        session.take(reply, 100.0)


def test_no_timeout_while_every_chunk_asked_is_being_stored(
    alice: Identity, bob: Identity, share: Share
) -> None:
    holder = Holder(alice, share)
    session = session_for(bob, alice, share)
    offered(session, holder)
    (request,) = session.ask([0], 100.0)
    session.take(holder.answer(request), 100.0)
    session.expire(100.0 + 10 * TIMEOUT, others_delivering=False)  # a slow disk: no failure
    assert session.mine == {0}


def test_chunks_being_stored_free_their_place_up_to_the_storing_allowance(
    alice: Identity, bob: Identity, share: Share
) -> None:
    holder = Holder(alice, share)
    link = ReceiverLink(
        bob, share.file_id, decode_header(share.manifest), share.manifest, "alice", alice.bundle
    )
    session = ReceiverSession(link, 2, TIMEOUT, HELLO_TIMEOUT, now=100.0, storing=1)
    offered(session, holder)
    first, second = (holder.answer(f) for f in session.ask([0, 1], 100.0))
    assert session.room == 0
    assert isinstance(session.take(first, 100.0), Sealed)
    assert session.room == 1  # chunk 0 is being stored: the next is asked meanwhile
    (third,) = (holder.answer(f) for f in session.ask([2], 100.0))
    assert isinstance(session.take(second, 100.0), Sealed)
    assert session.room == 0  # two being stored, one more than the allowance
    session.stored(0)
    assert session.room == 1
    assert session.mine == {1, 2}
    assert isinstance(session.take(third, 100.0), Sealed)
    assert session.room == 1  # window 2 - 0 on the way; allowance 2 + 1 - 2 stored
