"""The relay's data port's connections, watched (docs/SECURITY.md, The relay).

Anyone may connect to the data port (NULL mechanism); a connection is worth keeping
only once it gave a data ticket. So a connection that has not must give one within
`TICKET_DEADLINE` seconds of being accepted (and finish ZeroMQ's greeting within the
same time: the socket's `handshake_ivl`); at most `MAX_WAITING` connections may wait
for theirs, `MAX_WAITING_PER_SOURCE` from one address (IPv4, or IPv6 /64). A new
connection beyond either closes the oldest one waiting: an honest end gives its ticket
within a round trip, a squatter's connections age. A leg whose circuit or holder is gone
is closed too.

ZeroMQ cannot close one peer of a ROUTER, so, as the holder's data port does
(sfs.peer.data_port), this watches the socket's monitor (accepted / gone, with the file
descriptor), learns each message's descriptor (`ZMQ_SRCFD`), and shuts a connection
down through it. Only descriptors the monitor announced are shut, and only for the
routing id first seen on them: a message read after its connection closed (its
descriptor number since reused) cannot cut another connection.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from sfs.broker.throttle import address_group
from sfs.common.socket_fds import peer_address, shut_down

log = logging.getLogger("sfs.relay")

TICKET_DEADLINE = 5.0  # seconds from accept to a data ticket
MAX_WAITING = 128
MAX_WAITING_PER_SOURCE = 16


@dataclass
class _Connection:
    accepted: float
    source: str  # its address group
    routing_id: bytes | None = None  # from its first message
    ticketed: bool = False


class DataConnections:
    """The data socket's connections; for the relay's thread."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        deadline: float = TICKET_DEADLINE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deadline = deadline
        self._clock = clock
        self._connections: dict[int, _Connection] = {}  # by file descriptor
        sock.handshake_ivl = max(1, round(deadline * 1000))
        self._sock = sock
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )

    def watch(self) -> None:
        """Take the monitor's news: connections accepted and gone."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd, address_group(peer_address(fd)))
            else:
                self._connections.pop(fd, None)

    def _accepted(self, fd: int, source: str) -> None:
        self._connections.pop(fd, None)  # its old connection's news was missed
        waiting = sorted(
            (c.accepted, other) for other, c in self._connections.items() if not c.ticketed
        )
        same = [item for item in waiting if self._connections[item[1]].source == source]
        if len(same) >= MAX_WAITING_PER_SOURCE:
            log.info("closed a data connection: too many waiting for a ticket from one address")
            self._shut(same[0][1])
        elif len(waiting) >= MAX_WAITING:
            log.info("closed a data connection: too many waiting for a ticket")
            self._shut(waiting[0][1])
        self._connections[fd] = _Connection(self._clock(), source)

    def known(self, fd: int, routing_id: bytes) -> bool:
        """Whether a message from `routing_id` on `fd` comes from a connection the
        monitor announced (and the first routing id seen on it)."""
        self.watch()  # the monitor announces a connection before its first message
        connection = self._connections.get(fd)
        if connection is None:
            return False
        if connection.routing_id is None:
            connection.routing_id = routing_id
        return connection.routing_id == routing_id

    def ticketed(self, fd: int) -> None:
        connection = self._connections.get(fd)
        if connection is not None:
            connection.ticketed = True

    def close(self, fd: int, routing_id: bytes) -> None:
        """Close the connection of `routing_id` on `fd`, if it is still that one."""
        connection = self._connections.get(fd)
        if connection is not None and connection.routing_id == routing_id:
            self._shut(fd)

    def sweep(self) -> None:
        """Close the connections that did not give a ticket in time."""
        self.watch()  # first: a descriptor may have been closed and reused meanwhile
        too_old = self._clock() - self._deadline
        for fd, connection in list(self._connections.items()):
            if not connection.ticketed and connection.accepted < too_old:
                self._shut(fd)

    def _shut(self, fd: int) -> None:
        del self._connections[fd]
        shut_down(fd)

    def stop(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self.monitor.close(linger=0)
