"""How a download talks to one holder: a channel sends and receives whole messages (lists
of frames), waits for one at most a given time, and closes. Nothing above it knows zmq.

`ZmqChannel` is a DEALER connected to the holder's ROUTER, under CurveZMQ unless
transport encryption is off; it opens only once the ZMTP handshake is done, so that a
holder that cannot be reached is noticed before the hello. `memory_pair` gives two ends
of an in-memory channel, for running a download against a `HolderService` without
sockets (and, later, for channels built on other channels, such as a relay's).
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import zmq

from sfs.common import protocol, relay_protocol
from sfs.common.codec import from_wire
from sfs.common.errors import ProtocolError, RemoteError, TransportError
from sfs.common.manifest import MAX_CHUNK_SIZE
from sfs.peer.zmq_events import next_event

# Called between the slices of a wait; raises to abandon it (the download stopped, or
# gave up on this holder).
Interrupt = Callable[[], None]

_MAX_PEER_FRAME = MAX_CHUNK_SIZE + 64 * 1024
_SLICE = 0.1  # seconds: how soon a wait for a connection notices an interrupt
# A received frame: a chunk's comes as a view of ZeroMQ's buffer (`ZmqChannel.receive`).
Frame = bytes | memoryview
_ZERO_COPY_FROM = 64 * 1024  # bytes: frames this large are not copied out of ZeroMQ
_CLOSE_LINGER_MS = 100  # long enough for a last `finish` to leave


class Channel(Protocol):
    """One conversation with one holder. Not thread-safe: one thread uses it."""

    @property
    def address(self) -> str:
        """Where the other end is, for messages (a `tcp://` endpoint, say)."""
        ...

    def send(self, frames: Sequence[bytes]) -> None:
        """Queue one message; raises `TransportError` when the channel cannot take it."""
        ...

    def receive(self, timeout: float) -> list[Frame] | None:
        """The next message, waiting at most `timeout` seconds; None when none came.
        Raises `TransportError` when the channel is known to be gone."""
        ...

    def close(self) -> None: ...


class ZmqChannel:
    """A DEALER socket connected to one holder's ROUTER."""

    def __init__(self, sock: zmq.Socket[bytes], address: str) -> None:
        self._sock = sock
        self._address = address

    @classmethod
    def open(
        cls,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        timeout: float,
        interrupt: Interrupt,
        curve: tuple[bytes, bytes, bytes] | None,
    ) -> ZmqChannel:
        """Connect to `endpoint` and wait up to `timeout` seconds for the handshake.
        `curve`: (the holder's public key, our public key, our secret key), in Z85;
        None for no transport encryption."""
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = _MAX_PEER_FRAME
        sock.ipv6 = protocol.is_ipv6_literal(endpoint)  # names stay IPv4, as `is_ipv6_literal` says
        if curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
        try:
            _connect(sock, endpoint, timeout, interrupt)
        except BaseException:
            sock.close(linger=0)
            raise
        return cls(sock, endpoint)

    @property
    def address(self) -> str:
        return self._address

    def send(self, frames: Sequence[bytes]) -> None:
        try:
            # Never blocks: the queue (1,000 messages) is far above any window of requests.
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send to {self._address}: {exc}") from exc

    def receive(self, timeout: float) -> list[Frame] | None:
        try:
            if not self._sock.poll(max(0, round(timeout * 1000))):
                return None
            frames = self._sock.recv_multipart(copy=False)
            # A chunk is read where ZeroMQ received it, through a memoryview: no copy.
            return [f.buffer if len(f) >= _ZERO_COPY_FROM else f.bytes for f in frames]
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot receive from {self._address}: {exc}") from exc

    def close(self) -> None:
        self._sock.close(linger=_CLOSE_LINGER_MS)


