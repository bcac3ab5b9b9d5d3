"""sfs.broker.cache through `BrokerService`: two brokers (services) over one real SQLite
database. What one is told, or what `sfs-broker user ...` writes, holds on the other from
the next request on, though the other has the session and the lookup cached; and the
cache is really used (the store is not asked again)."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfs.broker import cache
from sfs.broker.generation_reads import GenerationReads
from sfs.broker.postgres_store import PostgresStore
from sfs.broker.service import BrokerService
from sfs.broker.store import SqliteStore
from sfs.common import protocol
from sfs.common.codec import from_wire
from sfs.common.identity import KeyBundle
from sfs.common.manifest import file_id_of
from sfs.peer.keys import Identity
from tests.unit.test_broker_service import SETTINGS, Broker, Clock, people  # noqa: F401

pytestmark = pytest.mark.usefixtures("people")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Broker, Broker, SqliteStore]]:
    """Brokers A and B, each with its own store (connections) on one database, one clock;
    and a third store, as `sfs-broker user ...` opens it."""
    clock = Clock()
    stores = [SqliteStore(tmp_path / "broker.db") for _ in range(3)]
    a, b = (
        Broker(BrokerService(store, SETTINGS, clock=clock), clock, tmp_path / name)
        for store, name in zip(stores, ("a", "b"), strict=False)
    )
    yield a, b, stores[2]
    for store in stores:
        store.close()


def fast(broker: Broker, who: Identity, token: str, file_id: str, rid: int = 7) -> bytes | None:
    """What the socket thread answers from the cache alone (None: a worker must)."""
    frame = protocol.encode("lookup", protocol.Lookup(token, file_id), rid)
    service = broker.service
    return service.answer_from_cache(frame, who.bundle.curve_public, service.generation())


def test_a_cached_lookup_is_answered_without_the_store_and_reads_as_handle_does(
    pair: tuple[Broker, Broker, SqliteStore],
    people: dict[str, Identity],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, _ = pair
    alice, bob = people["alice"], people["bob"]
    alice_token = a.register(alice).token
    bob_token = b.register(bob).token
    file_id = a.publish(alice, alice_token, access=["bob"])
    assert fast(b, bob, bob_token, file_id) is None  # nothing cached yet
    first = b.lookup(bob, bob_token, file_id)
    asked: list[str] = []
    store = b.service.store
    for name in ("session_user", "visible_file", "get_user", "online_holders", "signed_access"):
        real = getattr(store, name)

        def counted(*args: object, _real: object = real, _name: str = name) -> object:
            asked.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(store, name, counted)
    assert b.lookup(bob, bob_token, file_id) == first
    reply = fast(b, bob, bob_token, file_id, rid=12345)
    assert asked == []
    assert reply is not None
    envelope = protocol.decode_envelope(reply)
    assert (envelope.op, envelope.rid) == ("result", 12345)
    assert from_wire(protocol.LookupResult, envelope.body, "result") == first
    # Another device's key, or another user's file: a worker's job, never the cache's.
    assert fast(b, alice, bob_token, file_id) is None


def test_an_access_change_through_one_broker_holds_on_the_other_at_once(
    pair: tuple[Broker, Broker, SqliteStore],
    people: dict[str, Identity],  # noqa: F811
) -> None:
    a, b, _ = pair
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    alice_token = a.register(alice).token
    bob_token, carol_token = b.register(bob).token, b.register(carol).token
    manifest = a.manifest(alice, "plan.txt", [], b"the plan")
    data = manifest.encode()
    a.publish_bytes(alice, alice_token, data, alice.sign(data), ["bob"])
    file_id = file_id_of(data)
    assert b.lookup(bob, bob_token, file_id).access == ["bob"]
    assert b.lookup_error(carol, carol_token, file_id).code == "not_found"
    assert fast(b, bob, bob_token, file_id) is not None
    a.publish_bytes(alice, alice_token, data, alice.sign(data), ["carol"])  # through A
    assert fast(b, bob, bob_token, file_id) is None
    assert b.lookup_error(bob, bob_token, file_id).code == "not_found"
    assert b.lookup(carol, carol_token, file_id).access == ["carol"]


def test_an_unshare_a_logout_and_a_disable_hold_on_the_other_broker_at_once(
    pair: tuple[Broker, Broker, SqliteStore],
    people: dict[str, Identity],  # noqa: F811
) -> None:
    a, b, operator = pair
    alice, bob = people["alice"], people["bob"]
    alice_token = a.register(alice).token
    bob_token = b.register(bob).token
    kept = a.publish(alice, alice_token, name="kept.txt", content=b"kept")
    gone = a.publish(alice, alice_token, name="gone.txt", content=b"gone")
    for file_id in (kept, gone):
        b.lookup(bob, bob_token, file_id)
        b.lookup(alice, alice_token, file_id)  # alice's session cached on B too
    key = alice.bundle.curve_public
    a.ok("unpublish", protocol.Unpublish(alice_token, gone), key, protocol.Empty)
    assert fast(b, bob, bob_token, gone) is None
    assert b.lookup_error(bob, bob_token, gone).code == "not_found"
    a.ok("logout", protocol.Logout(alice_token), key, protocol.Empty)
    assert fast(b, alice, alice_token, kept) is None
    assert b.lookup_error(alice, alice_token, kept).code == "unauthorized"
    b.lookup(bob, bob_token, kept)
    assert fast(b, bob, bob_token, kept) is not None  # bob's session and file: cached again
    assert operator.set_disabled("bob", True)  # `sfs-broker user disable bob`
    assert fast(b, bob, bob_token, kept) is None
    assert b.lookup_error(bob, bob_token, kept).code == "unauthorized"


def test_a_cached_session_still_slides_and_still_expires(
    pair: tuple[Broker, Broker, SqliteStore],
    people: dict[str, Identity],  # noqa: F811
) -> None:
    a, b, _ = pair
    alice = people["alice"]
    token = a.register(alice).token
    file_id = a.publish(alice, token)
    for _ in range(3 * SETTINGS.session_ttl // 200):  # three lifetimes, a lookup every 200 s
        b.clock.advance(200)
        b.lookup(alice, token, file_id)
    b.clock.advance(SETTINGS.session_ttl)  # idle for a whole lifetime: gone everywhere
    assert fast(b, alice, token, file_id) is None
    assert b.lookup_error(alice, token, file_id).code == "unauthorized"
    assert a.lookup_error(alice, token, file_id).code == "unauthorized"


def test_a_holder_back_online_at_the_same_endpoint_is_listed_within_the_refresh(
    pair: tuple[Broker, Broker, SqliteStore],
    people: dict[str, Identity],  # noqa: F811
) -> None:
    """A renewal does not move the generation: the packed answer is rebuilt after
    PRESENCE_REFRESH seconds instead."""
    a, b, _ = pair
    alice, bob = people["alice"], people["bob"]
    alice_token = a.register(alice).token
    bob_token = b.register(bob).token
    file_id = a.publish(alice, alice_token)
    a.heartbeat(alice, alice_token)
    assert [h.username for h in b.lookup(bob, bob_token, file_id).holders] == ["alice"]
    a.clock.advance(SETTINGS.presence_ttl)  # lapsed
    assert b.lookup(bob, bob_token, file_id).holders == []
    a.heartbeat(alice, alice_token)  # back, same endpoint: a renewal of the row
    b.clock.advance(cache.PRESENCE_REFRESH)
    assert [h.username for h in b.lookup(bob, bob_token, file_id).holders] == ["alice"]


@pytest.fixture
def cached(
    pair: tuple[Broker, Broker, SqliteStore],
    people: dict[str, Identity],  # noqa: F811
) -> tuple[Broker, Identity, str, str]:
    """Broker B with bob's session and a file's lookup cached."""
    a, b, _ = pair
    alice, bob = people["alice"], people["bob"]
    file_id = a.publish(alice, a.register(alice).token)
    token = b.register(bob).token
    b.lookup(bob, token, file_id)
    return b, bob, token, file_id


VALUES = st.sampled_from([1, 7, True, 1.0, -1, 2**63, 2, "1", b"1", None, [], {}])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_fast_lane_answers_a_crafted_frame_as_handle_would_or_not_at_all(
    cached: tuple[Broker, Identity, str, str], data: st.DataObject
) -> None:
    """Frames near a cached lookup (each part of the envelope and body swapped for other
    types and values, keys added or dropped): the socket thread's answer, when it gives
    one, is byte for byte the full decoder's and handler's."""
    broker, bob, token, file_id = cached
    texts = st.sampled_from(
        [token, file_id, token + "x", token[:-1], file_id.upper(), file_id + "\0", "lookup", ""]
    )
    parts = st.one_of(VALUES, texts)
    envelope: dict[object, object] = {"v": 1, "op": "lookup", "rid": 7}
    body: dict[object, object] = {"token": token, "file_id": file_id}
    for target in (envelope, body):
        for key in data.draw(st.lists(st.sampled_from([*target, "extra"]), max_size=2)):
            if data.draw(st.booleans()):
                target.pop(key, None)
            else:
                target[key] = data.draw(parts)
    envelope["body"] = data.draw(st.sampled_from([body, body, [body], token]))
    frame = msgpack.packb(envelope, use_bin_type=True)
    if data.draw(st.booleans()):  # sometimes bytes cut or changed as well
        at = data.draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + data.draw(st.binary(max_size=3)) + frame[at + 1 :]
    key = bob.bundle.curve_public
    service = broker.service
    generation = service.generation()
    fast_reply = service.answer_from_cache(frame, key, generation)
    if fast_reply is not None:
        assert fast_reply == service.handle(frame, key, None, generation)


@given(frame=st.binary(max_size=600))
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_fast_lane_answers_no_random_bytes(
    cached: tuple[Broker, Identity, str, str], frame: bytes
) -> None:
    broker, bob, _, _ = cached
    service = broker.service
    assert service.answer_from_cache(frame, bob.bundle.curve_public, service.generation()) is None


def read_now(reads: GenerationReads, ticket: int) -> tuple[int, int | None, float]:
    """Send a read and wait for it as the socket thread would: poll its socket."""
    assert reads.send(ticket)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for sock in reads.sockets():
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable and (done := reads.receive(sock)) is not None:
                return done
    raise AssertionError("no answer to a generation read")


def test_postgres_generation_reads_see_what_another_store_committed(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    reads = store.generation_reads()
    try:
        before = time.monotonic()
        ticket, generation, started = read_now(reads, 1)
        assert (ticket, generation) == (1, store.generation())
        assert before <= started <= time.monotonic()
        store.add_user("alice", b"hash", KeyBundle(b"rsa", b"k" * 32), now=1)
        store.set_disabled("alice", True)  # a change a cache depends on
        assert generation is not None
        ticket, moved, _ = read_now(reads, 2)
        assert ticket == 2 and moved is not None and moved > generation
        # Several in flight at once, on connections of their own.
        for ticket in (3, 4):
            assert reads.send(ticket)
        assert reads.in_flight() == 2
    finally:
        reads.close()
        store.close()
