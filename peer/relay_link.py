"""`serve`'s connection to a relay, for holders others cannot reach (config `relay`).

`RelayState` is shared by the heartbeat thread (which fetches the broker's grant: its
relays and a signed attach ticket, and advertises the hints) and the server's loop,
which runs a `RelayLink`: a DEALER to one relay (CurveZMQ, this device's keys) that
attaches with the ticket, asks once for a reachability probe (`auto`), and sends a
keepalive every `KEEPALIVE` seconds. A relay silent for `LOST_AFTER` seconds is dropped
and the link reconnects (the next relay in the grant, if any); while it is down the
heartbeats carry no relay hint. Circuits arrive as [circuit id, requester key, frame]
and are answered as [circuit id, frames...].

The attach answer names the relay's data port and a one-use ticket (`DataLeg`): the link
then keeps a second DEALER there (NULL mechanism, like the holder's own data port), its
data leg, where requesters' data connections arrive as [circuit id, frame] (an attach
with the transfer's proof first, then chunk requests) and are answered as
[circuit id, frames...]. A relay without a data port (an older one) leaves chunks on the
circuits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import zmq
import zmq.utils.z85

from sfs.common import protocol, relay_protocol
from sfs.common.codec import Record, from_wire
from sfs.common.errors import ProtocolError, RemoteError
from sfs.common.manifest import MAX_CHUNK_SIZE
from sfs.peer.data_port import DATA_KEY_PREFIX
from sfs.peer.keys import Identity

log = logging.getLogger("sfs.peer")

KEEPALIVE = 5.0
LOST_AFTER = 15.0
RETRY_AFTER = 5.0  # seconds before connecting again after a refusal or a loss
GRANT_REFRESH = 240.0  # seconds; attach tickets last 600
_ATTACH, _PROBE, _KEEPALIVE = 1, 2, 3  # request ids
# Connection ids of relayed requesters, in `HolderService`: longer than any ZMQ routing id
# (at most 255 bytes), so a direct client cannot name itself like one.
CIRCUIT_PREFIX = b"\xffrelay" + bytes(255)
DATA_CIRCUIT_PREFIX = DATA_KEY_PREFIX + CIRCUIT_PREFIX  # their data connections' ids


class RelayState:
    """What the heartbeat thread and the server's loop share about the relay."""

    def __init__(self, mode: str, advertise: str) -> None:
        self.mode = mode
        self.advertise = advertise
        self._lock = threading.Lock()
        self._grant: protocol.RelayGrantResult | None = None
        self._granted_at = 0.0
        self.attached: protocol.RelayInfo | None = None
        self.reachable: bool | None = None  # None: not probed (yet)
        self.changed = threading.Event()  # set when the hints change; the heartbeat beats

    def set_grant(self, grant: protocol.RelayGrantResult) -> None:
        with self._lock:
            self._grant, self._granted_at = grant, time.monotonic()

    def grant(self) -> protocol.RelayGrantResult | None:
        with self._lock:
            return self._grant

    def grant_stale(self) -> bool:
        with self._lock:
            return self._grant is None or time.monotonic() - self._granted_at > GRANT_REFRESH

    def set_link(self, attached: protocol.RelayInfo | None, reachable: bool | None) -> None:
        with self._lock:
            if (attached, reachable) == (self.attached, self.reachable):
                return
            self.attached, self.reachable = attached, reachable
        self.changed.set()

    def hints(self) -> list[protocol.ConnectionHint]:
        """Direct first; the relay when attached and needed (`always`, or `auto` once the
        probe found this peer unreachable)."""
        hints = [protocol.ConnectionHint("direct", self.advertise)]
        with self._lock:
            relay, reachable = self.attached, self.reachable
        if relay is not None and (self.mode == "always" or reachable is False):
            hints.append(protocol.ConnectionHint("relay", relay.endpoint, relay.key))
        return hints


