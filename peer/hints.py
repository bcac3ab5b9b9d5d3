"""Connection hints: the ways a holder can be reached, tried in the order given.

A `DirectHint` is the holder's own ROUTER; a `RelayHint` is a relay the holder keeps a
connection to (docs/PROTOCOL.md, Connection hints). `hints_of` turns a lookup's holder
into hints, best first: direct IPv6, direct IPv4 (or names), then relays. Each kind has
a dialer of its own in the `Connector`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfs.common import protocol


@dataclass(frozen=True)
class DirectHint:
    """Connect straight to the holder's ROUTER at `endpoint` (`tcp://host:port`)."""

    endpoint: str

    def describe(self) -> str:
        return self.endpoint


@dataclass(frozen=True)
class RelayHint:
    """Reach the holder through the relay at `endpoint`, whose CurveZMQ key is `key`."""

    endpoint: str
    key: bytes  # raw, 32 bytes

    def describe(self) -> str:
        return f"relay {self.endpoint}"


Hint = DirectHint | RelayHint


def hints_of(holder: protocol.Holder) -> list[Hint]:
    """How to reach `holder`, best first (RFC 8305's order: IPv6 before IPv4, then the
    relays). A holder listed without hints (an older broker) has its one endpoint."""
    if not holder.hints:
        return [DirectHint(holder.endpoint)]
    direct = [h.endpoint for h in holder.hints if h.kind == "direct"]
    direct.sort(key=lambda endpoint: not protocol.is_ipv6_literal(endpoint))  # stable
    relays = [
        RelayHint(h.endpoint, h.relay_key)
        for h in holder.hints
        if h.kind == "relay" and h.relay_key is not None
    ]
    hints: list[Hint] = [DirectHint(endpoint) for endpoint in dict.fromkeys(direct)]
    return [*hints, *relays]
