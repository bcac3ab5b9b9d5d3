"""The broker's side of the relay: hints in heartbeats and lookups, relay grants and
circuit tickets signed with its Ed25519 key (checked here with the public half only, as
a relay does)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sfs.broker.service import BrokerService, RelayDirectory
from sfs.broker.store import SqliteStore
from sfs.common import crypto, protocol, relay_protocol
from sfs.common.errors import IntegrityError
from sfs.peer.keys import Identity
from tests.unit.test_broker_service import ENDPOINT, SETTINGS, Broker, Clock

RELAY = protocol.RelayInfo("tcp://relay.example:5602", b"\x01" * 32)
TICKET_KEY = crypto.generate_ticket_key()
PUBLIC = crypto.ticket_public_key(TICKET_KEY)


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
    relays = RelayDirectory((RELAY,), TICKET_KEY, ticket_ttl=120)
    return Broker(BrokerService(store, SETTINGS, clock=clock, relays=relays), clock, tmp_path / "f")


@pytest.fixture
def tokens(broker: Broker, alice: Identity, bob: Identity, carol: Identity) -> dict[str, str]:
    return {who.username: broker.register(who).token for who in (alice, bob, carol)}


def beat(broker: Broker, who: Identity, token: str, hints: list[protocol.ConnectionHint]) -> None:
    request = protocol.Heartbeat(token, ENDPOINT, hints)
    broker.ok("heartbeat", request, who.bundle.curve_public, protocol.HeartbeatResult)


def test_hints_go_from_heartbeat_to_lookup(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"])
    hints = [
        protocol.ConnectionHint("direct", "tcp://[2001:db8::7]:7001"),
        protocol.ConnectionHint("direct", ENDPOINT),
        protocol.ConnectionHint("relay", RELAY.endpoint, RELAY.key),
    ]
    beat(broker, alice, tokens["alice"], hints)
    (holder,) = broker.lookup(bob, tokens["bob"], file_id).holders
    assert holder.endpoint == ENDPOINT and holder.hints == hints


def test_a_relay_hint_the_broker_does_not_run_is_refused(
    broker: Broker, tokens: dict[str, str], alice: Identity
) -> None:
    for endpoint, key in ((RELAY.endpoint, b"\x02" * 32), ("tcp://evil.example:1", RELAY.key)):
        hint = protocol.ConnectionHint("relay", endpoint, key)
        request = protocol.Heartbeat(tokens["alice"], ENDPOINT, [hint])
        error = broker.error("heartbeat", request, alice.bundle.curve_public)
        assert error.code == "bad_request" and "not a relay of this broker" in error.message


def test_grant_carries_the_relays_and_an_attach_ticket_for_the_caller(
    broker: Broker, tokens: dict[str, str], alice: Identity, clock: Clock
) -> None:
    request = protocol.RelayGrant(tokens["alice"], [ENDPOINT])
    grant = broker.ok("relay_grant", request, alice.bundle.curve_public, protocol.RelayGrantResult)
    assert grant.relays == [RELAY]
    ticket = relay_protocol.open_ticket(
        relay_protocol.AttachTicket, PUBLIC, grant.ticket, grant.signature
    )
    assert (ticket.username, ticket.curve_key) == ("alice", alice.bundle.curve_public)
    assert ticket.endpoints == [ENDPOINT] and ticket.expires > clock()
    with pytest.raises(IntegrityError):  # one changed byte and the signature fails
        tampered = grant.ticket.replace(b"alice", b"carol")
        relay_protocol.open_ticket(relay_protocol.AttachTicket, PUBLIC, tampered, grant.signature)


def test_ticket_only_for_a_visible_file_and_an_online_holder(
    broker: Broker, tokens: dict[str, str], alice: Identity, bob: Identity, carol: Identity
) -> None:
    file_id = broker.publish(alice, tokens["alice"], access=["bob"])
    key = bob.bundle.curve_public
    offline = broker.error("ticket", protocol.GetTicket(tokens["bob"], file_id, "alice"), key)
    assert offline.code == "not_found" and "does not serve" in offline.message
    broker.heartbeat(alice, tokens["alice"])
    result = broker.ok(
        "ticket", protocol.GetTicket(tokens["bob"], file_id, "alice"), key, protocol.TicketResult
    )
    ticket = relay_protocol.open_ticket(
        relay_protocol.CircuitTicket, PUBLIC, result.ticket, result.signature
    )
    assert (ticket.requester, ticket.holder, ticket.file_id) == ("bob", "alice", file_id)
    assert ticket.requester_key == key and ticket.holder_key == alice.bundle.curve_public
    # carol is not on the access list: the file does not exist, as far as she can tell.
    denied = broker.error(
        "ticket", protocol.GetTicket(tokens["carol"], file_id, "alice"), carol.bundle.curve_public
    )
    assert denied.code == "not_found"
    # No session, no ticket.
    anonymous = broker.error("ticket", protocol.GetTicket("made-up", file_id, "alice"), key)
    assert anonymous.code == "unauthorized"


def test_a_broker_without_relays_grants_none(
    store: SqliteStore, clock: Clock, tmp_path: Path, alice: Identity
) -> None:
    plain = Broker(BrokerService(store, SETTINGS, clock=clock), clock, tmp_path / "f")
    token = plain.register(alice).token
    grant = plain.ok(
        "relay_grant",
        protocol.RelayGrant(token, []),
        alice.bundle.curve_public,
        protocol.RelayGrantResult,
    )
    assert grant.relays == []
