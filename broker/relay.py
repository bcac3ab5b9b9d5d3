"""`sfs-broker relay`: forwards frames between requesters and holders that others cannot
reach, in its own process (docs/PROTOCOL.md, The relay).

One CurveZMQ ROUTER takes both ends. A holder attaches with a broker-signed
`AttachTicket` naming its username and transport key; a requester opens a circuit with a
`CircuitTicket` for one holder and file. After that, every message of the requester's
connection goes to the holder as [circuit id, requester key, frame], and every
[circuit id, frames...] from the holder goes back to that requester. Frames are moved as
zmq frames (`copy=False`): the relay's Python does per-message bookkeeping, never
per-byte work, and it never decrypts anything: chunks are sealed end to end with a key
only the requester can unwrap. Limits are checked when a circuit opens (refusals say why
and when to retry) and while it runs (byte rates pace the requester's requests; idle and
too-old circuits are closed).

Data legs: the answers to `attach` and `open` carry a one-use data ticket (`DataLeg`)
for the relay's second ROUTER, the data port (NULL mechanism, as the holder's own data
port: chunks are AES-GCM sealed end to end, so nothing is encrypted twice). Each end
connects there and sends its ticket first; after that [frame] from a requester's leg
goes to its holder's leg as [circuit id, frame], and [circuit id, frames...] from the
holder's leg back to that requester's leg, with the circuit's limits. The transfer's
attach proof travels end to end inside, so the holder still binds the leg to the
transfer. Before a ticket, a data connection gets one refusal per bad frame, nothing
else.

What the relay holds for a requester is bounded by its reply credit (`REPLY_CREDIT`,
`_Unread`): replies are tracked until libzmq lets go of them, requests wait while too
much is unread, and a circuit closes past twice it. Failed requests are rate limited per
key and address (sfs.broker.relay_failures); data connections that give no ticket are
closed after a deadline and counted per address (sfs.broker.relay_data_conns).

The reachability probe (`probe`): the relay connects back to an attached holder's
advertised endpoint, only if that endpoint's host is the address the holder's own
connection comes from, at most once a `PROBE_INTERVAL` per holder and `MAX_PROBES` at
once, and only runs the CurveZMQ handshake with the holder's key: it cannot be pointed
at anyone else, and sends no sfs message.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.utils.z85
from zmq.utils.monitor import recv_monitor_message

from sfs.broker.relay_data_conns import TICKET_DEADLINE, DataConnections
from sfs.broker.relay_failures import FAILED_PER_ADDRESS, FAILED_PER_KEY, FailureCounts
from sfs.broker.server import peer_address
from sfs.broker.throttle import address_group
from sfs.common import crypto, protocol, relay_protocol
from sfs.common.codec import Record
from sfs.common.config import MAX_WINDOW, RelayLimits
from sfs.common.curve import client_key, start_authenticator
from sfs.common.errors import IntegrityError, ProtocolError
from sfs.common.manifest import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from sfs.common.protocol import ErrorCode, Refused

log = logging.getLogger("sfs.relay")

MAX_FRAME = MAX_CHUNK_SIZE + 64 * 1024  # a chunk and its envelope: the most a holder sends
# What a requester sends is small: a hello, chunk and page requests, a finish on the
# circuit; an attach (with its proof) and chunk requests on a data leg. Anything bigger
# closes the circuit, so a requester cannot make the relay hold chunk-sized frames.
MAX_REQUEST_FRAME = 64 * 1024
MAX_DATA_REQUEST_FRAME = 1024
PROBE_INTERVAL = 30.0  # seconds between two probes of one holder
PROBE_TIMEOUT = 3.0
MAX_PROBES = 4  # probes under way at once
QUEUED_PER_CIRCUIT = 32  # requests held back by a rate limit, at most, per circuit (a window)
# Messages queued toward one connection, at most (as the holder's server): a requester's
# window is at most 32 requests; a full queue means that end is not reading.
SEND_QUEUE = 40
# Reply bytes one requester may have waiting at the relay (forwarded, not yet taken by
# the kernel): two of the largest windows of default chunks. Past it its requests wait
# (an honest requester on a slow link is slowed, not dropped); past twice it (replies
# nobody asked for) its circuit closes. See `_Unread`.
REPLY_CREDIT = 2 * MAX_WINDOW * DEFAULT_CHUNK_SIZE
PENDING_FORGOTTEN = 2.0
_TRACKED = 64 * 1024  # reply frames this large are tracked (smaller ones are copied)
_POLL_MS = 100
_RETRY_BUSY = 10
_RETRY_ABSENT = 5


@dataclass
class _Holder:
    username: str
    connection: bytes
    key: bytes
    endpoints: list[str]
    address: str
    last_probe: float = -PROBE_INTERVAL
    data: bytes | None = None  # its data leg's connection, once it gave its ticket
    data_fd: int = -1  # that connection's descriptor
    data_ticket: bytes = b""


@dataclass
class _Circuit:
    circuit_id: bytes
    requester: str
    requester_key: bytes
    connection: bytes  # the requester's
    holder: _Holder
    opened: float
    last: float
    held: deque[zmq.Frame] = field(default_factory=deque)  # requests a rate limit held back
    data: bytes | None = None  # the requester's data leg, once it gave its ticket
    data_fd: int = -1
    data_ticket: bytes = b""
    data_held: deque[zmq.Frame] = field(default_factory=deque)
    pending: int = 0  # requests forwarded to the holder and not yet answered
    answered: float = 0.0  # when the holder last sent something on it
    largest: int = 0  # the largest chunk-sized reply seen: what a request may bring

    def expected(self, now: float) -> int:
        """The reply bytes the pending requests may bring. A count the holder has not
        moved for `PENDING_FORGOTTEN` seconds is dropped: not every message is answered
        (a `finish` is not), and a miscount must never stall a circuit."""
        if self.pending and now - self.answered > PENDING_FORGOTTEN:
            self.pending = 0
        return min(self.pending, MAX_WINDOW) * self.largest


class _Unread:
    """The replies forwarded to one requester that libzmq still holds (queued, or not yet
    written to the kernel), by connection: sent zero-copy with a tracker each, which
    libzmq marks done when it lets go of the bytes. Per-message bookkeeping only."""

    def __init__(self) -> None:
        self.size = 0
        self._queues: dict[bytes, deque[tuple[zmq.MessageTracker, int]]] = {}

    def add(self, connection: bytes, tracker: zmq.MessageTracker, size: int) -> None:
        self._queues.setdefault(connection, deque()).append((tracker, size))
        self.size += size

    def reap(self) -> int:
        """Forget the replies libzmq is done with (in order, per connection); the bytes
        still held."""
        for connection, queue_ in list(self._queues.items()):
            while queue_ and queue_[0][0].done:
                self.size -= queue_.popleft()[1]
            if not queue_:
                del self._queues[connection]
        return self.size


class _Bucket:
    """A byte budget refilled at `rate` a second, up to one second's worth; it may go
    into debt (a chunk is counted whole), and then requests wait."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate, self.level, self.at = rate, float(rate), now

    def spend(self, size: int) -> None:
        self.level -= size

    def open(self, now: float) -> bool:
        if not self.rate:
            return True
        self.level = min(float(self.rate), self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level >= 0


class RelayServer:
    def __init__(
        self,
        bind: str,
        curve: tuple[bytes, bytes],
        ticket_key: bytes,
        limits: RelayLimits,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        reply_credit: int = REPLY_CREDIT,
        data_deadline: float = TICKET_DEADLINE,
    ) -> None:
        """`curve`: the relay's (public, secret) CurveZMQ keys, z85; `ticket_key`: the
        broker's Ed25519 public key; `reply_credit`: see `REPLY_CREDIT`;
        `data_deadline`: seconds a data connection has to give its ticket."""
        self._bind = bind
        self._public, self._secret = curve
        self._ticket_key = ticket_key
        self._limits = limits
        self._stop = stop or threading.Event()
        self._clock = clock
        self._reply_credit = reply_credit
        self._data_deadline = data_deadline
        self._unread: dict[str, _Unread] = {}  # by requester
        self._failed_keys = FailureCounts(FAILED_PER_KEY)
        self._failed_addresses = FailureCounts(FAILED_PER_ADDRESS)
        self.endpoint = bind
        self._holders: dict[str, _Holder] = {}
        self._holder_by_connection: dict[bytes, _Holder] = {}
        self._circuits: dict[bytes, _Circuit] = {}  # by circuit id
        self._by_requester: dict[bytes, _Circuit] = {}  # by the requester's connection
        self._used_nonces: dict[bytes, int] = {}  # nonce -> the ticket's expiry
        self._opened: dict[str, deque[float]] = {}  # requester -> when its circuits opened
        self._rates: dict[str, _Bucket] = {}
        self._global = _Bucket(limits.global_rate, time.monotonic())
        self._probes: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._probing = 0
        self._data_tickets: dict[bytes, _Holder | _Circuit] = {}  # not yet used
        self._data_ends: dict[bytes, _Holder | _Circuit] = {}  # by data connection
        self._data_port = 0
        self.data_endpoint = ""
        self._data: zmq.Socket[bytes]  # all three set by `serve`
        self._control_sock: zmq.Socket[bytes]
        self._data_conns: DataConnections

    def stop(self) -> None:
        self._stop.set()

    def serve(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        authenticator = start_authenticator(context, "sfs.relay.zap")
        sock = context.socket(zmq.ROUTER)
        data = context.socket(zmq.ROUTER)
        data_conns: DataConnections | None = None
        try:
            sock.linger = 0
            sock.ipv6 = True
            sock.maxmsgsize = MAX_FRAME
            sock.sndhwm = SEND_QUEUE
            sock.router_mandatory = True
            sock.curve_server = True
            sock.curve_secretkey = self._secret
            sock.curve_publickey = self._public
            sock.bind(self._bind)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            # The data port: after the control port, so it cannot take a port given in
            # the config; any free one on the same host (the answers name it).
            data.linger = 0
            data.ipv6 = True
            data.maxmsgsize = MAX_FRAME
            data.sndhwm = SEND_QUEUE
            data.router_mandatory = True
            data_conns = self._data_conns = DataConnections(data, self._data_deadline)
            data.bind(self.endpoint.rsplit(":", 1)[0] + ":0")
            self.data_endpoint = data.getsockopt_string(zmq.LAST_ENDPOINT)
            self._data_port = int(self.data_endpoint.rsplit(":", 1)[1])
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(data, zmq.POLLIN)
            self._data, self._control_sock = data, sock
            if on_ready is not None:
                on_ready(self.endpoint)
            while not self._stop.is_set():
                held = any(c.held or c.data_held for c in self._circuits.values())
                ready = dict(poller.poll(10 if held else _POLL_MS))
                if sock in ready:
                    for _ in range(256):  # a burst, then the housekeeping below
                        try:
                            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive(sock, frames)
                if data in ready:
                    for _ in range(256):
                        try:
                            frames = data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive_data(data, frames)
                self._release_held(sock)
                self._answer_probes(sock)
                self._expire(sock)
                data_conns.sweep()
        finally:
            if data_conns is not None:
                data_conns.stop()
            data.close(linger=0)
            sock.close(linger=0)
            authenticator.stop()

    # --- messages ------------------------------------------------------------------------

    def _receive(self, sock: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return
        connection = frames[0].bytes
        circuit = self._by_requester.get(connection)
        if circuit is not None:
            self._from_requester(sock, circuit, frames[1:])
            return
        holder = self._holder_by_connection.get(connection)
        if holder is not None and len(frames) >= 3:
            self._from_holder(sock, holder, frames[1:])
            return
        if len(frames) != 2 or len(frames[1]) > 4096:
            return  # not a control message: dropped unread
        reply = self._control(connection, frames[1], holder)
        if reply is not None:
            self._send(sock, [connection, reply])

    def _from_requester(
        self, sock: zmq.Socket[bytes], circuit: _Circuit, frames: list[zmq.Frame]
    ) -> None:
        if len(frames) != 1:  # requesters send one frame at a time
            return
        if len(frames[0]) > MAX_REQUEST_FRAME:
            self._close(sock, circuit, _too_large(len(frames[0]), MAX_REQUEST_FRAME))
            return
        if frames[0].bytes == relay_protocol.CLOSE_CIRCUIT:  # the requester is done
            self._forget(circuit)
            return
        circuit.last = time.monotonic()
        if circuit.held or not self._may_send(circuit):
            if len(circuit.held) >= QUEUED_PER_CIRCUIT:
                self._close(sock, circuit, self._why_held(circuit))
                return
            circuit.held.append(frames[0])
            return
        self._to_holder(sock, circuit, frames[0])

    def _to_holder(self, sock: zmq.Socket[bytes], circuit: _Circuit, frame: zmq.Frame) -> None:
        self._spend(circuit, len(frame))
        self._pending(circuit)
        holder = circuit.holder
        message: list[zmq.Frame | bytes] = [
            holder.connection,
            circuit.circuit_id,
            circuit.requester_key,
            frame,
        ]
        if not self._send(sock, message):
            self._close(sock, circuit, f"{holder.username} is not reading")

    def _from_holder(
        self, sock: zmq.Socket[bytes], holder: _Holder, frames: list[zmq.Frame]
    ) -> None:
        circuit = self._circuits.get(frames[0].bytes)
        if circuit is None or circuit.holder is not holder:
            return  # a circuit that closed meanwhile
        size = sum(len(f) for f in frames[1:])
        if size > MAX_FRAME:
            self._close(sock, circuit, f"{holder.username} {_too_large(size, MAX_FRAME)}")
            return
        circuit.last = time.monotonic()
        self._spend(circuit, size)
        if not self._to_requester(sock, b"c" + circuit.connection, circuit, frames[1:], size):
            self._close(sock, circuit, None)

    def _to_requester(
        self,
        sock: zmq.Socket[bytes],
        connection: bytes,
        circuit: _Circuit,
        frames: list[zmq.Frame],
        size: int,
    ) -> bool:
        """Forward a holder's reply to `circuit`'s requester (`connection`: b"c" or b"d",
        circuit or data leg, then its routing id), tracked; False if that connection
        cannot take it. Past twice the reply credit unread, the circuit closes instead
        (the holder sends what was not asked for, to a requester that does not read)."""
        circuit.pending = max(0, circuit.pending - 1)
        circuit.answered = time.monotonic()
        if size >= MIN_CHUNK_SIZE:
            circuit.largest = max(circuit.largest, size)
        unread = self._unread_of(circuit.requester)
        if unread.reap() >= 2 * self._reply_credit:
            self._close(self._control_sock, circuit, _not_reading(unread.size))
            return True
        trackers: list[zmq.MessageTracker] = []
        message: list[zmq.Frame | bytes] = [connection[1:]]
        for frame in frames:
            if len(frame) >= _TRACKED:  # the same bytes, with a tracker
                frame = zmq.Frame(frame.buffer, copy=False, track=True)
                if frame.tracker is not None:
                    trackers.append(frame.tracker)
            message.append(frame)
        if not self._send(sock, message):
            return False
        if trackers:
            unread.add(connection, zmq.MessageTracker(*trackers), size)
        return True

    @staticmethod
    def _pending(circuit: _Circuit) -> None:
        if not circuit.pending:
            circuit.answered = time.monotonic()
        circuit.pending += 1

    def _unread_of(self, requester: str) -> _Unread:
        unread = self._unread.get(requester)
        if unread is None:
            unread = self._unread[requester] = _Unread()
        return unread

    def _send(self, sock: zmq.Socket[bytes], frames: list[zmq.Frame | bytes]) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # gone, or not reading: its queue is full
            return False
        return True

    def _control(self, connection: bytes, frame: zmq.Frame, holder: _Holder | None) -> bytes | None:
        rid = 0
        key = client_key(frame)
        address = peer_address(frame)
        source = address_group(address)
        try:
            envelope = protocol.decode_envelope(frame.bytes)
            rid = envelope.rid
            self._check_failures(key, source)
            request = protocol.decode_body(envelope, relay_protocol.RELAY_REQUESTS)
            if key is None:
                raise Refused(ErrorCode.UNAUTHORIZED, "no transport key")
            result = self._handle(connection, key, address, request, holder, rid)
            return None if result is None else protocol.encode("result", result, rid)
        except ProtocolError as exc:
            self._failed(key, source)
            return protocol.encode_refusal(exc, rid)
        except Refused as exc:
            if exc.code not in (ErrorCode.BUSY, ErrorCode.THROTTLED):
                self._failed(key, source)
            return protocol.encode_error(exc.code, str(exc), rid)

    def _check_failures(self, key: bytes | None, source: str) -> None:
        """Refuse a key or an address with too many recent failures, before any work on
        its request (see sfs.broker.relay_failures)."""
        waits = [
            (self._failed_keys.wait(key) if key is not None else 0.0, "key"),
            (self._failed_addresses.wait(source), "address"),
        ]
        for wait, whose in waits:
            if wait > 0:
                raise Refused(
                    ErrorCode.THROTTLED,
                    f"{relay_protocol.RATE_LIMITED}: too many failed requests from your"
                    f" {whose}; retry in {math.ceil(wait)} s",
                )

    def _failed(self, key: bytes | None, source: str) -> None:
        if key is not None:
            self._failed_keys.add(key)
        self._failed_addresses.add(source)

    def _handle(
        self,
        connection: bytes,
        key: bytes,
        address: str,
        request: Record,
        holder: _Holder | None,
        rid: int,
    ) -> Record | None:
        if isinstance(request, relay_protocol.Attach):
            return self._attach(connection, key, address, request)
        if isinstance(request, relay_protocol.Open):
            return self._open(connection, key, request)
        if holder is None:
            raise Refused(ErrorCode.UNAUTHORIZED, "attach first")
        if isinstance(request, relay_protocol.KeepAlive):
            return protocol.Empty()
        if isinstance(request, relay_protocol.Probe):
            return self._probe(connection, holder, rid)
        raise Refused(ErrorCode.BAD_REQUEST, "not a relay request")

    # --- data legs -----------------------------------------------------------------------

    def _data_leg(self, end: _Holder | _Circuit) -> relay_protocol.DataLeg:
        """A fresh one-use ticket for `end`'s data leg."""
        ticket = crypto.random_bytes(relay_protocol.DATA_TICKET_SIZE)
        self._data_tickets[ticket] = end
        end.data_ticket = ticket
        return relay_protocol.DataLeg(self._data_port, ticket)

    def _receive_data(self, data: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        connection, fd = frames[0].bytes, int(frames[-1].get(zmq.SRCFD))
        if not self._data_conns.known(fd, connection) or len(frames) < 2:
            return
        end = self._data_ends.get(connection)
        if isinstance(end, _Circuit):
            if len(frames) == 2:  # requesters send one frame at a time
                self._from_requester_data(data, end, frames[1])
        elif isinstance(end, _Holder):
            if len(frames) >= 3:
                self._from_holder_data(data, end, frames[1:])
        else:
            self._redeem(data, connection, fd, frames)

    def _redeem(
        self, data: zmq.Socket[bytes], connection: bytes, fd: int, frames: list[zmq.Frame]
    ) -> None:
        """A data connection's first frame must be a ticket this relay handed out; a
        random 32-byte ticket is the dict key (no secret compare to time)."""
        ticket = frames[1].bytes if len(frames) == 2 else b""
        end = self._data_tickets.pop(ticket, None)
        if end is None:
            refusal = "not a data ticket of this relay: open a circuit first"
            self._send(data, [connection, protocol.encode_error(ErrorCode.UNAUTHORIZED, refusal)])
            return
        if isinstance(end, _Circuit):
            if end.circuit_id not in self._circuits:
                return
            if end.holder.data is None or self._holders.get(end.holder.username) is not end.holder:
                refusal = f"{end.holder.username} has no data leg here; use the circuit"
                self._send(data, [connection, protocol.encode_error(ErrorCode.NOT_FOUND, refusal)])
                return
        elif self._holders.get(end.username) is not end:
            return  # it attached again since
        end.data, end.data_fd = connection, fd
        self._data_ends[connection] = end
        self._data_conns.ticketed(fd)
        self._send(data, [connection, protocol.encode("result", protocol.Empty())])

    def _from_requester_data(
        self, data: zmq.Socket[bytes], circuit: _Circuit, frame: zmq.Frame
    ) -> None:
        if len(frame) > MAX_DATA_REQUEST_FRAME:
            why = _too_large(len(frame), MAX_DATA_REQUEST_FRAME)
            self._close(self._control_sock, circuit, why)
            return
        circuit.last = time.monotonic()
        if circuit.data_held or not self._may_send(circuit):
            if len(circuit.data_held) >= QUEUED_PER_CIRCUIT:
                self._close(self._control_sock, circuit, self._why_held(circuit))
                return
            circuit.data_held.append(frame)
            return
        self._to_holder_data(data, circuit, frame)

    def _to_holder_data(self, data: zmq.Socket[bytes], circuit: _Circuit, frame: zmq.Frame) -> None:
        self._spend(circuit, len(frame))
        self._pending(circuit)
        leg = circuit.holder.data
        if leg is None or not self._send(data, [leg, circuit.circuit_id, frame]):
            self._close(self._control_sock, circuit, f"{circuit.holder.username} is not reading")

    def _from_holder_data(
        self, data: zmq.Socket[bytes], holder: _Holder, frames: list[zmq.Frame]
    ) -> None:
        circuit = self._circuits.get(frames[0].bytes)
        if circuit is None or circuit.holder is not holder or circuit.data is None:
            return  # a circuit that closed meanwhile
        size = sum(len(f) for f in frames[1:])
        if size > MAX_FRAME:
            why = f"{holder.username} {_too_large(size, MAX_FRAME)}"
            self._close(self._control_sock, circuit, why)
            return
        circuit.last = time.monotonic()
        self._spend(circuit, size)
        if not self._to_requester(data, b"d" + circuit.data, circuit, frames[1:], size):
            self._close(self._control_sock, circuit, None)

    # --- holders -------------------------------------------------------------------------

    def _attach(
        self, connection: bytes, key: bytes, address: str, request: relay_protocol.Attach
    ) -> Record:
        ticket = self._verified(relay_protocol.AttachTicket, request.ticket, request.signature)
        if not crypto.same_bytes(key, ticket.curve_key):
            raise Refused(ErrorCode.FORBIDDEN, "this connection's key is not the ticket's")
        old = self._holders.get(ticket.username)
        if old is not None:  # it reconnected: circuits through the old connection are gone
            self._holder_by_connection.pop(old.connection, None)
            self._drop_data_leg(old)
            for circuit in [c for c in self._circuits.values() if c.holder is old]:
                self._forget(circuit)
        holder = _Holder(ticket.username, connection, key, ticket.endpoints, address)
        if old is not None:
            holder.last_probe = old.last_probe
        self._holders[ticket.username] = holder
        self._holder_by_connection[connection] = holder
        log.info("%s attached", ticket.username)
        return self._data_leg(holder)

    def _probe(self, connection: bytes, holder: _Holder, rid: int) -> Record | None:
        now = time.monotonic()
        wait = holder.last_probe + PROBE_INTERVAL - now
        if wait > 0:
            raise Refused(
                ErrorCode.THROTTLED, f"{relay_protocol.RATE_LIMITED}: retry in {wait:.0f} s"
            )
        if self._probing >= MAX_PROBES:
            raise Refused(ErrorCode.BUSY, f"{relay_protocol.RELAY_BUSY}: retry in {_RETRY_BUSY} s")
        holder.last_probe = now
        target = next((e for e in holder.endpoints if _same_host(e, holder.address)), None)
        if target is None:  # it advertises an address it does not come from: a NAT
            shown = holder.endpoints[0] if holder.endpoints else ""
            return relay_protocol.ProbeResult(shown, False)
        self._probing += 1
        log.debug("probing %s for %s", target, holder.username)
        curve = (zmq.utils.z85.encode(holder.key), self._public, self._secret)
        threading.Thread(
            target=self._run_probe, args=(connection, target, curve, rid), daemon=True
        ).start()
        return None  # answered by `_answer_probes` when done

    def _run_probe(
        self, connection: bytes, endpoint: str, curve: tuple[bytes, bytes, bytes], rid: int
    ) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        reachable = handshake_succeeds(context, endpoint, curve, PROBE_TIMEOUT)
        result = relay_protocol.ProbeResult(endpoint, reachable)
        log.debug("probed %s: %s", endpoint, "reachable" if reachable else "not reachable")
        self._probes.put((connection, protocol.encode("result", result, rid)))

    def _answer_probes(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                connection, reply = self._probes.get_nowait()
            except queue.Empty:
                return
            self._probing -= 1
            self._send(sock, [connection, reply])

    # --- circuits ------------------------------------------------------------------------

    def _open(self, connection: bytes, key: bytes, request: relay_protocol.Open) -> Record:
        ticket = self._verified(relay_protocol.CircuitTicket, request.ticket, request.signature)
        if not crypto.same_bytes(key, ticket.requester_key):
            raise Refused(ErrorCode.FORBIDDEN, "this connection's key is not the ticket's")
        if ticket.nonce in self._used_nonces:
            raise Refused(ErrorCode.UNAUTHORIZED, "ticket already used: ask the broker for another")
        if connection in self._by_requester or connection in self._holder_by_connection:
            raise Refused(ErrorCode.BAD_REQUEST, "this connection already carries a circuit")
        holder = self._holders.get(ticket.holder)
        if holder is None or not crypto.same_bytes(holder.key, ticket.holder_key):
            raise Refused(
                ErrorCode.NOT_FOUND,
                f"{ticket.holder} is not connected to this relay: retry in {_RETRY_ABSENT} s",
            )
        now = time.monotonic()
        limits = self._limits
        if len(self._circuits) >= limits.circuits:
            raise Refused(ErrorCode.BUSY, f"{relay_protocol.RELAY_BUSY}: retry in {_RETRY_BUSY} s")
        mine = sum(1 for c in self._circuits.values() if c.requester == ticket.requester)
        if mine >= limits.user_circuits:
            raise Refused(
                ErrorCode.BUSY,
                f"{relay_protocol.RELAY_BUSY}: {mine} circuits of yours are open;"
                f" retry in {_RETRY_BUSY} s",
            )
        unread = self._unread.get(ticket.requester)
        if unread is not None and unread.reap() >= self._reply_credit:
            raise Refused(
                ErrorCode.BUSY,
                f"{relay_protocol.RELAY_BUSY}: {unread.size // 2**20} MiB of replies to you are"
                f" not read yet; retry in {_RETRY_BUSY} s",
            )
        opened = self._opened.setdefault(ticket.requester, deque())
        while opened and opened[0] <= now - 60:
            opened.popleft()
        if len(opened) >= limits.circuits_per_minute:
            wait = opened[0] + 60 - now
            raise Refused(
                ErrorCode.THROTTLED, f"{relay_protocol.RATE_LIMITED}: retry in {wait:.0f} s"
            )
        opened.append(now)
        self._used_nonces[ticket.nonce] = ticket.expires
        circuit = _Circuit(
            crypto.random_bytes(relay_protocol.CIRCUIT_ID_SIZE),
            ticket.requester,
            key,
            connection,
            holder,
            now,
            now,
        )
        self._circuits[circuit.circuit_id] = circuit
        self._by_requester[connection] = circuit
        log.info("circuit %s -> %s for %s", ticket.requester, ticket.holder, ticket.file_id)
        return self._data_leg(circuit)

    def _verified(
        self, cls: type[relay_protocol.T], data: bytes, signature: bytes
    ) -> relay_protocol.T:
        try:
            ticket = relay_protocol.open_ticket(cls, self._ticket_key, data, signature)
        except IntegrityError as exc:
            raise Refused(
                ErrorCode.UNAUTHORIZED, f"not a ticket of this relay's broker ({exc})"
            ) from exc
        if ticket.expires <= self._clock():
            raise Refused(
                ErrorCode.UNAUTHORIZED,
                f"{relay_protocol.TICKET_EXPIRED}: ask the broker for another; retry in 0 s",
            )
        return ticket

    def _may_send(self, circuit: _Circuit) -> bool:
        """Whether a request of `circuit` may go to its holder now: within the rates, and
        what it may bring back within the requester's reply credit."""
        now = time.monotonic()
        return (
            self._rate(circuit.requester, now).open(now)
            and self._global.open(now)
            and self._credit_open(circuit)
        )

    def _credit_open(self, circuit: _Circuit) -> bool:
        unread = self._unread_of(circuit.requester).reap()
        return unread + circuit.expected(time.monotonic()) < self._reply_credit

    def _why_held(self, circuit: _Circuit) -> str:
        unread = self._unread_of(circuit.requester).reap()
        if unread + circuit.expected(time.monotonic()) >= self._reply_credit:
            return _not_reading(unread)
        return "the requester sends faster than its rate limit"

    def _spend(self, circuit: _Circuit, size: int) -> None:
        """Count `size` bytes relayed for `circuit`, whichever way, against its buckets."""
        self._rate(circuit.requester, time.monotonic()).spend(size)
        self._global.spend(size)

    def _rate(self, requester: str, now: float) -> _Bucket:
        bucket = self._rates.get(requester)
        if bucket is None:
            bucket = self._rates[requester] = _Bucket(self._limits.user_rate, now)
        return bucket

    def _release_held(self, sock: zmq.Socket[bytes]) -> None:
        for circuit in [c for c in self._circuits.values() if c.held]:
            while circuit.held and self._may_send(circuit):
                self._to_holder(sock, circuit, circuit.held.popleft())
                if circuit.circuit_id not in self._circuits:
                    break
        for circuit in [c for c in self._circuits.values() if c.data_held]:
            while circuit.data_held and self._may_send(circuit):
                self._to_holder_data(self._data, circuit, circuit.data_held.popleft())
                if circuit.circuit_id not in self._circuits:
                    break

    def _expire(self, sock: zmq.Socket[bytes]) -> None:
        now = time.monotonic()
        limits = self._limits
        for circuit in list(self._circuits.values()):
            if now - circuit.opened > limits.max_duration:
                self._close(
                    sock, circuit, "the circuit reached the relay's max duration; retry in 0 s"
                )
            elif now - circuit.last > limits.idle:
                self._close(sock, circuit, None)
        wall = self._clock()
        for nonce in [n for n, expires in self._used_nonces.items() if expires <= wall]:
            del self._used_nonces[nonce]
        for name in [n for n, b in self._rates.items() if b.open(now) and b.level >= b.rate]:
            if not any(c.requester == name for c in self._circuits.values()):
                del self._rates[name]
        for name in [n for n, u in self._unread.items() if not u.reap()]:
            if not any(c.requester == name for c in self._circuits.values()):
                del self._unread[name]

    def _close(self, sock: zmq.Socket[bytes], circuit: _Circuit, why: str | None) -> None:
        """End `circuit`; tell the requester `why`, if given."""
        self._forget(circuit)
        if why is not None:
            self._send(sock, [circuit.connection, protocol.encode_error(ErrorCode.BUSY, why)])

    def _forget(self, circuit: _Circuit) -> None:
        self._circuits.pop(circuit.circuit_id, None)
        if self._by_requester.get(circuit.connection) is circuit:
            del self._by_requester[circuit.connection]
        self._drop_data_leg(circuit)

    def _drop_data_leg(self, end: _Holder | _Circuit) -> None:
        """Forget `end`'s data ticket and leg, and close its connection (what was queued
        for it goes too)."""
        self._data_tickets.pop(end.data_ticket, None)
        if end.data is not None and self._data_ends.get(end.data) is end:
            del self._data_ends[end.data]
            self._data_conns.close(end.data_fd, end.data)
        end.data = None


def _not_reading(unread: int) -> str:
    return (
        f"the requester does not read its replies ({unread // 2**20} MiB waiting at the"
        " relay); circuit closed"
    )


def _too_large(size: int, limit: int) -> str:
    return f"sent a message too large for the relay ({size} bytes, at most {limit}); circuit closed"


def _same_host(endpoint: str, address: str) -> bool:
    """Whether `endpoint` names the host `address` (a literal IP, IPv4-mapped or not)."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    try:
        a, b = ipaddress.ip_address(host), ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


def handshake_succeeds(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    curve: tuple[bytes, bytes, bytes],
    timeout: float,
) -> bool:
    """Whether a CurveZMQ handshake with `endpoint` (server key `curve[0]`) completes
    within `timeout` seconds. Nothing is sent after it."""
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.ipv6 = protocol.is_ipv6_literal(endpoint)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            polled = monitor.poll(max(1, round(left * 1000)))
            if polled and recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
        return False
    except zmq.ZMQError:
        return False
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
