"""The holder's data port: where requesters open the data connection of a transfer
(docs/PROTOCOL-v2.md section 4), beside the CurveZMQ control port.

It is a plain ROUTER (ZMTP, NULL mechanism): the chunks it carries are AES-GCM sealed end
to end, so CurveZMQ would only encrypt them a second time. Anyone may connect, so the
work before a connection proves it belongs to a transfer is bounded here:

- frames are at most `MAX_DATA_REQUEST_FRAME` bytes (an attach or a chunk request);
- a connection must attach within `ATTACH_DEADLINE` seconds of being accepted;
- at most `MAX_UNATTACHED` connections may wait to attach, and `MAX_UNATTACHED_PER_SOURCE`
  from one address: a new connection beyond either evicts the oldest one waiting (an
  honest requester attaches within a round trip, a squatter's connections age);
- a connection whose first message is not a valid attach is closed, and so is one whose
  transfer has ended.

The connections are watched by file descriptor, as the relay's data port's are
(`sfs.common.watched_connections`, which says how one is closed safely).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import zmq

from sfs.common.watched_connections import WatchedConnections, peer_address

log = logging.getLogger("sfs.peer")

MAX_DATA_REQUEST_FRAME = 1024  # an attach is ~80 bytes, a chunk request ~40
ATTACH_DEADLINE = 5.0  # seconds from accept to a valid attach
MAX_UNATTACHED = 32
MAX_UNATTACHED_PER_SOURCE = 8
# Data connections are told apart from control connections by this prefix of their
# key: it is longer than any ZeroMQ routing id (255 bytes), so no control connection can
# choose a routing id that names a data connection.
DATA_KEY_PREFIX = b"\xffdata" + bytes(255)


def data_key(routing_id: bytes) -> bytes:
    return DATA_KEY_PREFIX + routing_id


def routing_id_of(key: bytes) -> bytes | None:
    """The data connection's routing id, or None for a control connection's key."""
    if key.startswith(DATA_KEY_PREFIX):
        return key[len(DATA_KEY_PREFIX) :]
    return None


def data_endpoint(listen: str) -> str:
    """The default data endpoint: `listen`'s host, any free port."""
    return listen.rsplit(":", 1)[0] + ":0"


def advertised(advertise: str, bound: str) -> str:
    """The data endpoint as requesters reach it: `advertise`'s host, the bound port."""
    return advertise.rsplit(":", 1)[0] + ":" + bound.rsplit(":", 1)[1]


class DataPort:
    """The data ROUTER and its connections' bookkeeping; for one thread (the loop)."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        listen: str,
        send_queue: int,
        receive_queue: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connections = WatchedConnections(
            deadline=ATTACH_DEADLINE,
            max_waiting=MAX_UNATTACHED,
            max_per_source=MAX_UNATTACHED_PER_SOURCE,
            waiting_for="to attach",
            log=log,
            clock=clock,
        )
        self.sock = context.socket(zmq.ROUTER)
        self.monitor: zmq.Socket[bytes] | None = None
        try:
            self.sock.linger = 0
            self.sock.maxmsgsize = MAX_DATA_REQUEST_FRAME
            self.sock.ipv6 = True
            self.sock.sndhwm = send_queue
            self.sock.rcvhwm = receive_queue
            self.sock.router_mandatory = True
            self.sock.handshake_ivl = round(ATTACH_DEADLINE * 1000)
            self.monitor = self.sock.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
            )
            self.sock.bind(listen)
        except BaseException:
            self.close()
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def unattached(self) -> int:
        return self._connections.waiting

    def watch(self) -> None:
        """Take the monitor's news: connections accepted and gone. A connection beyond
        `MAX_UNATTACHED` waiting (or `MAX_UNATTACHED_PER_SOURCE` from its address)
        evicts the oldest one waiting."""
        assert self.monitor is not None
        self._connections.watch(self.monitor, peer_address)

    def accepted(self, fd: int, source: str) -> None:
        """A new connection on `fd` from `source`: make room for it among those waiting."""
        self._connections.accepted(fd, source)

    def receive(self) -> tuple[bytes, bytes, int] | None:
        """One message: (connection key, payload, descriptor); None for a malformed
        one (requesters are DEALERs sending one frame at a time) or one whose
        descriptor is not a connection the monitor announced."""
        frames = self.sock.recv_multipart(copy=False)
        key, fd = data_key(frames[0].bytes), int(frames[-1].get(zmq.SRCFD))
        self.watch()  # the monitor announced the connection before its first message
        if self._connections.identify(fd, key) is None:
            return None
        if len(frames) != 2:
            self.close_connection(fd, key)
            return None
        return key, frames[1].bytes, fd

    def attached(self, fd: int, transfer_id: bytes) -> None:
        self._connections.proved(fd, transfer_id)

    def close_connection(self, fd: int, key: bytes) -> None:
        """Close the connection a message with `key` came from on `fd`; nothing if `fd`
        is not in the table or belongs to another connection now."""
        connection = self._connections.get(fd)
        if connection is None or connection.identity not in (None, key):
            log.info("did not close a data connection: its descriptor is not its own")
            return
        self._connections.close(fd)

    def sweep(self, alive: Callable[[bytes], bool]) -> None:
        """Close connections that did not attach in time, and those whose transfer
        ended (finished, expired, evicted or unshared)."""
        self.watch()  # first: a descriptor may have been closed and reused meanwhile
        self._connections.sweep(alive)

    def send(self, key: bytes, replies: list[bytes]) -> None:
        routing_id = routing_id_of(key)
        assert routing_id is not None
        self.sock.send_multipart([routing_id, *replies], flags=zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=0)
