"""Connection hints: the ways a holder can be reached, tried in the order given.

Today a holder is reached only at the one `tcp://` endpoint its presence advertises, a
`DirectHint`. Other kinds (a relay, say) will be more classes in the `Hint` union, each
with a dialer of its own in the `Connector`. The wire still carries one endpoint per
holder: `hints_of` is the one place that turns it into hints.
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


Hint = DirectHint  # a union once there is more than one kind


def hints_of(holder: protocol.Holder) -> list[Hint]:
    """How to reach `holder`, best first."""
    # One endpoint today (a name, IPv4, or IPv6 as `tcp://[...]:PORT`), dialled as it is.
    # With several per holder (docs/PROTOCOL-v2.md §2) this is where they get their order:
    # direct hints first, IPv6 before IPv4, then relays; the `Connector` then starts the
    # next one 250 ms after the previous if that has not connected (RFC 8305).
    return [DirectHint(holder.endpoint)]
