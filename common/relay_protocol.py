"""What the relay speaks (docs/PROTOCOL.md, The relay): the broker's signed tickets, and
the few control messages on a relay connection before it starts forwarding.

Tickets are msgpack maps the broker signs with its Ed25519 relay key; a relay holds only
the public half. An `AttachTicket` lets a holder (by username and CurveZMQ key) keep a
connection at a relay; a `CircuitTicket` lets one requester reach one holder for one file
through it, once, until it expires. Both are checked by `from_wire`, so a relay does
bounded work on a ticket before it verifies the signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeVar

from sfs.common import crypto
from sfs.common.codec import MaxLen, Pattern, Range, Record, Size, from_wire, pack, to_wire, unpack
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.protocol import (
    MAX_HINTS,
    Ed25519Signature,
    Endpoint,
    FileId,
    RelayTicketBytes,
    Username,
)

ATTACH_DOMAIN = "sfs-relay-attach-v1"
CIRCUIT_DOMAIN = "sfs-relay-circuit-v1"
CurveKey = Annotated[bytes, Size(32)]
Nonce = Annotated[bytes, Size(16)]
CIRCUIT_ID_SIZE = 16


@dataclass(frozen=True)
class AttachTicket(Record):
    domain: Annotated[str, MaxLen(32), Pattern(ATTACH_DOMAIN)]
    username: Username
    curve_key: CurveKey  # the holder's registered transport key
    endpoints: Annotated[list[Endpoint], MaxLen(MAX_HINTS)]  # the only ones a relay may probe
    expires: Annotated[int, Range(0, 2**63)]
    nonce: Nonce


@dataclass(frozen=True)
class CircuitTicket(Record):
    domain: Annotated[str, MaxLen(32), Pattern(CIRCUIT_DOMAIN)]
    requester: Username
    requester_key: CurveKey
    holder: Username
    holder_key: CurveKey
    file_id: FileId
    expires: Annotated[int, Range(0, 2**63)]
    nonce: Nonce


def sign_ticket(private_key: bytes, ticket: AttachTicket | CircuitTicket) -> tuple[bytes, bytes]:
    data = pack(to_wire(ticket))
    return data, crypto.ticket_sign(private_key, data)


T = TypeVar("T", AttachTicket, CircuitTicket)


def open_ticket(cls: type[T], public_key: bytes, data: bytes, signature: bytes) -> T:
    """The ticket in `data` if the broker signed it; `IntegrityError` or `ProtocolError`.
    Expiry is the caller's to check, with its own clock."""
    crypto.ticket_verify(public_key, signature, data, "relay ticket")
    try:
        return from_wire(cls, unpack(data), "relay ticket")
    except ProtocolError as exc:
        raise IntegrityError(f"not a {cls.__name__}: {exc}") from exc


# --- messages on a relay connection ----------------------------------------------------


@dataclass(frozen=True)
class Attach(Record):
    """From a holder: keep this connection, and send it the circuits for me."""

    ticket: RelayTicketBytes
    signature: Ed25519Signature


@dataclass(frozen=True)
class Probe(Record):
    """From an attached holder: try to connect back to my first advertised endpoint."""


@dataclass(frozen=True)
class ProbeResult(Record):
    endpoint: Annotated[str, MaxLen(300)]
    reachable: bool


@dataclass(frozen=True)
class Open(Record):
    """From a requester: forward everything I send next to the ticket's holder."""

    ticket: RelayTicketBytes
    signature: Ed25519Signature


DATA_TICKET_SIZE = 32


@dataclass(frozen=True)
class DataLeg(Record):
    """The relay's answer to `attach` and `open`: this end's data leg connects to the
    relay's data port (on the host of its control endpoint), NULL mechanism, and sends
    `ticket` (one use) as its first frame. Chunks then cross the relay sealed end to end
    only, as on a direct data connection."""

    port: Annotated[int, Range(1, 65535)]
    ticket: Annotated[bytes, Size(DATA_TICKET_SIZE)]


def data_leg_endpoint(relay_endpoint: str, port: int) -> str:
    """`relay_endpoint`'s host with the data leg's `port`."""
    return relay_endpoint.rsplit(":", 1)[0] + f":{port}"


@dataclass(frozen=True)
class KeepAlive(Record):
    """From a holder, now and then: the relay answers, so a lost relay is noticed."""


RELAY_REQUESTS: dict[str, type[Record]] = {
    "attach": Attach,
    "probe": Probe,
    "open": Open,
    "keepalive": KeepAlive,
}

# Refusals name why, and say when to try again (the message ends "retry in N s").
RELAY_BUSY = "relay busy"
RATE_LIMITED = "rate limited"
TICKET_EXPIRED = "ticket expired"

# An empty frame from a requester on its circuit: "I am done", the relay closes the
# circuit (and its data leg) at once instead of after `idle` seconds. Never forwarded;
# a real request is never empty.
CLOSE_CIRCUIT = b""
