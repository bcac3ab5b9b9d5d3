"""The broker client: request/reply over a CurveZMQ DEALER socket, with timeouts.

Each call sends one envelope and waits for the reply with the same request id; replies
are validated into the expected result record, since a broker is network input too.

A deployment may run several brokers over one database. The client is given their
endpoints, starts at a random one (so clients spread over them) and stays with it
while it answers. A broker that does not answer in time, or whose connection drops
while a reply is awaited, is left for the next one, and the request goes there: every
broker answers every request alike, since they share the database. The requests that
redeem a challenge (`register`, `device_login`) are not sent twice, since the first
broker may have redeemed it: their callers start again with a fresh challenge.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from typing import TypeVar

import nacl.public
import zmq
import zmq.utils.z85

from sfs.common import protocol
from sfs.common.codec import Record, from_wire
from sfs.common.errors import ProtocolError, RemoteError, TransportError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import ErrorCode
from sfs.peer.zmq_events import next_event

R = TypeVar("R", bound=Record)

log = logging.getLogger("sfs.peer")

BUSY_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds between tries while the broker is busy
# Sent once: the broker that timed out may have redeemed the challenge they carry.
NOT_REPEATED = frozenset({"register", "device_login"})
# A connection lost (or refused) while a reply is awaited: that broker is gone, so with
# another one to ask, waiting out the timeout would only make failover slow.
_GONE_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


class BrokerUnreachable(TransportError):
    """A broker did not answer in time (or its connection dropped)."""


class BrokerVersionMismatch(ProtocolError):
    """The broker speaks another protocol version: one side must upgrade."""


class BrokerClient:
    def __init__(
        self,
        endpoint: str | Sequence[str],
        server_key: bytes,
        transport_key: nacl.public.PrivateKey | None = None,
        timeout: float = 10.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """`endpoint`: one broker, or every broker of the deployment (they share one
        key pair, `server_key`: z85). Without a `transport_key` the client uses a
        throwaway one (enough for ping and for tests)."""
        self.endpoints = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
        if not self.endpoints:
            raise ValueError("no broker endpoint")
        self._at = random.randrange(len(self.endpoints))  # noqa: S311 (spreading, not secrets)
        self._server_key = server_key
        self._key = transport_key or nacl.public.PrivateKey.generate()
        self._timeout_ms = int(timeout * 1000)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)
        self._version_checked = False  # once per client: the brokers share one database

    @property
    def endpoint(self) -> str:
        """The broker this client talks to now."""
        return self.endpoints[self._at]

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._drop_socket()
        if self._own_context:
            self._context.term()

    def _drop_socket(self) -> None:
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._socket.close(linger=0)
            self._socket = None

    def _connected(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.linger = 0
            sock.maxmsgsize = protocol.MAX_BROKER_FRAME
            sock.ipv6 = protocol.is_ipv6_literal(self.endpoint)
            sock.curve_serverkey = self._server_key
            sock.curve_secretkey = zmq.utils.z85.encode(bytes(self._key))
            sock.curve_publickey = zmq.utils.z85.encode(bytes(self._key.public_key))
            if len(self.endpoints) > 1:
                self._monitor = sock.get_monitor_socket(_GONE_EVENTS)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _fail_over(self) -> None:
        """Leave this broker: the next call goes to the next one in the list."""
        self._drop_socket()
        self._at = (self._at + 1) % len(self.endpoints)

    def call(self, op: str, request: Record, result_type: type[R]) -> R:
        """Send one request; return its validated result or raise `RemoteError`.

        A `busy` answer means the broker did nothing yet, so it is retried a few times.
        A broker that does not answer is left for the next one, which gets the request
        (once each; `NOT_REPEATED` requests are not sent again).
        """
        tried: list[str] = []
        while True:
            tried.append(self.endpoint)
            try:
                return self._call_until_not_busy(op, request, result_type)
            except BrokerUnreachable as exc:
                if len(tried) >= len(self.endpoints) or op in NOT_REPEATED:
                    if len(tried) > 1:
                        raise BrokerUnreachable(
                            f"no answer from any of the brokers ({', '.join(tried)}) within"
                            f" {self._timeout_ms // 1000} s each (are they running, and is"
                            " their public key right?)"
                        ) from exc
                    raise
                log.info("%s; trying the broker at %s", exc, self.endpoint)

    def _call_until_not_busy(self, op: str, request: Record, result_type: type[R]) -> R:
        for delay in BUSY_RETRY_DELAYS:
            try:
                return self._call_once(op, request, result_type)
            except RemoteError as exc:
                if exc.code != ErrorCode.BUSY:
                    raise
            time.sleep(delay)
        return self._call_once(op, request, result_type)

    def _call_once(self, op: str, request: Record, result_type: type[R]) -> R:
        rid = next(self._rids)
        sock = self._connected()
        self._forget_old_events()
        sock.send(protocol.encode(op, request, rid))
        deadline = time.monotonic() + self._timeout_ms / 1000
        while True:
            if not self._wait(sock, deadline):
                # The request may still be queued: start afresh for the next call.
                where = self.endpoint
                self._fail_over()
                raise BrokerUnreachable(
                    f"no answer from the broker at {where} within "
                    f"{self._timeout_ms // 1000} s (is it running, and is its public key right?)"
                )
            envelope = protocol.decode_envelope(sock.recv())
            if envelope.rid == rid:
                break  # earlier replies belong to requests that timed out
        protocol.raise_for_error(envelope, "broker")
        if envelope.op != "result":
            raise ProtocolError(f"the broker sent an unexpected {envelope.op[:40]!r} reply")
        return from_wire(result_type, envelope.body, "broker reply")

    def _wait(self, sock: zmq.Socket[bytes], deadline: float) -> bool:
        """Whether a reply is there before `deadline`; False also as soon as the
        connection is lost while there is another broker to ask."""
        if self._monitor is None:
            return bool(sock.poll(max(0, int((deadline - time.monotonic()) * 1000))))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000) + 1))
            if sock in ready:
                return True
            if self._monitor in ready and self._connection_lost():
                return False
        return False

    def _connection_lost(self) -> bool:
        assert self._monitor is not None
        lost = False
        while self._monitor.poll(0):
            lost = bool(next_event(self._monitor) & _GONE_EVENTS) or lost
        return lost

    def _forget_old_events(self) -> None:
        """Events from before this request say nothing about it."""
        if self._monitor is not None:
            self._connection_lost()

    # --- one method per request --------------------------------------------------------

    def ping(self) -> protocol.PingResult:
        return self.call("ping", protocol.Ping(), protocol.PingResult)

    def check_version(self) -> None:
        """Refuse a broker of another protocol version, before anything is sent that it
        could misread (docs/PROTOCOL-v2.md §1). Its `ping` answer says which: a result
        with its version, a reply in its own envelope, or an `upgrade` error. Asked once
        per client."""
        if self._version_checked:
            return
        try:
            version = self.ping().version
        except protocol.VersionMismatch as exc:
            version = exc.version
        except RemoteError as exc:
            if exc.code != ErrorCode.UPGRADE:
                raise
            raise BrokerVersionMismatch(
                f"upgrade sfs: the broker at {self.endpoint} speaks another protocol version,"
                f" this peer speaks {protocol.VERSION} ({exc})"
            ) from exc
        if version != protocol.VERSION:
            raise BrokerVersionMismatch(
                f"upgrade sfs: the broker at {self.endpoint} speaks protocol version {version},"
                f" this peer speaks {protocol.VERSION}"
            )
        self._version_checked = True

    def challenge(self) -> bytes:
        return self.call("challenge", protocol.GetChallenge(), protocol.ChallengeResult).challenge

    def register(
        self,
        username: str,
        password: str,
        bundle: KeyBundle,
        challenge: bytes,
        signature: bytes,
    ) -> protocol.SessionResult:
        request = protocol.Register(username, password, bundle, challenge, signature)
        return self.call("register", request, protocol.SessionResult)

    def login(self, username: str, password: str) -> protocol.SessionResult:
        return self.call("login", protocol.Login(username, password), protocol.SessionResult)

    def device_login(
        self, username: str, challenge: bytes, signature: bytes
    ) -> protocol.SessionResult:
        request = protocol.DeviceLogin(username, challenge, signature)
        return self.call("device_login", request, protocol.SessionResult)

    def logout(self, token: str) -> None:
        self.call("logout", protocol.Logout(token), protocol.Empty)

    def heartbeat(self, token: str, endpoint: str) -> int:
        result = self.call(
            "heartbeat", protocol.Heartbeat(token, endpoint), protocol.HeartbeatResult
        )
        return result.ttl

    def heartbeat_hints(
        self, token: str, endpoint: str, hints: list[protocol.ConnectionHint]
    ) -> int:
        request = protocol.Heartbeat(token, endpoint, hints)
        return self.call("heartbeat", request, protocol.HeartbeatResult).ttl

    def relay_grant(self, token: str, endpoints: list[str]) -> protocol.RelayGrantResult:
        request = protocol.RelayGrant(token, endpoints)
        return self.call("relay_grant", request, protocol.RelayGrantResult)

    def ticket(self, token: str, file_id: str, holder: str) -> tuple[bytes, bytes]:
        """A ticket (and the broker's signature) for a relay circuit to `holder`."""
        result = self.call(
            "ticket", protocol.GetTicket(token, file_id, holder), protocol.TicketResult
        )
        return result.ticket, result.signature

    def offline(self, token: str) -> None:
        self.call("offline", protocol.GoOffline(token), protocol.Empty)

    def publish(
        self,
        token: str,
        manifest: bytes,
        signature: bytes,
        access: list[str] | None,
        grant: bytes,
    ) -> str:
        request = protocol.Publish(token, manifest, signature, access, grant)
        return self.call("publish", request, protocol.PublishResult).file_id

    def hold(self, token: str, file_id: str) -> None:
        self.call("hold", protocol.Hold(token, file_id), protocol.Empty)

    def release(self, token: str, file_id: str) -> None:
        self.call("release", protocol.Release(token, file_id), protocol.Empty)

    def unpublish(self, token: str, file_id: str) -> None:
        self.call("unpublish", protocol.Unpublish(token, file_id), protocol.Empty)

    def search(
        self, token: str, query: str = "", owner: str | None = None, limit: int = 100
    ) -> list[protocol.SearchHit]:
        return self.find(token, query, owner, limit).hits

    def find(
        self, token: str, query: str = "", owner: str | None = None, limit: int = 100
    ) -> protocol.SearchResult:
        """A search's hits and whether it is partial (the broker's budget ran out)."""
        request = protocol.Search(token, query, owner, limit)
        return self.call("search", request, protocol.SearchResult)

    def lookup(self, token: str, file_id: str) -> protocol.LookupResult:
        return self.call("lookup", protocol.Lookup(token, file_id), protocol.LookupResult)

    def resolve(self, token: str, prefix: str) -> list[protocol.IdMatch]:
        """The files visible to this user whose id starts with `prefix`."""
        matches = self.call("resolve", protocol.Resolve(token, prefix), protocol.ResolveResult)
        if any(not m.file_id.startswith(prefix) for m in matches.matches):
            raise ProtocolError(
                "the broker answered an id prefix with ids that do not start with it"
            )
        return matches.matches

    def bundle(self, token: str, username: str) -> KeyBundle:
        request = protocol.GetBundle(token, username)
        result = self.call("bundle", request, protocol.BundleResult)
        if result.username != username:
            raise ProtocolError("the broker answered with another user's key bundle")
        return result.bundle
