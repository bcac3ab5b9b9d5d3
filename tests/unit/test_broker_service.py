"""sfs.broker.service: the request handlers, one frame in and one reply frame out.

No sockets: frames go straight into `BrokerService.handle` over a real SQLite store, with
the client key a CurveZMQ connection would report, and an injected clock for expiry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfs.broker import throttle
from sfs.broker.service import DEVICE_LOGIN_REFUSED, LOGIN_REFUSED, BrokerService, BrokerSettings
from sfs.broker.store import SqliteStore
from sfs.broker.store_contract import FileEntry
from sfs.broker.throttle import CHALLENGE_TTL
from sfs.common import crypto, protocol
from sfs.common.codec import Record, from_wire, pack
from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle
from sfs.common.manifest import DEFAULT_CHUNK_SIZE, file_id_of
from sfs.common.protocol import Envelope, ErrorBody, ErrorCode
from sfs.common.tree import ENTRIES_PER_PAGE, MAX_ENTRIES, MAX_PAGES, TreeHeader, pages_needed
from sfs.peer.keys import Identity, create_identity
from tests.trees import file_tree

R = TypeVar("R", bound=Record)

T0 = 1_700_000_000
SETTINGS = BrokerSettings(bcrypt_rounds=4, session_ttl=3600, presence_ttl=30)
PASSWORD = "correct horse battery staple"
ENDPOINT = "tcp://127.0.0.1:7001"
ALL_CODES = {code.value for code in ErrorCode}
NO_SUCH_FILE = "0123456789abcdef0123456789abcdef"


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="session")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    """alice, bob and carol: RSA-3072 keygen is slow, so once per session."""
    base = tmp_path_factory.mktemp("identities")
    return {name: create_identity(base / name, name) for name in ("alice", "bob", "carol")}


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Broker:
    """Drives a `BrokerService` the way a client would, minus the socket."""

    def __init__(self, service: BrokerService, clock: Clock, files: Path) -> None:
        self.service = service
        self.clock = clock
        self.files = files
        self._shares = 0

    # transport

    def raw(self, frame: bytes, key: bytes | None = None, address: str | None = None) -> Envelope:
        reply = self.service.handle(frame, key, address)
        envelope = protocol.decode_envelope(reply)
        assert envelope.op in ("result", "error")
        return envelope

    def send(
        self,
        op: str,
        body: Record | None,
        key: bytes | None,
        rid: int = 1,
        address: str | None = None,
    ) -> Envelope:
        envelope = self.raw(protocol.encode(op, body, rid), key, address)
        assert envelope.rid == rid
        return envelope

    def ok(
        self,
        op: str,
        body: Record | None,
        key: bytes | None,
        result: type[R],
        address: str | None = None,
    ) -> R:
        envelope = self.send(op, body, key, address=address)
        if envelope.op == "error":
            pytest.fail(f"{op} refused: {from_wire(ErrorBody, envelope.body)}")
        return from_wire(result, envelope.body, "result")

    def error(
        self, op: str, body: Record | None, key: bytes | None, address: str | None = None
    ) -> ErrorBody:
        envelope = self.send(op, body, key, address=address)
        assert envelope.op == "error", f"{op} unexpectedly succeeded: {envelope.body}"
        error = from_wire(ErrorBody, envelope.body)
        assert error.code in ALL_CODES
        return error

    # accounts

    def challenge(self, key: bytes | None, address: str | None = None) -> bytes:
        return self.ok(
            "challenge", protocol.GetChallenge(), key, protocol.ChallengeResult, address
        ).challenge

    def register(self, who: Identity, password: str = PASSWORD) -> protocol.SessionResult:
        key = who.bundle.curve_public
        request = register_request(who, self.challenge(key), password=password)
        return self.ok("register", request, key, protocol.SessionResult)

    def login(self, who: Identity, password: str = PASSWORD) -> protocol.SessionResult:
        request = protocol.Login(who.username, password)
        return self.ok("login", request, who.bundle.curve_public, protocol.SessionResult)

    def heartbeat(self, who: Identity, token: str, endpoint: str = ENDPOINT) -> int:
        request = protocol.Heartbeat(token, endpoint)
        key = who.bundle.curve_public
        return self.ok("heartbeat", request, key, protocol.HeartbeatResult).ttl

    # files

    def manifest(self, who: Identity, name: str, keywords: list[str], content: bytes) -> TreeHeader:
        """A file share's signed header; the broker checks only the header (a name a
        requester's path rules refuse, such as a backslash, is the requester's to refuse)."""
        tree = file_tree(
            content,
            DEFAULT_CHUNK_SIZE,
            name=name,
            owner=who.username,
            owner_fp=who.fingerprint,
            keywords=keywords,
        )
        return tree.header

    def publish_bytes(
        self,
        who: Identity,
        token: str,
        manifest: bytes,
        signature: bytes,
        access: list[str] | None = None,
    ) -> Envelope:
        file_id = file_id_of(manifest)
        grant = who.sign(
            protocol.grant_payload(file_id, protocol.normalise_access(access, who.username))
        )
        request = protocol.Publish(token, manifest, signature, access, grant)
        return self.send("publish", request, who.bundle.curve_public)

    def publish(
        self,
        who: Identity,
        token: str,
        name: str = "report.pdf",
        keywords: list[str] | None = None,
        access: list[str] | None = None,
        content: bytes = b"hello world",
    ) -> str:
        data = self.manifest(who, name, keywords or [], content).encode()
        envelope = self.publish_bytes(who, token, data, who.sign(data), access)
        if envelope.op == "error":
            pytest.fail(f"publish refused: {from_wire(ErrorBody, envelope.body)}")
        file_id = from_wire(protocol.PublishResult, envelope.body).file_id
        assert file_id == hashlib.sha256(data).digest()[:16].hex()
        return file_id

    def search(
        self,
        who: Identity,
        token: str,
        query: str = "",
        owner: str | None = None,
        limit: int = 100,
    ) -> list[protocol.SearchHit]:
        request = protocol.Search(token, query, owner, limit)
        key = who.bundle.curve_public
        return self.ok("search", request, key, protocol.SearchResult).hits

    def names(self, who: Identity, token: str, query: str = "", **kwargs: Any) -> set[str]:
        return {hit.name for hit in self.search(who, token, query, **kwargs)}

    def lookup(self, who: Identity, token: str, file_id: str) -> protocol.LookupResult:
        request = protocol.Lookup(token, file_id)
        return self.ok("lookup", request, who.bundle.curve_public, protocol.LookupResult)

    def lookup_error(self, who: Identity, token: str, file_id: str) -> ErrorBody:
        return self.error("lookup", protocol.Lookup(token, file_id), who.bundle.curve_public)


def register_request(
    who: Identity,
    challenge: bytes,
    *,
    username: str | None = None,
    password: str = PASSWORD,
    bundle: KeyBundle | None = None,
    signed_username: str | None = None,
    signer: Identity | None = None,
) -> protocol.Register:
    """A registration as a peer makes it, with one part optionally wrong."""
    username = username or who.username
    bundle = bundle or who.bundle
    payload = protocol.register_payload(signed_username or username, challenge, bundle)
    signature = (signer or who).sign(payload)
    return protocol.Register(username, password, bundle, challenge, signature)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "broker.db")
    yield store
    store.close()


@pytest.fixture
def broker(store: SqliteStore, clock: Clock, tmp_path: Path) -> Broker:
    return Broker(BrokerService(store, SETTINGS, clock=clock), clock, tmp_path / "files")


@pytest.fixture
def tokens(broker: Broker, people: dict[str, Identity]) -> dict[str, str]:
    """alice, bob and carol registered, each with a session token."""
    return {name: broker.register(who).token for name, who in people.items()}


@pytest.fixture
def alice(people: dict[str, Identity]) -> Identity:
    return people["alice"]


@pytest.fixture
def bob(people: dict[str, Identity]) -> Identity:
    return people["bob"]


@pytest.fixture
def carol(people: dict[str, Identity]) -> Identity:
    return people["carol"]


def db_rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "broker.db") as db:
        return db.execute(sql).fetchall()


# --- ping and challenges -------------------------------------------------------------------


def test_ping_reports_protocol_version_and_broker_time(broker: Broker) -> None:
    envelope = broker.send("ping", protocol.Ping(), None, rid=77)
    assert envelope.op == "result"
    assert from_wire(protocol.PingResult, envelope.body) == protocol.PingResult(
        protocol.VERSION, T0
    )
    broker.clock.advance(5)
    assert broker.ok("ping", protocol.Ping(), b"\x09" * 32, protocol.PingResult).time == T0 + 5


def test_challenges_are_fresh_32_byte_values(broker: Broker, alice: Identity) -> None:
    challenges = {broker.challenge(alice.bundle.curve_public) for _ in range(5)}
    assert len(challenges) == 5
    assert all(len(c) == 32 for c in challenges)


def limited_broker(store: SqliteStore, clock: Clock, tmp_path: Path, **limits: int) -> Broker:
    settings = dataclasses.replace(SETTINGS, **limits)
    return Broker(BrokerService(store, settings, clock=clock), clock, tmp_path / "files")


def test_an_address_may_hold_only_so_many_challenges(
    store: SqliteStore, clock: Clock, tmp_path: Path, alice: Identity
) -> None:
    broker = limited_broker(store, clock, tmp_path, registrations_per_address=3)
    key, here = alice.bundle.curve_public, "192.0.2.7"
    first = broker.challenge(key, here)
    broker.clock.advance(CHALLENGE_TTL - 10)
    broker.challenge(crypto.random_bytes(32), here)  # throwaway keys change nothing
    broker.challenge(crypto.random_bytes(32), here)
    error = broker.error("challenge", protocol.GetChallenge(), key, here)
    assert error == ErrorBody(
        "busy", "too many registrations in progress from your address; try again in 11 s"
    )
    broker.challenge(key, "198.51.100.1")  # another address is not affected
    broker.clock.advance(10)  # the first one lapses, making room
    fresh = broker.challenge(key, here)
    assert broker.error("challenge", protocol.GetChallenge(), key, here).code == "busy"
    assert broker.error("register", register_request(alice, first), key).code == "unauthorized"
    broker.ok("register", register_request(alice, fresh), key, protocol.SessionResult, here)


def test_a_full_table_costs_the_address_holding_the_most_its_oldest_challenge(
    store: SqliteStore,
    clock: Clock,
    tmp_path: Path,
    alice: Identity,
    bob: Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(throttle, "MAX_PENDING_CHALLENGES", 4)
    broker = limited_broker(store, clock, tmp_path, registrations_per_address=3)
    flooder = "203.0.113.9"
    oldest = broker.challenge(crypto.random_bytes(32), flooder)
    for _ in range(2):
        broker.challenge(crypto.random_bytes(32), flooder)
    key = alice.bundle.curve_public
    alices = broker.challenge(key, "192.0.2.7")  # the table is full now
    bobs = broker.challenge(bob.bundle.curve_public, "198.51.100.1")  # still served
    assert broker.service._challenges._state.pending_count() == 4
    # The flooder's oldest made room; alice's challenge, from elsewhere, was kept.
    error = broker.error("register", register_request(bob, oldest), bob.bundle.curve_public)
    assert error.code == "unauthorized"
    broker.ok("register", register_request(alice, alices), key, protocol.SessionResult)
    bob_key = bob.bundle.curve_public
    broker.ok("register", register_request(bob, bobs), bob_key, protocol.SessionResult)


@pytest.mark.parametrize(
    ("address", "same_as"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"),  # one /64: one home or one machine
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("[2001:db8::1]", "2001:db8::2"),
    ],
)
def test_addresses_are_counted_by_ipv4_address_or_ipv6_64(
    store: SqliteStore, clock: Clock, tmp_path: Path, address: str, same_as: str
) -> None:
    broker = limited_broker(store, clock, tmp_path, registrations_per_address=1)
    broker.challenge(crypto.random_bytes(32), address)
    error = broker.error("challenge", protocol.GetChallenge(), crypto.random_bytes(32), same_as)
    assert error.code == "busy"
    broker.challenge(crypto.random_bytes(32), "2001:db8:1:3::1")  # the next /64 is not


# --- registration --------------------------------------------------------------------------


def test_register_returns_a_working_session(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    session = broker.register(alice)
    assert session.username == "alice"
    assert len(session.token) >= 32
    assert session.expires_at == T0 + SETTINGS.session_ttl
    user = store.get_user("alice")
    assert user is not None and user.bundle == alice.bundle
    assert broker.search(alice, session.token) == []


def test_register_stores_only_a_bcrypt_hash_and_a_token_digest(
    broker: Broker, store: SqliteStore, alice: Identity, tmp_path: Path
) -> None:
    session = broker.register(alice)
    user = store.get_user("alice")
    assert user is not None
    assert user.password_hash.startswith(b"$2b$04$")
    assert crypto.password_matches(PASSWORD, user.password_hash)
    assert db_rows(tmp_path, "SELECT token_hash FROM sessions") == [
        (hashlib.sha256(session.token.encode()).digest(),)
    ]
    raw = b"".join((tmp_path / name).read_bytes() for name in ("broker.db", "broker.db-wal"))
    assert session.token.encode() not in raw
    assert PASSWORD.encode() not in raw


def assert_not_registered(store: SqliteStore, username: str) -> None:
    assert store.get_user(username) is None


def test_register_refuses_an_unknown_challenge(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    request = register_request(alice, crypto.random_bytes(32))
    error = broker.error("register", request, key)
    assert error == ErrorBody("unauthorized", "unknown or expired challenge")
    assert_not_registered(store, "alice")


def test_register_refuses_an_expired_challenge(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    challenge = broker.challenge(key)
    broker.clock.advance(CHALLENGE_TTL)
    error = broker.error("register", register_request(alice, challenge), key)
    assert error.code == "unauthorized"
    assert "challenge" in error.message
    assert_not_registered(store, "alice")


def test_register_accepts_a_challenge_just_before_it_expires(
    broker: Broker, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    challenge = broker.challenge(key)
    broker.clock.advance(CHALLENGE_TTL - 1)
    broker.ok("register", register_request(alice, challenge), key, protocol.SessionResult)


def test_register_refuses_a_reused_challenge(broker: Broker, alice: Identity) -> None:
    key = alice.bundle.curve_public
    challenge = broker.challenge(key)
    broker.ok("register", register_request(alice, challenge), key, protocol.SessionResult)
    # Same key, a new name: the challenge check comes first, so not "conflict".
    again = register_request(alice, challenge, username="alice2")
    assert broker.error("register", again, key).code == "unauthorized"


def test_a_refused_registration_still_uses_up_its_challenge(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    challenge = broker.challenge(key)
    assert broker.error("register", register_request(alice, challenge, password=""), key)
    error = broker.error("register", register_request(alice, challenge), key)
    assert error.code == "unauthorized"
    assert_not_registered(store, "alice")


@pytest.mark.parametrize("issued_to", ["bob", None])
def test_register_refuses_a_challenge_issued_to_another_client_key(
    broker: Broker,
    store: SqliteStore,
    people: dict[str, Identity],
    issued_to: str | None,
) -> None:
    alice = people["alice"]
    challenge = broker.challenge(people[issued_to].bundle.curve_public if issued_to else None)
    error = broker.error("register", register_request(alice, challenge), alice.bundle.curve_public)
    assert error.code == "unauthorized"
    assert_not_registered(store, "alice")


def test_register_refuses_a_tampered_signature(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    request = register_request(alice, broker.challenge(key))
    forged = bytes([request.signature[0] ^ 1]) + request.signature[1:]
    error = broker.error("register", dataclasses.replace(request, signature=forged), key)
    assert error.code == "bad_request"
    assert "signature" in error.message
    assert_not_registered(store, "alice")


def test_register_refuses_a_signature_by_another_key(
    broker: Broker, store: SqliteStore, alice: Identity, bob: Identity
) -> None:
    key = alice.bundle.curve_public
    request = register_request(alice, broker.challenge(key), signer=bob)
    error = broker.error("register", request, key)
    assert error.code == "bad_request"
    assert "signature" in error.message
    assert_not_registered(store, "alice")


def test_register_refuses_a_signature_over_another_username(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    request = register_request(
        alice, broker.challenge(key), username="mallory", signed_username="alice"
    )
    error = broker.error("register", request, key)
    assert error.code == "bad_request"
    assert "signature" in error.message
    assert_not_registered(store, "mallory")
    assert_not_registered(store, "alice")


@pytest.mark.parametrize("connect_as", ["bob", None])
def test_register_refuses_a_client_key_other_than_the_bundles(
    broker: Broker,
    store: SqliteStore,
    people: dict[str, Identity],
    connect_as: str | None,
) -> None:
    alice = people["alice"]
    key = people[connect_as].bundle.curve_public if connect_as else None
    # The challenge is issued to the connection's key, so only the bundle check can refuse.
    error = broker.error("register", register_request(alice, broker.challenge(key)), key)
    assert error.code == "bad_request"
    assert "transport key" in error.message
    assert_not_registered(store, "alice")


@pytest.mark.parametrize(
    "password",
    ["x" * 73, "é" * 37, "p" * 1024],  # "é" is 2 bytes: 37 characters, 74 bytes
    ids=["73-ascii", "74-bytes-37-chars", "1024"],
)
def test_register_refuses_a_password_over_72_bytes_and_says_so(
    broker: Broker, store: SqliteStore, alice: Identity, password: str
) -> None:
    key = alice.bundle.curve_public
    request = register_request(alice, broker.challenge(key), password=password)
    error = broker.error("register", request, key)
    assert error.code == "bad_request"
    assert "72 bytes" in error.message
    assert_not_registered(store, "alice")


def test_register_accepts_a_password_of_exactly_72_bytes(broker: Broker, alice: Identity) -> None:
    password = "é" * 36  # 72 bytes
    broker.register(alice, password=password)
    assert broker.login(alice, password=password).username == "alice"


def test_register_refuses_an_empty_password(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    error = broker.error(
        "register", register_request(alice, broker.challenge(key), password=""), key
    )
    assert error.code == "bad_request"
    assert "empty" in error.message
    assert_not_registered(store, "alice")


def test_register_refuses_a_taken_username_with_conflict(
    broker: Broker, store: SqliteStore, alice: Identity, bob: Identity
) -> None:
    broker.register(alice)
    key = bob.bundle.curve_public
    error = broker.error(
        "register", register_request(bob, broker.challenge(key), username="alice"), key
    )
    assert error.code == "conflict"
    assert "'alice'" in error.message
    user = store.get_user("alice")
    assert user is not None and user.bundle == alice.bundle  # the first owner keeps the name


def test_register_refuses_a_key_bundle_registered_under_another_name(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    broker.register(alice)
    key = alice.bundle.curve_public
    request = register_request(alice, broker.challenge(key), username="alice2")
    assert broker.error("register", request, key).code == "conflict"
    assert_not_registered(store, "alice2")


def test_register_refuses_a_bundle_with_a_garbage_rsa_key(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    bundle = KeyBundle(b"\x30\x82garbage" + bytes(100), key)
    request = register_request(alice, broker.challenge(key), bundle=bundle)
    error = broker.error("register", request, key)
    assert error.code == "bad_request"
    assert "malformed" in error.message
    assert_not_registered(store, "alice")


def test_register_refuses_a_bundle_with_a_key_that_is_not_rsa_3072(
    broker: Broker, store: SqliteStore, alice: Identity
) -> None:
    key = alice.bundle.curve_public
    ec_der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    bundle = KeyBundle(ec_der, key)
    request = register_request(alice, broker.challenge(key), bundle=bundle)
    error = broker.error("register", request, key)
    assert error.code == "bad_request"
    assert "RSA-3072" in error.message
    assert_not_registered(store, "alice")


def test_register_refuses_an_invalid_username(broker: Broker, alice: Identity) -> None:
    key = alice.bundle.curve_public
    request = register_request(alice, broker.challenge(key), username="Alice")
    assert broker.error("register", request, key).code == "bad_request"


@pytest.mark.parametrize("password", ["x" * 73, ""])
def test_an_invalid_registration_never_tells_whether_the_name_is_taken(
    broker: Broker, alice: Identity, bob: Identity, password: str
) -> None:
    broker.register(alice)
    key = bob.bundle.curve_public
    answers = [
        broker.error(
            "register",
            register_request(bob, broker.challenge(key), username=name, password=password),
            key,
        )
        for name in ("alice", "nobody")
    ]
    assert answers[0] == answers[1]
    assert answers[0].code == "bad_request"


def test_registrations_are_throttled_per_key_and_per_address(
    store: SqliteStore, clock: Clock, tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    broker = limited_broker(
        store, clock, tmp_path, registrations_per_key=2, registrations_per_address=3
    )
    broker.register(alice)
    key, here = bob.bundle.curve_public, "192.0.2.7"

    def probe(name: str, address: str = here) -> ErrorBody:
        request = register_request(bob, broker.challenge(key, address), username=name)
        return broker.error("register", request, key, address)

    assert [probe("alice").code for _ in range(3)] == ["conflict", "conflict", "throttled"]
    assert probe("alice").message.startswith("too many registrations from this device;")
    # Another key at the same address has one left: the address's third.
    carol = dataclasses.replace(bob, bundle=KeyBundle(bob.bundle.rsa_public, b"c" * 32))
    request = register_request(carol, broker.challenge(b"c" * 32, here), username="alice")
    assert broker.error("register", request, b"c" * 32, here).code == "conflict"
    request = register_request(carol, broker.challenge(b"c" * 32, here), username="alice")
    error = broker.error("register", request, b"c" * 32, here)
    assert error.code == "throttled"
    assert error.message.startswith("too many registrations from your address;")
    broker.clock.advance(3600)  # a new hour: bob registers after all
    request = register_request(bob, broker.challenge(key, here))
    assert broker.ok("register", request, key, protocol.SessionResult, here).username == "bob"


# --- login, logout, sessions ---------------------------------------------------------------


def test_login_with_the_right_password_gives_a_new_working_session(
    broker: Broker, alice: Identity
) -> None:
    first = broker.register(alice)
    broker.clock.advance(10)
    second = broker.login(alice)
    assert second.username == "alice"
    assert second.token != first.token
    assert second.expires_at == T0 + 10 + SETTINGS.session_ttl
    for token in (first.token, second.token):
        assert broker.search(alice, token) == []


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("alice", "wrong password"),
        ("alice", PASSWORD.upper()),
        ("nobody", PASSWORD),
        ("nobody", "wrong password"),
        ("alice", "x" * 100),  # too long for bcrypt: still just "wrong"
        ("alice", ""),
    ],
)
def test_login_failures_look_the_same_whether_or_not_the_user_exists(
    broker: Broker, alice: Identity, username: str, password: str
) -> None:
    broker.register(alice)
    error = broker.error("login", protocol.Login(username, password), alice.bundle.curve_public)
    assert error == ErrorBody("unauthorized", LOGIN_REFUSED)


@pytest.mark.parametrize("connect_as", ["bob", None])
def test_login_from_another_transport_key_reads_like_a_wrong_password(
    broker: Broker, people: dict[str, Identity], connect_as: str | None
) -> None:
    # Saying "right password, wrong device" would confirm guesses made from any key.
    broker.register(people["alice"])
    key = people[connect_as].bundle.curve_public if connect_as else None
    error = broker.error("login", protocol.Login("alice", PASSWORD), key)
    assert error == ErrorBody("unauthorized", LOGIN_REFUSED)


def _fail_logins(broker: Broker, username: str, key: bytes, times: int) -> None:
    for _ in range(times):
        error = broker.error("login", protocol.Login(username, "wrong password"), key)
        assert error == ErrorBody("unauthorized", LOGIN_REFUSED)


def test_failed_logins_lock_the_username_out_even_for_the_right_password(
    broker: Broker, alice: Identity, bob: Identity
) -> None:
    broker.register(alice)
    broker.register(bob)
    # Guesses from many throwaway keys still count against the account.
    for _ in range(SETTINGS.login_attempts):
        _fail_logins(broker, "alice", crypto.random_bytes(32), 1)
    error = broker.error("login", protocol.Login("alice", PASSWORD), alice.bundle.curve_public)
    assert error == ErrorBody("throttled", f"too many failed logins; try again in {30 + 1} s")
    assert broker.login(bob).username == "bob"  # other accounts are unaffected
    broker.clock.advance(SETTINGS.login_lockout)
    assert broker.login(alice).username == "alice"


def test_the_lockout_doubles_with_each_further_failure(broker: Broker, alice: Identity) -> None:
    broker.register(alice)
    key = alice.bundle.curve_public
    _fail_logins(broker, "alice", key, SETTINGS.login_attempts)
    broker.clock.advance(SETTINGS.login_lockout)
    _fail_logins(broker, "alice", key, 1)
    broker.clock.advance(SETTINGS.login_lockout)
    assert broker.error("login", protocol.Login("alice", PASSWORD), key).code == "throttled"
    broker.clock.advance(SETTINGS.login_lockout)
    assert broker.login(alice).username == "alice"


def test_a_client_key_guessing_across_usernames_is_locked_out(
    broker: Broker, alice: Identity, bob: Identity
) -> None:
    broker.register(alice)
    attacker = crypto.random_bytes(32)
    for name in ("nobody", "alice", "carol", "dave", "erin")[: SETTINGS.login_attempts]:
        _fail_logins(broker, name, attacker, 1)
    error = broker.error("login", protocol.Login("bob", "any"), attacker)
    assert error.code == "throttled"
    assert broker.login(alice).username == "alice"  # alice's one failure stays below the limit


def test_unknown_usernames_are_throttled_like_real_ones(broker: Broker, alice: Identity) -> None:
    broker.register(alice)
    answers = []
    for name in ("alice", "nobody"):
        _fail_logins(broker, name, crypto.random_bytes(32), SETTINGS.login_attempts)
        answers.append(broker.error("login", protocol.Login(name, PASSWORD), b"k" * 32))
    assert answers[0] == answers[1]
    assert answers[0].code == "throttled"


def test_a_successful_login_clears_the_failures(broker: Broker, alice: Identity) -> None:
    broker.register(alice)
    key = alice.bundle.curve_public
    _fail_logins(broker, "alice", key, SETTINGS.login_attempts - 1)
    broker.login(alice)
    _fail_logins(broker, "alice", key, SETTINGS.login_attempts - 1)
    assert broker.login(alice).username == "alice"


def test_while_every_bcrypt_slot_is_taken_logins_are_busy_and_challenges_survive(
    broker: Broker, alice: Identity, bob: Identity
) -> None:
    token = broker.register(alice).token
    key = bob.bundle.curve_public
    challenge = broker.challenge(key)
    slots = [broker.service._bcrypt for _ in range(SETTINGS.bcrypt_slots)]
    for slot in slots:
        slot.__enter__()
    try:
        assert broker.error("login", protocol.Login("alice", PASSWORD), key).code == "busy"
        assert broker.error("register", register_request(bob, challenge), key).code == "busy"
        assert broker.search(alice, token) == []  # requests without bcrypt go on
    finally:
        for slot in slots:
            slot.__exit__(None, None, None)
    # Nothing was spent: the same challenge still registers bob.
    assert broker.ok("register", register_request(bob, challenge), key, protocol.SessionResult)


def test_logout_invalidates_only_that_token(broker: Broker, alice: Identity, bob: Identity) -> None:
    first = broker.register(alice).token
    second = broker.login(alice).token
    bob_token = broker.register(bob).token
    key = alice.bundle.curve_public
    broker.ok("logout", protocol.Logout(first), key, protocol.Empty)
    assert broker.error("search", protocol.Search(first), key).code == "unauthorized"
    assert broker.error("logout", protocol.Logout(first), key).code == "unauthorized"
    assert broker.search(alice, second) == []
    assert broker.search(bob, bob_token) == []


def test_unknown_token_is_refused(broker: Broker, tokens: dict[str, str], alice: Identity) -> None:
    key = alice.bundle.curve_public
    for token in ("", crypto.new_token(), tokens["bob"]):
        error = broker.error("search", protocol.Search(token), key)
        assert error == ErrorBody("unauthorized", "not logged in (or the session expired)")


def test_session_expires_after_session_ttl(broker: Broker, alice: Identity, tmp_path: Path) -> None:
    token = broker.register(alice).token
    broker.clock.advance(SETTINGS.session_ttl)
    key = alice.bundle.curve_public
    error = broker.error("search", protocol.Search(token), key)
    assert error.code == "unauthorized"
    assert "expired" in error.message
    # An expired session stays dead: a later login is a new session, not a revival.
    broker.login(alice)
    assert broker.error("search", protocol.Search(token), key).code == "unauthorized"
    assert len(db_rows(tmp_path, "SELECT * FROM sessions")) == 1


def test_session_is_valid_until_just_before_its_expiry(broker: Broker, alice: Identity) -> None:
    token = broker.register(alice).token
    broker.clock.advance(SETTINGS.session_ttl - 1)
    assert broker.search(alice, token) == []


def test_using_a_session_slides_its_expiry(broker: Broker, alice: Identity) -> None:
    token = broker.register(alice).token
    ttl = SETTINGS.session_ttl
    key = alice.bundle.curve_public
    for _ in range(3):  # past the first expiry, kept alive by one use near each end
        broker.clock.advance(ttl - 60)
        assert broker.search(alice, token) == []
    assert broker.clock.now > T0 + 2 * ttl  # well past the first expiry
    broker.clock.advance(ttl)  # a whole lifetime without use
    assert broker.error("search", protocol.Search(token), key).code == "unauthorized"


@pytest.mark.parametrize("connect_as", ["bob", None])
def test_token_is_refused_from_another_client_key(
    broker: Broker, people: dict[str, Identity], tokens: dict[str, str], connect_as: str | None
) -> None:
    key = people[connect_as].bundle.curve_public if connect_as else None
    for op, body in [
        ("search", protocol.Search(tokens["alice"])),
        ("heartbeat", protocol.Heartbeat(tokens["alice"], ENDPOINT)),
        ("logout", protocol.Logout(tokens["alice"])),
    ]:
        assert broker.error(op, body, key).code == "unauthorized"
    assert broker.search(people["alice"], tokens["alice"]) == []  # still alive for alice


# --- presence --------------------------------------------------------------------------------


def test_heartbeat_puts_the_owner_online_in_search_and_lookup(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    assert [h.online for h in broker.search(bob, tokens["bob"])] == [False]
    assert broker.lookup(bob, tokens["bob"], file_id).holders == []

    assert broker.heartbeat(alice, tokens["alice"]) == SETTINGS.presence_ttl
    assert [h.online for h in broker.search(bob, tokens["bob"])] == [True]
    assert broker.lookup(bob, tokens["bob"], file_id).holders == [
        protocol.Holder(
            "alice", ENDPOINT, alice.bundle, [protocol.ConnectionHint("direct", ENDPOINT)]
        )
    ]


def test_presence_lapses_after_presence_ttl(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    broker.heartbeat(alice, tokens["alice"])
    broker.clock.advance(SETTINGS.presence_ttl - 1)
    assert [h.online for h in broker.search(bob, tokens["bob"])] == [True]
    assert len(broker.lookup(bob, tokens["bob"], file_id).holders) == 1
    broker.clock.advance(1)
    assert [h.online for h in broker.search(bob, tokens["bob"])] == [False]
    assert broker.lookup(bob, tokens["bob"], file_id).holders == []


def test_repeated_heartbeats_keep_a_peer_online_and_update_its_endpoint(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    broker.heartbeat(alice, tokens["alice"])
    for port in (7002, 7003, 7004):
        broker.clock.advance(SETTINGS.presence_ttl - 5)
        broker.heartbeat(alice, tokens["alice"], f"tcp://10.0.0.1:{port}")
    holders = broker.lookup(bob, tokens["bob"], file_id).holders
    assert [(h.username, h.endpoint) for h in holders] == [("alice", "tcp://10.0.0.1:7004")]


def test_offline_removes_presence_at_once(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    broker.heartbeat(alice, tokens["alice"])
    key = alice.bundle.curve_public
    broker.ok("offline", protocol.GoOffline(tokens["alice"]), key, protocol.Empty)
    assert [h.online for h in broker.search(bob, tokens["bob"])] == [False]
    assert broker.lookup(bob, tokens["bob"], file_id).holders == []
    assert broker.search(alice, tokens["alice"])  # offline is not logout


def test_logout_leaves_presence_to_the_server(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    """The user logging out in a terminal must not take their running server offline:
    the server has a session of its own, and says `offline` when it stops."""
    file_id = broker.publish(alice, tokens["alice"])
    server = broker.login(alice).token
    broker.heartbeat(alice, server)
    broker.ok("logout", protocol.Logout(tokens["alice"]), alice.bundle.curve_public, protocol.Empty)
    assert [h.username for h in broker.lookup(bob, tokens["bob"], file_id).holders] == ["alice"]
    broker.ok("offline", protocol.GoOffline(server), alice.bundle.curve_public, protocol.Empty)
    assert broker.lookup(bob, tokens["bob"], file_id).holders == []


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:80", "tcp://127.0.0.1", "tcp://a b:1", "", "ipc:///tmp/x"]
)
def test_heartbeat_refuses_an_invalid_endpoint(
    broker: Broker, tokens: dict[str, str], alice: Identity, endpoint: str
) -> None:
    request = protocol.Heartbeat(tokens["alice"], endpoint)
    assert broker.error("heartbeat", request, alice.bundle.curve_public).code == "bad_request"


# --- publish ----------------------------------------------------------------------------------


def test_publish_returns_the_file_id_and_lookup_returns_the_signed_bytes(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    manifest = broker.manifest(alice, "notes.txt", ["lecture"], b"x" * 1000)
    data = manifest.encode()
    signature = alice.sign(data)
    envelope = broker.publish_bytes(alice, tokens["alice"], data, signature)
    assert envelope.op == "result"
    file_id = from_wire(protocol.PublishResult, envelope.body).file_id
    assert file_id == hashlib.sha256(data).digest()[:16].hex()

    found = broker.lookup(bob, tokens["bob"], file_id)
    assert (found.file_id, found.owner, found.owner_bundle) == (file_id, "alice", alice.bundle)
    assert (found.manifest, found.signature) == (data, signature)
    [hit] = broker.search(bob, tokens["bob"])
    assert hit == protocol.SearchHit(file_id, "notes.txt", 1000, "alice", ["lecture"], T0, False)


def test_search_shows_a_folder_with_its_kind_and_file_count_from_the_signed_header(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_share = broker.manifest(alice, "photos.txt", [], b"x" * 10)
    folder = dataclasses.replace(  # a header only: the broker never sees the entries
        broker.manifest(alice, "photos", ["holiday"], b"x" * 10),
        kind="folder",
        files=700,
        folders=3,
        entry_pages=os.urandom(32 * pages_needed(703, ENTRIES_PER_PAGE)),
    )
    for header in (file_share, folder):
        data = header.encode()
        assert broker.publish_bytes(alice, tokens["alice"], data, alice.sign(data)).op == "result"
    hits = broker.search(bob, tokens["bob"], "photos")
    assert sorted((h.name, h.kind, h.files) for h in hits) == [
        ("photos", "folder", 700),
        ("photos.txt", "file", 1),
    ]


def assert_publish_refused(
    broker: Broker,
    who: Identity,
    token: str,
    manifest: bytes,
    signature: bytes,
    code: str,
    words: str,
    access: list[str] | None = None,
) -> None:
    envelope = broker.publish_bytes(who, token, manifest, signature, access)
    assert envelope.op == "error"
    error = from_wire(ErrorBody, envelope.body)
    assert error.code == code
    assert words in error.message
    assert broker.search(who, token) == []


def test_publish_refuses_a_forged_signature(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    data = broker.manifest(alice, "a.txt", [], b"data").encode()
    signature = bytearray(alice.sign(data))
    signature[-1] ^= 0x01
    assert_publish_refused(
        broker, alice, tokens["alice"], data, bytes(signature), "bad_request", "signature"
    )


def test_publish_refuses_a_tampered_manifest(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    manifest = broker.manifest(alice, "a.txt", [], b"data")
    signature = alice.sign(manifest.encode())
    tampered = dataclasses.replace(manifest, size=manifest.size + 1).encode()
    assert_publish_refused(
        broker, alice, tokens["alice"], tampered, signature, "bad_request", "signature"
    )


def test_publish_refuses_a_manifest_signed_by_another_user(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    # alice's manifest, signed with bob's key
    data = broker.manifest(alice, "a.txt", [], b"data").encode()
    assert_publish_refused(
        broker, alice, tokens["alice"], data, bob.sign(data), "bad_request", "signature"
    )
    # bob's own, properly signed manifest, published with alice's session
    data = broker.manifest(bob, "b.txt", [], b"data").encode()
    assert_publish_refused(
        broker, alice, tokens["alice"], data, bob.sign(data), "bad_request", "signature"
    )


def test_publish_refuses_a_manifest_naming_another_owner(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    manifest = broker.manifest(alice, "a.txt", [], b"data")
    data = dataclasses.replace(manifest, owner="bob").encode()
    assert_publish_refused(
        broker, alice, tokens["alice"], data, alice.sign(data), "bad_request", "another owner"
    )


def test_publish_refuses_a_manifest_naming_another_owner_key(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    manifest = broker.manifest(alice, "a.txt", [], b"data")
    data = dataclasses.replace(manifest, owner_fp=bob.fingerprint).encode()
    assert_publish_refused(
        broker, alice, tokens["alice"], data, alice.sign(data), "bad_request", "owner key"
    )


def test_publish_refuses_a_signed_manifest_that_does_not_decode(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    for data in (b"not msgpack \xc1", pack({"name": "x"}), pack([1, 2, 3])):
        assert_publish_refused(
            broker, alice, tokens["alice"], data, alice.sign(data), "bad_request", "malformed"
        )


def test_publish_refuses_an_access_list_naming_unknown_users(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    data = broker.manifest(alice, "a.txt", [], b"data").encode()
    signature = alice.sign(data)
    for access, named in [(["mallory"], ["mallory"]), (["bob", "zed", "eve"], ["eve", "zed"])]:
        envelope = broker.publish_bytes(alice, tokens["alice"], data, signature, access)
        error = from_wire(ErrorBody, envelope.body)
        assert error.code == "not_found"
        assert all(name in error.message for name in named)
        assert "bob" not in error.message
    assert broker.search(alice, tokens["alice"]) == []


def test_publishing_past_the_file_quota_is_refused_with_the_numbers(
    store: SqliteStore, clock: Clock, tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    broker = limited_broker(store, clock, tmp_path, quota_files=2)
    token = broker.register(alice).token
    first = broker.publish(alice, token, "a.txt")
    broker.publish(alice, token, "b.txt", access=["alice"])
    data = broker.manifest(alice, "c.txt", [], b"c").encode()
    error = from_wire(ErrorBody, broker.publish_bytes(alice, token, data, alice.sign(data)).body)
    assert error == ErrorBody(
        "forbidden",
        "share refused: you share 2 files, and the broker allows 2 per user (quota_files);"
        " unshare some first",
    )
    # Sharing the same manifest again (a new access list) replaces it: no new file.
    again = broker.lookup(alice, token, first).manifest
    broker.publish_bytes(alice, token, again, alice.sign(again), access=[])
    assert broker.lookup(alice, token, first).access == []
    # Other users have their own quota, and unsharing makes room.
    broker.publish(bob, broker.register(bob).token, "b.txt")
    unpublish = protocol.Unpublish(token, first)
    broker.ok("unpublish", unpublish, alice.bundle.curve_public, protocol.Empty)
    broker.publish(alice, token, "c.txt")


def test_publishing_past_the_manifest_bytes_quota_is_refused_with_the_numbers(
    store: SqliteStore, clock: Clock, tmp_path: Path, alice: Identity
) -> None:
    broker = limited_broker(store, clock, tmp_path, quota_manifest_mib=1)
    token = broker.register(alice).token
    # The largest header there is, crafted as a hostile client may: 2,048 entry pages.
    MiB = 1 << 20
    small = broker.manifest(alice, "big", [], b"x" * 1024)
    largest = dataclasses.replace(
        small, kind="folder", files=MAX_ENTRIES, size=0, chunk_count=0, hash_pages=b""
    )
    used = 0
    for _ in range(100):
        header = dataclasses.replace(
            largest, share_id=os.urandom(16), entry_pages=os.urandom(32 * MAX_PAGES)
        ).encode()
        envelope = broker.publish_bytes(alice, token, header, alice.sign(header))
        if envelope.op == "error":
            break
        used += len(header)
    error = from_wire(ErrorBody, envelope.body)
    assert error.code == "forbidden"
    assert used <= MiB < used + len(header)
    assert error.message == (
        f"share refused: with this manifest ({len(header) / MiB:,.1f} MiB), yours would take"
        f" {(used + len(header)) / MiB:,.1f} MiB at the broker, over its 1 MiB per user"
        " (quota_manifest_mib); unshare some first"
    )
    broker.publish(alice, token, "small.txt")


def test_publish_needs_a_session(broker: Broker, tokens: dict[str, str], alice: Identity) -> None:
    data = broker.manifest(alice, "a.txt", [], b"data").encode()
    envelope = broker.publish_bytes(alice, crypto.new_token(), data, alice.sign(data))
    assert from_wire(ErrorBody, envelope.body).code == "unauthorized"
    assert broker.search(alice, tokens["alice"]) == []


@pytest.mark.parametrize(
    "keywords", [["a\nb"], ["a\nb\nc\nd"] * 64, ["ok", "x\n"]], ids=["one", "64", "trailing"]
)
def test_keywords_with_line_breaks_never_reach_search_results_altered(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, keywords: list[str]
) -> None:
    # A signed manifest may hold keywords with line breaks (up to 64 of them). Search hits
    # must either show them as signed or not at all: never split (64 keywords split in
    # four make a hit that no client can decode, breaking every search that lists it).
    data = broker.manifest(alice, "a.txt", keywords, b"data").encode()
    envelope = broker.publish_bytes(alice, tokens["alice"], data, alice.sign(data))
    if envelope.op == "result":
        [hit] = broker.search(bob, tokens["bob"])
        assert hit.keywords == keywords
    else:
        error = from_wire(ErrorBody, envelope.body)
        assert error.code == "bad_request"
        assert "keyword" in error.message
        assert broker.search(bob, tokens["bob"]) == []


def test_republishing_a_manifest_replaces_its_access_list(
    broker: Broker,
    tokens: dict[str, str],
    alice: Identity,
    bob: Identity,
    carol: Identity,
) -> None:
    data = broker.manifest(alice, "a.txt", [], b"data").encode()
    signature = alice.sign(data)
    assert broker.publish_bytes(alice, tokens["alice"], data, signature).op == "result"
    assert broker.names(carol, tokens["carol"]) == {"a.txt"}
    assert broker.publish_bytes(alice, tokens["alice"], data, signature, ["bob"]).op == "result"
    assert broker.names(carol, tokens["carol"]) == set()
    assert broker.names(bob, tokens["bob"]) == {"a.txt"}
    assert len(broker.search(alice, tokens["alice"])) == 1


# --- search and lookup visibility -----------------------------------------------------------


def test_public_file_is_visible_to_every_user(
    broker: Broker, tokens: dict[str, str], people: dict[str, Identity]
) -> None:
    file_id = broker.publish(people["alice"], tokens["alice"], "public.txt")
    for name, who in people.items():
        assert [h.file_id for h in broker.search(who, tokens[name])] == [file_id]
        assert broker.lookup(who, tokens[name], file_id).owner == "alice"


def test_file_shared_with_bob_is_hidden_from_carol(
    broker: Broker,
    tokens: dict[str, str],
    alice: Identity,
    bob: Identity,
    carol: Identity,
) -> None:
    file_id = broker.publish(alice, tokens["alice"], "secret.txt", ["plans"], access=["bob"])
    for who in (alice, bob):
        assert [h.file_id for h in broker.search(who, tokens[who.username])] == [file_id]
        assert [h.file_id for h in broker.search(who, tokens[who.username], "secret")] == [file_id]
        assert broker.lookup(who, tokens[who.username], file_id).file_id == file_id
    assert broker.search(carol, tokens["carol"]) == []
    assert broker.search(carol, tokens["carol"], "secret") == []
    assert broker.search(carol, tokens["carol"], "plans", owner="alice") == []

    hidden = broker.lookup_error(carol, tokens["carol"], file_id)
    missing = broker.lookup_error(carol, tokens["carol"], NO_SUCH_FILE)
    assert hidden.code == missing.code == "not_found"
    assert hidden.message.replace(file_id, "ID") == missing.message.replace(NO_SUCH_FILE, "ID")


@pytest.mark.parametrize("access", [[], ["alice"]])
def test_file_with_an_empty_access_list_is_the_owners_alone(
    broker: Broker,
    tokens: dict[str, str],
    people: dict[str, Identity],
    access: list[str],
) -> None:
    file_id = broker.publish(people["alice"], tokens["alice"], "mine.txt", access=access)
    assert broker.names(people["alice"], tokens["alice"]) == {"mine.txt"}
    for name in ("bob", "carol"):
        assert broker.search(people[name], tokens[name]) == []
        assert broker.lookup_error(people[name], tokens[name], file_id).code == "not_found"


@pytest.fixture
def library(broker: Broker, tokens: dict[str, str], alice: Identity) -> Broker:
    """alice shares a few files with varied names and keywords."""
    for name, keywords in [
        ("Report-2024.pdf", ["thesis", "draft"]),
        ("report-old.pdf", ["archive"]),
        ("Holiday Photos.zip", ["summer", "thesis-free"]),
        ("100%.txt", []),
        ("100x.txt", []),
        ("a_b.txt", []),
        ("axb.txt", []),
        ("back\\slash.txt", []),
        ("Ärger.txt", ["größe"]),
    ]:
        broker.publish(alice, tokens["alice"], name, keywords)
    return broker


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("report", {"Report-2024.pdf", "report-old.pdf"}),
        ("REPORT", {"Report-2024.pdf", "report-old.pdf"}),
        ("rEpOrT-2024", {"Report-2024.pdf"}),
        ("THESIS", {"Report-2024.pdf", "Holiday Photos.zip"}),  # keyword, any case
        ("report thesis", {"Report-2024.pdf"}),  # terms are ANDed, across name and keywords
        ("thesis report", {"Report-2024.pdf"}),
        ("report   ARCHIVE", {"report-old.pdf"}),
        ("report holiday", set()),
        ("photos summer", {"Holiday Photos.zip"}),
        ("nothing-like-this", set()),
        ("100%", {"100%.txt"}),  # % is literal
        ("%", {"100%.txt"}),
        ("a_b", {"a_b.txt"}),  # _ is literal
        ("_", {"a_b.txt"}),
        ("\\", {"back\\slash.txt"}),
        ("k\\s", {"back\\slash.txt"}),
        ("ärger", {"Ärger.txt"}),
        ("Ärger", {"Ärger.txt"}),  # the file's own name must find it
        ("ÄRGER", {"Ärger.txt"}),
        ("GRÖSSE", set()),  # folding is lower(), not casefold()
        ("GRÖßE", {"Ärger.txt"}),
    ],
)
def test_search_matches_names_and_keywords(
    library: Broker,
    tokens: dict[str, str],
    bob: Identity,
    query: str,
    expected: set[str],
) -> None:
    assert library.names(bob, tokens["bob"], query) == expected


def test_empty_query_lists_every_visible_file(
    library: Broker, tokens: dict[str, str], bob: Identity
) -> None:
    assert len(library.search(bob, tokens["bob"], "   ")) == 9
    assert len(library.search(bob, tokens["bob"])) == 9


def test_search_owner_filter(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, carol: Identity
) -> None:
    broker.publish(alice, tokens["alice"], "from-alice.txt")
    broker.publish(bob, tokens["bob"], "from-bob.txt")
    broker.publish(bob, tokens["bob"], "bob-private.txt", access=[])
    assert broker.names(carol, tokens["carol"], owner="bob") == {"from-bob.txt"}
    assert broker.names(bob, tokens["bob"], owner="bob") == {"from-bob.txt", "bob-private.txt"}
    assert broker.names(carol, tokens["carol"], owner="alice") == {"from-alice.txt"}
    assert broker.names(carol, tokens["carol"], owner="carol") == set()
    assert broker.names(carol, tokens["carol"], owner="nobody") == set()
    assert broker.names(carol, tokens["carol"], "from", owner="alice") == {"from-alice.txt"}


def test_search_limit_keeps_the_newest(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    for i in range(5):
        broker.publish(alice, tokens["alice"], f"file{i}.txt")
        broker.clock.advance(10)
    hits = broker.search(bob, tokens["bob"], limit=2)
    assert [h.name for h in hits] == ["file4.txt", "file3.txt"]
    assert [h.shared_at for h in hits] == [T0 + 40, T0 + 30]
    assert len(broker.search(bob, tokens["bob"], limit=1)) == 1
    assert len(broker.search(bob, tokens["bob"], limit=500)) == 5


def test_a_search_past_the_stores_budget_says_partial(
    broker: Broker,
    store: SqliteStore,
    tokens: dict[str, str],
    alice: Identity,
    bob: Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real store with a budget of 2 files examined, rather than 10,000 files.
    monkeypatch.setattr(store, "search", functools.partial(store.search, budget=2))
    broker.publish(alice, tokens["alice"], "old.txt")
    broker.clock.advance(10)
    for name in ("private-1.txt", "private-2.txt"):
        broker.publish(alice, tokens["alice"], name, access=[])
    request, key = protocol.Search(tokens["bob"]), bob.bundle.curve_public
    found = broker.ok("search", request, key, protocol.SearchResult)
    # Alice's private files are not bob's candidates: they neither hide old.txt nor
    # make the answer partial.
    assert ([h.name for h in found.hits], found.partial) == (["old.txt"], False)
    key = alice.bundle.curve_public
    found = broker.ok("search", protocol.Search(tokens["alice"]), key, protocol.SearchResult)
    assert (len(found.hits), found.partial) == (2, True)  # old.txt is past the budget
    request = protocol.Search(tokens["alice"], limit=2)
    found = broker.ok("search", request, key, protocol.SearchResult)
    assert (len(found.hits), found.partial) == (2, False)


@pytest.mark.parametrize("limit", [0, -1, 501])
def test_search_refuses_a_limit_out_of_range(
    broker: Broker, tokens: dict[str, str], alice: Identity, limit: int
) -> None:
    request = protocol.Search(tokens["alice"], "", None, limit)
    assert broker.error("search", request, alice.bundle.curve_public).code == "bad_request"


def test_lookup_of_a_missing_file_is_not_found(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    error = broker.lookup_error(alice, tokens["alice"], NO_SUCH_FILE)
    assert error.code == "not_found"
    assert NO_SUCH_FILE in error.message


@pytest.mark.parametrize("file_id", ["xyz", "0123456789ABCDEF0123456789ABCDEF", "0" * 33, ""])
def test_lookup_refuses_a_malformed_file_id(
    broker: Broker, tokens: dict[str, str], alice: Identity, file_id: str
) -> None:
    assert broker.lookup_error(alice, tokens["alice"], file_id).code == "bad_request"


def resolve(broker: Broker, who: Identity, token: str, prefix: str) -> list[protocol.IdMatch]:
    request = protocol.Resolve(token, prefix)
    return broker.ok("resolve", request, who.bundle.curve_public, protocol.ResolveResult).matches


def test_resolve_finds_an_id_by_its_prefix_among_the_files_one_may_see(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, carol: Identity
) -> None:
    public = broker.publish(alice, tokens["alice"], "public.txt", content=b"1")
    to_bob = broker.publish(alice, tokens["alice"], "to-bob.txt", access=["bob"], content=b"2")
    assert resolve(broker, bob, tokens["bob"], public[:8]) == [
        protocol.IdMatch(public, "public.txt", "alice")
    ]
    assert resolve(broker, bob, tokens["bob"], to_bob) == [
        protocol.IdMatch(to_bob, "to-bob.txt", "alice")
    ]
    # carol may not see it: she learns nothing, whatever length of prefix she tries
    for length in (8, 16, 32):
        assert resolve(broker, carol, tokens["carol"], to_bob[:length]) == (
            [protocol.IdMatch(public, "public.txt", "alice")]
            if public.startswith(to_bob[:length])
            else []
        )


def test_resolve_lists_at_most_ten_files(
    broker: Broker, store: SqliteStore, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    owner = store.get_user("alice")
    assert owner is not None
    for n in range(12):  # ids a broker would never make, straight into the store
        file_id = f"abcdef01{n:024x}"
        entry = FileEntry(file_id, "alice", f"f{n}", 1, [], b"m" + bytes([n]), b"s", T0)
        store.add_file(owner.id, entry, None)
    matches = resolve(broker, bob, tokens["bob"], "abcdef01")
    assert [m.file_id for m in matches] == [f"abcdef01{n:024x}" for n in range(10)]


@pytest.mark.parametrize("prefix", ["", "ABCDEF01", "abcdef0g", "abcdef01%", "0" * 33])
def test_resolve_refuses_a_prefix_that_is_not_hex(
    broker: Broker, tokens: dict[str, str], alice: Identity, prefix: str
) -> None:
    request = protocol.Resolve(tokens["alice"], prefix)
    assert broker.error("resolve", request, alice.bundle.curve_public).code == "bad_request"


@pytest.mark.parametrize("prefix", ["a", "abcdef0"])
def test_resolve_refuses_a_short_prefix_saying_why(
    broker: Broker, tokens: dict[str, str], alice: Identity, prefix: str
) -> None:
    broker.publish(alice, tokens["alice"], "public.txt")
    request = protocol.Resolve(tokens["alice"], prefix)
    error = broker.error("resolve", request, alice.bundle.curve_public)
    assert (error.code, error.message) == (
        "bad_request",
        f"file id prefix {prefix} is too short: ids are 32 hex characters; give at least 8 of them",
    )


def test_resolve_needs_a_session(broker: Broker, alice: Identity) -> None:
    request = protocol.Resolve("not a token", "abcdef01")
    assert broker.error("resolve", request, alice.bundle.curve_public).code == "unauthorized"


def test_bundle_lookup(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    key = bob.bundle.curve_public
    result = broker.ok(
        "bundle", protocol.GetBundle(tokens["bob"], "alice"), key, protocol.BundleResult
    )
    assert result == protocol.BundleResult("alice", alice.bundle)
    missing = broker.error("bundle", protocol.GetBundle(tokens["bob"], "nobody"), key)
    assert missing.code == "not_found"
    assert "nobody" in missing.message
    no_session = broker.error("bundle", protocol.GetBundle(crypto.new_token(), "alice"), key)
    assert no_session.code == "unauthorized"


# --- unpublish -------------------------------------------------------------------------------


def test_owner_can_unpublish(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"], "gone.txt")
    kept = broker.publish(alice, tokens["alice"], "kept.txt")
    key = alice.bundle.curve_public
    broker.ok("unpublish", protocol.Unpublish(tokens["alice"], file_id), key, protocol.Empty)
    assert broker.names(bob, tokens["bob"]) == {"kept.txt"}
    assert broker.lookup_error(bob, tokens["bob"], file_id).code == "not_found"
    assert broker.lookup(bob, tokens["bob"], kept).file_id == kept
    again = broker.error("unpublish", protocol.Unpublish(tokens["alice"], file_id), key)
    assert again.code == "not_found"


def test_another_user_cannot_unpublish(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"], "mine.txt", access=["bob"])
    request = protocol.Unpublish(tokens["bob"], file_id)
    error = broker.error("unpublish", request, bob.bundle.curve_public)
    assert error.code == "not_found"
    assert broker.lookup(bob, tokens["bob"], file_id).owner == "alice"


def test_unpublish_of_a_missing_file_is_not_found(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    request = protocol.Unpublish(tokens["alice"], NO_SUCH_FILE)
    assert broker.error("unpublish", request, alice.bundle.curve_public).code == "not_found"


# --- malformed input -------------------------------------------------------------------------


def envelope_frame(
    op: Any = "ping", body: Any = None, rid: Any = 5, v: Any = protocol.VERSION, **extra: Any
) -> bytes:
    return pack({"v": v, "op": op, "rid": rid, "body": {} if body is None else body, **extra})


GOOD_BUNDLE = {"rsa_public": b"x", "curve_public": b"\x01" * 32}
GOOD_REGISTER = {
    "username": "alice",
    "password": "pw",
    "bundle": GOOD_BUNDLE,
    "challenge": b"\x00" * 32,
    "signature": b"s",
}

MALFORMED_FRAMES: dict[str, bytes] = {
    "empty": b"",
    "never-used-byte": b"\xc1",
    "truncated-map": pack({"v": protocol.VERSION, "op": "ping", "rid": 1, "body": {}})[:-3],
    "trailing-bytes": envelope_frame() + b"\x00",
    "text": b"GET / HTTP/1.1\r\n\r\n",
    "int": pack(1),
    "list": pack([1, "ping", 0, {}]),
    "string": pack("ping"),
    "nil": pack(None),
    "partial-envelope": pack({"v": protocol.VERSION, "op": "ping"}),
    "extra-key": envelope_frame(extra=1),
    "ext-type": msgpack.packb(msgpack.ExtType(1, b"x")),
    "int-key": pack({1: 1, "v": protocol.VERSION, "op": "ping", "rid": 0, "body": {}}),
    "invalid-utf8": b"\x84\xa1v\x02\xa2op\xa4pi\xffg\xa3rid\x00\xa4body\x80",
    "version-0": envelope_frame(v=0),
    "version-true": envelope_frame(v=True),
    "version-float": envelope_frame(v=float(protocol.VERSION)),
    "version-str": envelope_frame(v="1"),
    "version-nested": envelope_frame(v=[[[[1]]]]),
    "rid-negative": envelope_frame(rid=-1),
    "rid-bool": envelope_frame(rid=True),
    "rid-float": envelope_frame(rid=1.5),
    "rid-too-big": envelope_frame(rid=2**63),
    "op-int": envelope_frame(op=3),
    "op-bytes": envelope_frame(op=b"ping"),
    "body-list": envelope_frame(body=[]),
    "body-nil": pack({"v": protocol.VERSION, "op": "ping", "rid": 0, "body": None}),
    "unknown-op": envelope_frame(op="delete_everything"),
    "op-result": envelope_frame(op="result"),
    "op-error": envelope_frame(op="error", body={"code": "x", "message": "y"}),
    "op-peer-hello": envelope_frame(op="hello"),
    "op-long": envelope_frame(op="x" * 10_000),
    "ping-unknown-field": envelope_frame(body={"admin": True}),
    "login-username-int": envelope_frame("login", {"username": 1, "password": "pw"}),
    "login-password-bytes": envelope_frame("login", {"username": "alice", "password": b"pw"}),
    "login-missing-password": envelope_frame("login", {"username": "alice"}),
    "login-extra-field": envelope_frame(
        "login", {"username": "alice", "password": "pw", "admin": True}
    ),
    "login-bytes-key": envelope_frame("login", {"username": "alice", b"password": "pw"}),
    "login-password-too-long": envelope_frame(
        "login", {"username": "alice", "password": "p" * 1025}
    ),
    "search-missing-token": envelope_frame("search", {"query": "x"}),
    "search-token-int": envelope_frame("search", {"token": 5}),
    "search-token-nil": envelope_frame("search", {"token": None}),
    "search-token-too-long": envelope_frame("search", {"token": "t" * 129}),
    "search-limit-str": envelope_frame("search", {"token": "t", "limit": "10"}),
    "search-limit-bool": envelope_frame("search", {"token": "t", "limit": True}),
    "search-limit-float": envelope_frame("search", {"token": "t", "limit": 10.0}),
    "search-owner-list": envelope_frame("search", {"token": "t", "owner": ["a"]}),
    "search-query-too-long": envelope_frame("search", {"token": "t", "query": "q" * 201}),
    "heartbeat-endpoint-int": envelope_frame("heartbeat", {"token": "t", "endpoint": 7}),
    "logout-missing-token": envelope_frame("logout", {}),
    "offline-missing-token": envelope_frame("offline", {}),
    "lookup-missing-token": envelope_frame("lookup", {"file_id": NO_SUCH_FILE}),
    "unpublish-id-bytes": envelope_frame("unpublish", {"token": "t", "file_id": b"\x00" * 16}),
    "publish-missing-token": envelope_frame(
        "publish", {"manifest": b"m", "signature": b"s", "access": None}
    ),
    "publish-manifest-str": envelope_frame(
        "publish", {"token": "t", "manifest": "m", "signature": b"s", "access": None}
    ),
    "publish-access-str": envelope_frame(
        "publish", {"token": "t", "manifest": b"m", "signature": b"s", "access": "bob"}
    ),
    "publish-access-bad-name": envelope_frame(
        "publish", {"token": "t", "manifest": b"m", "signature": b"s", "access": ["Bob!"]}
    ),
    "register-bundle-bytes": envelope_frame("register", {**GOOD_REGISTER, "bundle": b"b"}),
    "register-short-curve-key": envelope_frame(
        "register", {**GOOD_REGISTER, "bundle": {**GOOD_BUNDLE, "curve_public": b"\x01" * 31}}
    ),
    "register-bundle-extra": envelope_frame(
        "register", {**GOOD_REGISTER, "bundle": {**GOOD_BUNDLE, "x": 1}}
    ),
    "register-short-challenge": envelope_frame(
        "register", {**GOOD_REGISTER, "challenge": b"\x00" * 31}
    ),
    "register-signature-too-long": envelope_frame(
        "register", {**GOOD_REGISTER, "signature": b"s" * 1025}
    ),
}


@pytest.mark.parametrize("frame", MALFORMED_FRAMES.values(), ids=MALFORMED_FRAMES.keys())
def test_malformed_requests_get_bad_request(
    broker: Broker, alice: Identity, frame: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sfs.broker"):
        envelope = broker.raw(frame, alice.bundle.curve_public)
    assert envelope.op == "error"
    error = from_wire(ErrorBody, envelope.body)
    assert error.code == "bad_request"
    assert error.message
    assert caplog.records == []  # a bad request is not a broker failure


def test_bad_request_echoes_the_request_id_once_the_envelope_decodes(broker: Broker) -> None:
    bad_body = broker.raw(envelope_frame("login", {"username": 1}, rid=4242))
    assert (bad_body.op, bad_body.rid) == ("error", 4242)
    unknown_op = broker.raw(envelope_frame("nope", rid=99))
    assert (unknown_op.op, unknown_op.rid) == ("error", 99)
    bad_frame = broker.raw(b"\xc1")
    assert (bad_frame.op, bad_frame.rid) == ("error", 0)


def test_unknown_operation_is_named_in_the_error(broker: Broker) -> None:
    error = from_wire(ErrorBody, broker.raw(envelope_frame("frobnicate")).body)
    assert error.code == "bad_request"
    assert "frobnicate" in error.message


def test_another_protocol_version_is_told_to_upgrade_in_its_own_envelope(
    broker: Broker,
) -> None:
    """The error envelope reads the same in every version, so a client of version 1
    learns that this broker speaks 2 (and the reply carries its request id)."""
    raw = msgpack.unpackb(broker.service.handle(envelope_frame(v=1, rid=7), None))
    assert (raw["v"], raw["op"], raw["rid"]) == (1, "error", 7)
    assert raw["body"] == {
        "code": "upgrade",
        "message": "upgrade sfs: this peer speaks version 2, you speak 1",
    }


def test_storage_failure_becomes_an_internal_error(
    broker: Broker,
    store: SqliteStore,
    tokens: dict[str, str],
    alice: Identity,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object) -> None:
        raise StorageError("database error: disk I/O error")

    monkeypatch.setattr(store, "search", broken)
    with caplog.at_level(logging.ERROR, logger="sfs.broker"):
        error = broker.error("search", protocol.Search(tokens["alice"]), alice.bundle.curve_public)
    assert error == ErrorBody("internal", "the broker could not do that")
    assert any("disk I/O error" in r.getMessage() for r in caplog.records)


def test_a_bug_in_a_handler_becomes_an_internal_error(
    broker: Broker,
    store: SqliteStore,
    tokens: dict[str, str],
    alice: Identity,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def buggy(*args: object) -> None:
        raise KeyError("secret internals")

    monkeypatch.setattr(store, "set_online", buggy)
    with caplog.at_level(logging.ERROR, logger="sfs.broker"):
        envelope = broker.send(
            "heartbeat", protocol.Heartbeat(tokens["alice"], ENDPOINT), alice.bundle.curve_public
        )
    error = from_wire(ErrorBody, envelope.body)
    assert error == ErrorBody("internal", "the broker hit an internal error")
    assert "secret" not in error.message
    assert any(r.exc_info for r in caplog.records)


# --- property: handle() always answers ---------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerService]:
    store = SqliteStore(tmp_path_factory.mktemp("fuzz") / "broker.db")
    yield BrokerService(store, SETTINGS, clock=lambda: T0)
    store.close()


def assert_answers(service: BrokerService, frame: bytes, key: bytes | None) -> None:
    reply = service.handle(frame, key)
    envelope = protocol.decode_envelope(reply)
    assert envelope.op in ("result", "error")
    if envelope.op == "error":
        error = from_wire(ErrorBody, envelope.body)
        assert error.code in ALL_CODES - {"internal"}, error
    try:
        request = protocol.decode_envelope(frame)
    except protocol.VersionMismatch as mismatch:  # another version: told to upgrade, same rid
        assert (envelope.op, envelope.body.get("code")) == ("error", "upgrade")
        assert envelope.rid == mismatch.rid
    except Exception:
        assert envelope.rid == 0
    else:
        assert envelope.rid == request.rid


_FIELDS = sorted(
    {f.name for cls in protocol.BROKER_REQUESTS.values() for f in dataclasses.fields(cls)}
)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.sampled_from(["alice", "", ENDPOINT, NO_SUCH_FILE, "t" * 129])
    | st.binary(min_size=32, max_size=32)
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
        | st.builds(
            lambda curve: {"rsa_public": b"junk", "curve_public": curve},
            st.binary(min_size=31, max_size=33),
        )
    ),
    max_leaves=10,
)
_bodies = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _values, max_size=6)
_envelopes = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 2]) | _values,
        "op": st.sampled_from(sorted(protocol.BROKER_REQUESTS)) | _values,
        "rid": st.integers(0, 2**63 - 1) | _values,
        "body": _bodies | _values,
    }
)
_keys = st.none() | st.binary(min_size=32, max_size=32) | st.binary(max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=st.binary(max_size=200), key=_keys)
def test_random_bytes_always_get_an_envelope(
    fuzz_service: BrokerService, frame: bytes, key: bytes | None
) -> None:
    assert_answers(fuzz_service, frame, key)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_envelopes | _values, key=_keys)
def test_random_msgpack_always_gets_an_envelope(
    fuzz_service: BrokerService, value: Any, key: bytes | None
) -> None:
    assert_answers(fuzz_service, msgpack.packb(value, use_bin_type=True), key)


# --- seeding: access grants and holders --------------------------------------------------


def hold(broker: Broker, who: Identity, token: str, file_id: str) -> Envelope:
    return broker.send("hold", protocol.Hold(token, file_id), who.bundle.curve_public)


def test_lookup_returns_the_access_list_and_the_grant_the_owner_signed(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"], access=["carol", "bob", "alice", "bob"])
    found = broker.lookup(bob, tokens["bob"], file_id)
    assert found.access == ["bob", "carol"]  # sorted, unique, without the owner
    crypto.verify(
        alice.bundle.rsa_key(),
        found.grant,
        protocol.grant_payload(file_id, ["bob", "carol"]),
        "grant",
    )
    public = broker.publish(alice, tokens["alice"], name="open.txt")
    assert broker.lookup(bob, tokens["bob"], public).access is None


@pytest.mark.parametrize("signed", [["bob", "carol"], None, ["bob"]])
def test_a_grant_that_does_not_match_the_access_list_is_refused(
    broker: Broker, tokens: dict[str, str], alice: Identity, signed: list[str] | None
) -> None:
    data = broker.manifest(alice, "x.txt", [], b"data").encode()
    grant = alice.sign(protocol.grant_payload(file_id_of(data), signed))
    request = protocol.Publish(tokens["alice"], data, alice.sign(data), ["bob"], grant)
    if signed == ["bob"]:
        broker.ok("publish", request, alice.bundle.curve_public, protocol.PublishResult)
        return
    error = broker.error("publish", request, alice.bundle.curve_public)
    assert error.code == "bad_request"
    assert "access grant" in error.message


def test_a_seeder_is_listed_as_a_holder_while_online(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, carol: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    assert hold(broker, bob, tokens["bob"], file_id).op == "result"
    assert broker.lookup(carol, tokens["carol"], file_id).holders == []  # nobody online
    broker.heartbeat(bob, tokens["bob"], "tcp://bob.example:7002")
    broker.heartbeat(alice, tokens["alice"])
    holders = broker.lookup(carol, tokens["carol"], file_id).holders
    assert [(h.username, h.endpoint) for h in holders] == [
        ("alice", ENDPOINT),  # the owner first
        ("bob", "tcp://bob.example:7002"),
    ]
    assert holders[1].bundle == bob.bundle
    release = protocol.Release(tokens["bob"], file_id)
    broker.ok("release", release, bob.bundle.curve_public, protocol.Empty)
    assert [h.username for h in broker.lookup(carol, tokens["carol"], file_id).holders] == ["alice"]
    error = broker.error("release", release, bob.bundle.curve_public)
    assert error.code == "not_found"


def test_only_those_the_file_is_shared_with_may_hold_it(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, carol: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"], access=["bob"])
    refused = hold(broker, carol, tokens["carol"], file_id)
    assert refused.op == "error"
    assert from_wire(ErrorBody, refused.body).code == "not_found"
    assert hold(broker, bob, tokens["bob"], NO_SUCH_FILE).op == "error"
    assert hold(broker, alice, tokens["alice"], file_id).op == "result"  # owner: a no-op
    broker.heartbeat(alice, tokens["alice"])
    assert [h.username for h in broker.lookup(bob, tokens["bob"], file_id).holders] == ["alice"]


def test_unpublishing_forgets_the_seeders(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, tmp_path: Path
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    hold(broker, bob, tokens["bob"], file_id)
    unpublish = protocol.Unpublish(tokens["alice"], file_id)
    broker.ok("unpublish", unpublish, alice.bundle.curve_public, protocol.Empty)
    assert db_rows(tmp_path, "SELECT * FROM holders") == []


# --- device login (unattended servers) ----------------------------------------------------


def device_login_request(who: Identity, challenge: bytes, username: str | None = None) -> Any:
    name = username or who.username
    payload = protocol.device_login_payload(name, challenge, who.bundle)
    return protocol.DeviceLogin(name, challenge, who.sign(payload))


def test_a_device_login_gives_a_working_session_without_a_password(
    broker: Broker, alice: Identity
) -> None:
    broker.register(alice)
    key = alice.bundle.curve_public
    request = device_login_request(alice, broker.challenge(key))
    result = broker.ok("device_login", request, key, protocol.SessionResult)
    assert result.username == "alice"
    assert broker.heartbeat(alice, result.token) == SETTINGS.presence_ttl


@pytest.mark.parametrize("case", ["other key", "no key", "unknown user", "bad signature"])
def test_device_login_failures_read_the_same(
    broker: Broker, alice: Identity, bob: Identity, case: str
) -> None:
    broker.register(alice)
    broker.register(bob)
    signer, key, username = alice, alice.bundle.curve_public, "alice"
    if case == "other key":  # bob's connection, alice's name and signature
        key = bob.bundle.curve_public
    elif case == "no key":
        key = None
    elif case == "unknown user":
        username = "nobody"
    elif case == "bad signature":  # bob signs, over alice's connection
        signer = bob
    challenge = broker.challenge(key)
    payload = protocol.device_login_payload(username, challenge, alice.bundle)
    request = protocol.DeviceLogin(username, challenge, signer.sign(payload))
    error = broker.error("device_login", request, key)
    assert error == ErrorBody("unauthorized", DEVICE_LOGIN_REFUSED)


def test_a_device_login_challenge_is_single_use_and_bound_to_its_connection(
    broker: Broker, alice: Identity, bob: Identity
) -> None:
    broker.register(alice)
    key = alice.bundle.curve_public
    challenge = broker.challenge(bob.bundle.curve_public)  # issued to another connection
    error = broker.error("device_login", device_login_request(alice, challenge), key)
    assert error == ErrorBody("unauthorized", "unknown or expired challenge")
    challenge = broker.challenge(key)
    broker.ok("device_login", device_login_request(alice, challenge), key, protocol.SessionResult)
    error = broker.error("device_login", device_login_request(alice, challenge), key)
    assert error == ErrorBody("unauthorized", "unknown or expired challenge")


def test_failed_device_logins_never_lock_the_username(
    broker: Broker, alice: Identity, bob: Identity
) -> None:
    """Someone failing device logins as alice (from their own key) throttles that key,
    not alice: her server still logs in, and so does her password."""
    broker.register(alice)
    broker.register(bob)
    bob_key = bob.bundle.curve_public
    for _ in range(SETTINGS.login_attempts + 3):
        request = device_login_request(alice, broker.challenge(bob_key))
        error = broker.error("device_login", request, bob_key)
        assert error.code in ("unauthorized", "throttled")
    assert error.code == "throttled"
    key = alice.bundle.curve_public
    request = device_login_request(alice, broker.challenge(key))
    assert broker.ok("device_login", request, key, protocol.SessionResult).username == "alice"
    assert broker.login(alice).username == "alice"
