"""The broker client: request/reply over a CurveZMQ DEALER socket, with timeouts.

Each call sends one envelope and waits for the reply with the same request id; replies
are validated into the expected result record, since a broker is network input too.
"""

from __future__ import annotations

import itertools
import time
from typing import TypeVar

import nacl.public
import zmq
import zmq.utils.z85

from sfs.common import protocol
from sfs.common.codec import Record, from_wire
from sfs.common.errors import ProtocolError, RemoteError, TransportError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import ErrorCode

R = TypeVar("R", bound=Record)

BUSY_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds between tries while the broker is busy


class BrokerClient:
    def __init__(
        self,
        endpoint: str,
        server_key: bytes,
        transport_key: nacl.public.PrivateKey | None = None,
        timeout: float = 10.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """`server_key`: the broker's z85 public key. Without a `transport_key` the
        client uses a throwaway one (enough for ping and for tests)."""
        self.endpoint = endpoint
        self._server_key = server_key
        self._key = transport_key or nacl.public.PrivateKey.generate()
        self._timeout_ms = int(timeout * 1000)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)

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
            self._socket.close(linger=0)
            self._socket = None

    def _connected(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.linger = 0
            sock.maxmsgsize = protocol.MAX_BROKER_FRAME
            sock.curve_serverkey = self._server_key
            sock.curve_secretkey = zmq.utils.z85.encode(bytes(self._key))
            sock.curve_publickey = zmq.utils.z85.encode(bytes(self._key.public_key))
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def call(self, op: str, request: Record, result_type: type[R]) -> R:
        """Send one request; return its validated result or raise `RemoteError`.

        A `busy` answer means the broker did nothing yet, so it is retried a few times.
        """
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
        sock.send(protocol.encode(op, request, rid))
        while True:
            if not sock.poll(self._timeout_ms):
                # The request may still be queued: start afresh for the next call.
                self._drop_socket()
                raise TransportError(
                    f"no answer from the broker at {self.endpoint} within "
                    f"{self._timeout_ms // 1000} s (is it running, and is its public key right?)"
                )
            envelope = protocol.decode_envelope(sock.recv())
            if envelope.rid == rid:
                break  # earlier replies belong to requests that timed out
        protocol.raise_for_error(envelope, "broker")
        if envelope.op != "result":
            raise ProtocolError(f"the broker sent an unexpected {envelope.op[:40]!r} reply")
        return from_wire(result_type, envelope.body, "broker reply")

    # --- one method per request --------------------------------------------------------

    def ping(self) -> protocol.PingResult:
        return self.call("ping", protocol.Ping(), protocol.PingResult)

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
        request = protocol.Search(token, query, owner, limit)
        return self.call("search", request, protocol.SearchResult).hits

    def lookup(self, token: str, file_id: str) -> protocol.LookupResult:
        return self.call("lookup", protocol.Lookup(token, file_id), protocol.LookupResult)

    def bundle(self, token: str, username: str) -> KeyBundle:
        request = protocol.GetBundle(token, username)
        result = self.call("bundle", request, protocol.BundleResult)
        if result.username != username:
            raise ProtocolError("the broker answered with another user's key bundle")
        return result.bundle
