"""Turning a holder's connection hints into a channel.

A `Connector` tries the hints in order, each with a dialer for its kind and a connect
timeout, and returns the first channel that opens; a hint of a kind it has no dialer for
is skipped. When a relay hint follows, direct hints get a short timeout
(`DIRECT_FIRST_TIMEOUT`): a holder behind a NAT drops the connection silently, and the
relay should not wait the whole timeout behind it. `ZmqDirectDialer` opens a `ZmqChannel`
to a `DirectHint`'s endpoint; `ZmqRelayDialer` a `RelayChannel` through a relay, with a
ticket the broker issued for this holder and file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import zmq
import zmq.utils.z85

from sfs.common import protocol
from sfs.common.errors import SfsError, TransportError
from sfs.peer.channel import Channel, Interrupt, RelayChannel, ZmqChannel
from sfs.peer.hints import DirectHint, Hint, RelayHint
from sfs.peer.keys import Identity


class Dialer(Protocol):
    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        """A channel to `holder` by way of `hint`, open within `timeout` seconds, or
        `TransportError`. `interrupt` is called while waiting and may raise."""
        ...


DIRECT_FIRST_TIMEOUT = 3.0  # seconds for a direct hint when a relay hint comes next


class Connector:
    def __init__(self, dialers: Mapping[type[Hint], Dialer], timeout: float) -> None:
        self._dialers = dialers
        self._timeout = timeout

    def connect(
        self, holder: protocol.Holder, hints: Sequence[Hint], interrupt: Interrupt
    ) -> Channel:
        """The first of `hints` that opens; `TransportError` naming each failure."""
        failures: list[str] = []
        relay_next = any(isinstance(h, RelayHint) and type(h) in self._dialers for h in hints)
        for hint in hints:
            dialer = self._dialers.get(type(hint))
            if dialer is None:
                failures.append(f"{hint.describe()}: not a way this peer can connect")
                continue
            timeout = self._timeout
            if relay_next and isinstance(hint, DirectHint):
                timeout = min(timeout, DIRECT_FIRST_TIMEOUT)
            try:
                return dialer.dial(holder, hint, timeout, interrupt)
            except TransportError as exc:
                failures.append(str(exc))
        if not failures:
            raise TransportError(f"{holder.username} gave no way to reach it")
        raise TransportError(f"cannot reach {holder.username}: {'; '.join(failures)}")


class ZmqDirectDialer:
    """A DEALER to the holder's endpoint; CurveZMQ with the holder's key unless
    `encrypt` is off."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], identity: Identity, encrypt: bool
    ) -> None:
        self._context = context
        self._identity = identity
        self._encrypt = encrypt

    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        if not isinstance(hint, DirectHint):
            raise TransportError(f"{hint.describe()}: not a direct endpoint")
        curve = None
        if self._encrypt:
            curve = (
                holder.bundle.curve_z85(),
                self._identity.curve_public_z85,
                self._identity.curve_secret_z85,
            )
        return ZmqChannel.open(self._context, hint.endpoint, timeout, interrupt, curve)


# A ticket for a circuit to the named holder: (ticket, signature), from the broker.
TicketSource = Callable[[str], tuple[bytes, bytes]]


class ZmqRelayDialer:
    """A DEALER to a relay (CurveZMQ with the relay's key), which opens a circuit to
    the holder with a ticket from `tickets`. The frames through it are the same as on a
    direct connection: signed hello and offer, chunks sealed for this requester."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], identity: Identity, tickets: TicketSource
    ) -> None:
        self._context = context
        self._identity = identity
        self._tickets = tickets

    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        if not isinstance(hint, RelayHint):
            raise TransportError(f"{hint.describe()}: not a relay")
        try:
            ticket, signature = self._tickets(holder.username)
        except SfsError as exc:
            raise TransportError(f"{hint.describe()}: no ticket ({exc})") from exc
        curve = (
            zmq.utils.z85.encode(hint.key),
            self._identity.curve_public_z85,
            self._identity.curve_secret_z85,
        )
        return RelayChannel.open(
            self._context, hint.endpoint, timeout, interrupt, curve, ticket, signature
        )


def zmq_connector(
    context: zmq.Context[zmq.Socket[bytes]],
    identity: Identity,
    encrypt: bool,
    timeout: float,
    tickets: TicketSource | None = None,
) -> Connector:
    """The connector `sfs-peer get` uses: direct endpoints over zmq, and relays when
    `tickets` can get tickets from the broker."""
    dialers: dict[type[Hint], Dialer] = {DirectHint: ZmqDirectDialer(context, identity, encrypt)}
    if tickets is not None:
        dialers[RelayHint] = ZmqRelayDialer(context, identity, tickets)
    return Connector(dialers, timeout)
