"""The relay's data port's connections, watched (docs/SECURITY.md, The relay).

Anyone may connect to the data port (NULL mechanism); a connection is worth keeping
only once it gave a data ticket. So a connection that has not must give one within
`TICKET_DEADLINE` seconds of being accepted (and finish ZeroMQ's greeting within the
same time: the socket's `handshake_ivl`); at most `MAX_WAITING` connections may wait
for theirs, `MAX_WAITING_PER_SOURCE` from one address (IPv4, or IPv6 /64). A new
connection beyond either closes the oldest one waiting. A leg whose circuit or holder is
gone is closed too. The bookkeeping is the holder's data port's
(`sfs.common.watched_connections`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import zmq

from sfs.broker.throttle import address_group
from sfs.common.watched_connections import WatchedConnections, peer_address

log = logging.getLogger("sfs.relay")

TICKET_DEADLINE = 5.0  # seconds from accept to a data ticket
MAX_WAITING = 128
MAX_WAITING_PER_SOURCE = 16


class DataConnections:
    """The data socket's connections; for the relay's thread."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        deadline: float = TICKET_DEADLINE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connections = WatchedConnections(
            deadline=deadline,
            max_waiting=MAX_WAITING,
            max_per_source=MAX_WAITING_PER_SOURCE,
            waiting_for="for a ticket",
            log=log,
            clock=clock,
        )
        sock.handshake_ivl = max(1, round(deadline * 1000))
        self._sock = sock
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )

    def watch(self) -> None:
        """Take the monitor's news: connections accepted and gone."""
        self._connections.watch(self.monitor, lambda fd: address_group(peer_address(fd)))

    def known(self, fd: int, routing_id: bytes) -> bool:
        """Whether a message from `routing_id` on `fd` comes from a connection the
        monitor announced (and the first routing id seen on it)."""
        self.watch()  # the monitor announces a connection before its first message
        connection = self._connections.identify(fd, routing_id)
        return connection is not None and connection.identity == routing_id

    def ticketed(self, fd: int) -> None:
        self._connections.proved(fd, b"")

    def close(self, fd: int, routing_id: bytes) -> None:
        """Close the connection of `routing_id` on `fd`, if it is still that one."""
        connection = self._connections.get(fd)
        if connection is not None and connection.identity == routing_id:
            self._connections.close(fd)

    def sweep(self) -> None:
        """Close the connections that did not give a ticket in time."""
        self.watch()  # first: a descriptor may have been closed and reused meanwhile
        self._connections.sweep()

    def stop(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self.monitor.close(linger=0)
