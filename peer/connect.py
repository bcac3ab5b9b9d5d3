"""Turning a holder's connection hints into a channel.

A `Connector` tries the hints in order, each with a dialer for its kind and a connect
timeout, and returns the first channel that opens; a hint of a kind it has no dialer for
is skipped. `ZmqDirectDialer` opens a `ZmqChannel` to a `DirectHint`'s endpoint.

`ZmqDataDialer` opens the second kind of channel, a transfer's data connection, to an
endpoint the holder's signed offer named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import zmq

from sfs.common import protocol
from sfs.common.errors import TransportError
from sfs.peer.channel import Channel, Interrupt, ZmqChannel
from sfs.peer.hints import DirectHint, Hint
from sfs.peer.keys import Identity


class DataDialer(Protocol):
    def dial(self, endpoint: str, timeout: float, interrupt: Interrupt) -> Channel:
        """A data channel to `endpoint`, open within `timeout` seconds, or
        `TransportError`."""
        ...


class Dialer(Protocol):
    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        """A channel to `holder` by way of `hint`, open within `timeout` seconds, or
        `TransportError`. `interrupt` is called while waiting and may raise."""
        ...


class Connector:
    def __init__(self, dialers: Mapping[type[Hint], Dialer], timeout: float) -> None:
        self._dialers = dialers
        self._timeout = timeout

    def connect(
        self, holder: protocol.Holder, hints: Sequence[Hint], interrupt: Interrupt
    ) -> Channel:
        """The first of `hints` that opens; `TransportError` naming each failure."""
        failures: list[str] = []
        for hint in hints:
            dialer = self._dialers.get(type(hint))
            if dialer is None:
                failures.append(f"{hint.describe()}: not a way this peer can connect")
                continue
            try:
                return dialer.dial(holder, hint, self._timeout, interrupt)
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


class ZmqDataDialer:
    """Opens the data connection an offer names: a DEALER with the NULL mechanism (the
    chunks on it are sealed end to end; `attach` binds it to the transfer)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self._context = context

    def dial(self, endpoint: str, timeout: float, interrupt: Interrupt) -> Channel:
        return ZmqChannel.open(self._context, endpoint, timeout, interrupt, None)


def zmq_connector(
    context: zmq.Context[zmq.Socket[bytes]], identity: Identity, encrypt: bool, timeout: float
) -> Connector:
    """The connector `sfs-peer get` uses: direct endpoints over zmq."""
    return Connector({DirectHint: ZmqDirectDialer(context, identity, encrypt)}, timeout)