class RelayChannel(ZmqChannel):
    """A DEALER to a relay, carrying one circuit to a holder once the relay took the
    ticket. What goes through it is what goes over a direct connection; the relay link is
    CurveZMQ with the relay's key, and the chunks are sealed end to end as always.
    `data_leg`: where the transfer's data connection opens through the relay (endpoint,
    one-use ticket), if the relay offered one."""

    data_leg: tuple[str, bytes] | None = None

    @classmethod
    def open(  # type: ignore[override]
        cls,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        timeout: float,
        interrupt: Interrupt,
        curve: tuple[bytes, bytes, bytes],
        ticket: bytes,
        signature: bytes,
    ) -> RelayChannel:
        """Connect to the relay at `endpoint` and open the circuit the ticket names,
        within `timeout` seconds; `TransportError` with the relay's reason if refused."""
        deadline = time.monotonic() + timeout
        plain = ZmqChannel.open(context, endpoint, timeout, interrupt, curve)
        channel = cls(plain._sock, f"relay {endpoint}")
        try:
            channel.send([protocol.encode("open", relay_protocol.Open(ticket, signature))])
            while True:
                reply = channel.receive(min(_SLICE, max(0.0, deadline - time.monotonic())))
                if reply is not None:
                    break
                interrupt()
                if time.monotonic() >= deadline:
                    raise TransportError(f"relay {endpoint} did not answer within {timeout:g} s")
            try:
                envelope = protocol.decode_envelope(bytes(reply[0])) if len(reply) == 1 else None
                if envelope is None:
                    raise ProtocolError("not an answer to open")
                protocol.raise_for_error(envelope, f"relay {endpoint}")
            except (ProtocolError, RemoteError) as exc:
                raise TransportError(str(exc)) from exc
            with contextlib.suppress(ProtocolError):  # an older relay: no data leg
                leg = from_wire(relay_protocol.DataLeg, envelope.body, "open")
                data = relay_protocol.data_leg_endpoint(endpoint, leg.port)
                channel.data_leg = (data, leg.ticket)
        except BaseException:
            channel.close()
            raise
        return channel

    def close(self) -> None:
        """Tell the relay the circuit is done (it closes it at once, so it no longer
        counts against this user's circuits), then close."""
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send(relay_protocol.CLOSE_CIRCUIT, flags=zmq.NOBLOCK)
        super().close()


def _connect(sock: zmq.Socket[bytes], endpoint: str, timeout: float, interrupt: Interrupt) -> None:
    """Connect, and return once the ZMTP (or CurveZMQ) handshake has succeeded. zmq
    retries a refused or dropped connection by itself; only the deadline ends that."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            if monitor.poll(round(_SLICE * 1000)):
                if next_event(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return
                continue
            interrupt()
            if time.monotonic() > deadline:
                raise TransportError(f"no answer from {endpoint} within {timeout:g} s")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


# --- in memory ------------------------------------------------------------------------

_CLOSED: list[bytes] = []  # put in the other end's inbox when one end closes


class MemoryChannel:
    """One end of an in-memory channel; thread-safe between the two ends."""

    def __init__(
        self, inbox: queue.SimpleQueue[list[bytes]], outbox: queue.SimpleQueue[list[bytes]]
    ) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self._peer_closed = False
        self.address = "memory"

    def send(self, frames: Sequence[bytes]) -> None:
        if self._closed or self._peer_closed:
            raise TransportError(f"{self.address} is closed")
        self._outbox.put(list(frames))

    def receive(self, timeout: float) -> list[Frame] | None:
        if self._closed or self._peer_closed:
            raise TransportError(f"{self.address} is closed")
        try:
            frames = self._inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if frames is _CLOSED:
            self._peer_closed = True
            raise TransportError(f"{self.address} closed the connection")
        return list(frames)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put(_CLOSED)


def memory_pair(address: str = "memory") -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends: what one sends, the other receives. `address` names the
    second end as the first sees it (the holder, for a download)."""
    there: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
    back: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
    near, far = MemoryChannel(back, there), MemoryChannel(there, back)
    near.address = address
    return near, far