class RelayLink:
    """The server loop's side: owns the DEALER to the relay. Not thread-safe."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], identity: Identity, state: RelayState
    ) -> None:
        self._context = context
        self._identity = identity
        self._state = state
        self.sock: zmq.Socket[bytes] | None = None
        self.data_sock: zmq.Socket[bytes] | None = None  # the data leg, once offered
        self._relay: protocol.RelayInfo | None = None
        self._next = 0  # which relay of the grant to try next
        self._attached = False
        self._heard = 0.0  # when the relay last answered
        self._pinged = 0.0
        self._retry_at = 0.0

    def tick(self, now: float) -> None:
        """Connect, keep alive, or notice a lost relay; called from the loop often."""
        if self.sock is None:
            if now >= self._retry_at:
                self._connect(now)
            return
        if now - self._heard > LOST_AFTER:
            log.warning("lost the relay %s; reconnecting", self._where())
            self._drop(now)
            return
        if self._attached and now - self._pinged >= KEEPALIVE:
            self._pinged = now
            self._control("keepalive", relay_protocol.KeepAlive(), _KEEPALIVE)

    def _connect(self, now: float) -> None:
        grant = self._state.grant()
        if grant is None or not grant.relays:
            self._retry_at = now + RETRY_AFTER
            return
        relay = grant.relays[self._next % len(grant.relays)]
        self._next += 1
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = MAX_CHUNK_SIZE + 64 * 1024
        sock.ipv6 = protocol.is_ipv6_literal(relay.endpoint)
        sock.curve_serverkey = zmq.utils.z85.encode(relay.key)
        sock.curve_publickey = self._identity.curve_public_z85
        sock.curve_secretkey = self._identity.curve_secret_z85
        sock.connect(relay.endpoint)
        self.sock, self._relay = sock, relay
        self._heard = self._pinged = now
        self._control("attach", relay_protocol.Attach(grant.ticket, grant.signature), _ATTACH)

    def _drop(self, now: float) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self._close_data()
        self.sock, self._attached = None, False
        self._retry_at = now + RETRY_AFTER
        self._state.set_link(None, self._state.reachable)

    def _control(self, op: str, body: Record, rid: int) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):  # if lost, the keepalive's silence tells
            self.sock.send(protocol.encode(op, body, rid), flags=zmq.NOBLOCK)

    def _where(self) -> str:
        return self._relay.endpoint if self._relay is not None else "?"

    def receive(self) -> list[tuple[bytes, bytes | None, bytes]]:
        """The requests that came through the relay: (connection, requester key, frame)."""
        requests: list[tuple[bytes, bytes | None, bytes]] = []
        while self.sock is not None:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.monotonic()
            self._heard = now
            if len(frames) == 3 and len(frames[0]) == relay_protocol.CIRCUIT_ID_SIZE:
                if len(frames[1]) == 32:
                    requests.append((CIRCUIT_PREFIX + frames[0], frames[1], frames[2]))
            elif len(frames) == 1:
                self._answer(frames[0], now)
        return requests

    def _answer(self, frame: bytes, now: float) -> None:
        try:
            envelope = protocol.decode_envelope(frame)
            if envelope.op == "error":
                protocol.raise_for_error(envelope, f"relay {self._where()}")
            if envelope.rid == _ATTACH:
                self._attached = True
                log.info("serving through the relay %s too", self._where())
                self._open_data(envelope.body)
                self._state.set_link(self._relay, self._state.reachable)
                if self._state.mode == "auto" and self._state.reachable is None:
                    self._control("probe", relay_protocol.Probe(), _PROBE)
            elif envelope.rid == _PROBE:
                result = from_wire(relay_protocol.ProbeResult, envelope.body, "probe")
                word = "reachable" if result.reachable else "not reachable from outside"
                log.info("%s is %s", result.endpoint or "this peer", word)
                self._state.set_link(self._relay, result.reachable)
        except ProtocolError as exc:
            log.debug("odd message from the relay: %s", exc)
        except RemoteError as exc:  # a refusal: say it; unless of a probe, attach again
            log.warning("%s", exc)
            if envelope.rid != _PROBE:  # e.g. "attach first": a relay restarted meanwhile
                self._drop(now)

    def _open_data(self, body: object) -> None:
        """Connect the data leg the attach answer offers, if it offers one."""
        self._close_data()
        try:
            leg = from_wire(relay_protocol.DataLeg, body, "attach")
        except ProtocolError:
            return  # an older relay: chunks stay on the circuits
        assert self._relay is not None
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = 1024  # requests only; chunks go the other way
        sock.ipv6 = protocol.is_ipv6_literal(self._relay.endpoint)
        sock.sndhwm = 1000
        sock.connect(relay_protocol.data_leg_endpoint(self._relay.endpoint, leg.port))
        sock.send(leg.ticket)
        self.data_sock = sock

    def _close_data(self) -> None:
        if self.data_sock is not None:
            self.data_sock.close(linger=0)
            self.data_sock = None

    def receive_data(self) -> list[tuple[bytes, bytes]]:
        """What came on the data leg: (data connection, frame)."""
        received: list[tuple[bytes, bytes]] = []
        while self.data_sock is not None:
            try:
                frames = self.data_sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 2 and len(frames[0]) == relay_protocol.CIRCUIT_ID_SIZE:
                received.append((DATA_CIRCUIT_PREFIX + frames[0], frames[1]))
            elif len(frames) == 1:  # the relay's answer to the ticket
                try:
                    protocol.raise_for_error(protocol.decode_envelope(frames[0]), "relay")
                    log.debug("the relay's data leg is open")
                except (ProtocolError, RemoteError) as exc:
                    log.warning("no data leg at the relay: %s", exc)
                    self._close_data()
        return received

    def send_data(self, connection: bytes, replies: list[bytes]) -> bool:
        """Answer a relayed requester's data connection; False when the relay cannot take
        it."""
        if self.data_sock is None:
            return False
        circuit = connection[len(DATA_CIRCUIT_PREFIX) :]
        try:
            self.data_sock.send_multipart([circuit, *replies], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            return False
        return True

    def send(self, connection: bytes, replies: list[bytes]) -> bool:
        """Answer a relayed requester; False when the relay cannot take it."""
        if self.sock is None:
            return False
        circuit = connection[len(CIRCUIT_PREFIX) :]
        try:
            self.sock.send_multipart([circuit, *replies], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        self._close_data()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def is_relayed(connection: bytes) -> bool:
    return connection.startswith(CIRCUIT_PREFIX)


def is_relayed_data(connection: bytes) -> bool:
    return connection.startswith(DATA_CIRCUIT_PREFIX)
