"""Turning a holder's connection hints into a channel.

A `Connector` tries the hints in order, each with a dialer for its kind and a connect
timeout, and returns the first channel that opens; a hint of a kind it has no dialer for
is skipped. With a `stagger` (as `sfs-peer get` has), the next hint is started 250 ms
after the previous one if that has not opened, alongside it (RFC 8305). When a relay hint
follows, direct hints get a short timeout (`DIRECT_FIRST_TIMEOUT`): a NAT drops the
connection silently, and the attempt should not hold a thread for the whole timeout.
`ZmqDirectDialer` opens a `ZmqChannel` to a `DirectHint`'s endpoint; `ZmqRelayDialer` a
`RelayChannel` through a relay, with a ticket the broker issued for this holder and file.

`ZmqDataDialer` opens the second kind of channel, a transfer's data connection, to an
endpoint the holder's signed offer named.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import zmq
import zmq.utils.z85

from sfs.common import protocol
from sfs.common.errors import SfsError, TransportError
from sfs.peer.channel import Channel, Interrupt, RelayChannel, ZmqChannel
from sfs.peer.hints import DirectHint, Hint, RelayHint
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


DIRECT_FIRST_TIMEOUT = 3.0  # seconds for a direct hint when a relay hint comes next
STAGGER = 0.25  # seconds before the next hint is tried alongside (RFC 8305)
_SLICE = 0.05


class _Cancelled(Exception):
    """Another attempt won: this one stops."""


class Connector:
    def __init__(
        self, dialers: Mapping[type[Hint], Dialer], timeout: float, stagger: float | None = None
    ) -> None:
        """`stagger`: start the next hint this many seconds after the previous one if
        that has not opened yet, each in a thread of its own (Happy Eyeballs); None: one
        after the other, each to its end."""
        self._dialers = dialers
        self._timeout = timeout
        self._stagger = stagger

    def connect(
        self, holder: protocol.Holder, hints: Sequence[Hint], interrupt: Interrupt
    ) -> Channel:
        """The first of `hints` that opens; `TransportError` naming each failure."""
        failures: list[str] = []
        attempts: list[tuple[Hint, Dialer, float]] = []
        relay_next = any(isinstance(h, RelayHint) and type(h) in self._dialers for h in hints)
        for hint in hints:
            dialer = self._dialers.get(type(hint))
            if dialer is None:
                failures.append(f"{hint.describe()}: not a way this peer can connect")
                continue
            timeout = self._timeout
            if relay_next and isinstance(hint, DirectHint):
                timeout = min(timeout, DIRECT_FIRST_TIMEOUT)
            attempts.append((hint, dialer, timeout))
        if self._stagger is not None and len(attempts) > 1:
            channel = self._race(holder, attempts, interrupt, failures)
            if channel is not None:
                return channel
        else:
            for hint, dialer, timeout in attempts:
                try:
                    return dialer.dial(holder, hint, timeout, interrupt)
                except TransportError as exc:
                    failures.append(str(exc))
        if not failures:
            raise TransportError(f"{holder.username} gave no way to reach it")
        raise TransportError(f"cannot reach {holder.username}: {'; '.join(failures)}")

    def _race(
        self,
        holder: protocol.Holder,
        attempts: list[tuple[Hint, Dialer, float]],
        interrupt: Interrupt,
        failures: list[str],
    ) -> Channel | None:
        """Start the attempts `stagger` apart (the next at once when one fails); the
        first channel that opens wins and the others are called off. `interrupt` runs
        on this thread only; the attempts get one that says whether they were called
        off. None when every attempt failed (`failures` says how)."""
        assert self._stagger is not None
        outcomes: queue.SimpleQueue[tuple[int, Channel | BaseException | None]]
        outcomes = queue.SimpleQueue()
        cancel = threading.Event()

        def called_off() -> None:
            if cancel.is_set():
                raise _Cancelled

        def attempt(number: int, hint: Hint, dialer: Dialer, timeout: float) -> None:
            try:
                outcomes.put((number, dialer.dial(holder, hint, timeout, called_off)))
            except _Cancelled:
                outcomes.put((number, None))
            except BaseException as exc:  # handed to the caller's thread
                outcomes.put((number, exc))

        failed: dict[int, str] = {}
        started, running, next_at = 0, 0, 0.0
        try:
            while started < len(attempts) or running:
                now = time.monotonic()
                if started < len(attempts) and (not running or now >= next_at):
                    args = (started, *attempts[started])
                    threading.Thread(target=attempt, args=args, daemon=True).start()
                    started, running, next_at = started + 1, running + 1, now + self._stagger
                wait = _SLICE if started == len(attempts) else min(_SLICE, next_at - now)
                try:
                    number, outcome = outcomes.get(timeout=max(0.0, wait))
                except queue.Empty:
                    interrupt()
                    continue
                running -= 1
                if isinstance(outcome, TransportError):
                    failed[number] = str(outcome)
                    next_at = now  # the next one at once
                elif isinstance(outcome, BaseException):
                    raise outcome
                elif outcome is not None:
                    return outcome
            failures.extend(failed[n] for n in sorted(failed))
            return None
        finally:
            cancel.set()
            if running:  # close what the others open before they notice
                threading.Thread(target=_close_late, args=(outcomes, running), daemon=True).start()


def _close_late(
    outcomes: queue.SimpleQueue[tuple[int, Channel | BaseException | None]], count: int
) -> None:
    for _ in range(count):
        try:
            _, outcome = outcomes.get(timeout=60)
        except queue.Empty:
            return
        if outcome is not None and not isinstance(outcome, BaseException):
            outcome.close()


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


def on_holder_host(control: str, offered: str) -> str | None:
    """Where to open the data connection an offer names: the host the control connection
    reached (`control`, `tcp://HOST:PORT`) with the offer's port, so a holder cannot point
    requesters at another host (as an FTP bounce would). None if either is not tcp or the
    port is not a port."""
    if not (control.startswith("tcp://") and offered.startswith("tcp://")):
        return None
    port = offered.rsplit(":", 1)[-1]
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        return None
    return control.rsplit(":", 1)[0] + ":" + port


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
    return Connector(dialers, timeout, stagger=STAGGER)
