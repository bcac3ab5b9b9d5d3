"""The connections of a plain ROUTER (NULL mechanism) that anyone may open, watched by
file descriptor until each proves what it is for: the holder's data port (an attach)
and the relay's (a data ticket).

ZeroMQ cannot close one peer of a ROUTER, so the socket's monitor (accepted / gone, with
the file descriptor) and each message's descriptor (`ZMQ_SRCFD`) tell the connections
apart, and one is closed by shutting its TCP connection down: ZeroMQ notices and closes
it. Only descriptors the monitor announced are shut, and only for the identity (key or
routing id) first seen on them: a message read after its connection closed (its
descriptor number since reused) cannot cut another connection.

The connections still waiting to prove themselves are bounded: each for `deadline`
seconds; at most `max_waiting` of them, `max_per_source` from one source; a new
connection beyond either closes the oldest one waiting (an honest end proves itself
within a round trip, a squatter's connections age).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message


@dataclass
class Watched:
    accepted: float
    source: str  # where it comes from (an address, or an address group)
    identity: bytes | None = None  # its key or routing id, from its first message
    proof: bytes | None = None  # once it proved itself (what it proved: a transfer id)


class WatchedConnections:
    """The table of one ROUTER's connections; for the thread that owns the socket."""

    def __init__(
        self,
        *,
        deadline: float,
        max_waiting: int,
        max_per_source: int,
        waiting_for: str,
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`waiting_for`: what the waiting ones wait for, in the log ("to attach")."""
        self._deadline = deadline
        self._max_waiting = max_waiting
        self._max_per_source = max_per_source
        self._waiting_for = waiting_for
        self._log = log
        self._clock = clock
        self._connections: dict[int, Watched] = {}  # by file descriptor

    @property
    def waiting(self) -> int:
        return sum(1 for c in self._connections.values() if c.proof is None)

    def watch(self, monitor: zmq.Socket[bytes], source_of: Callable[[int], str]) -> None:
        """Take the monitor's news: connections accepted (`source_of` their descriptor
        says where from) and gone."""
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.accepted(fd, source_of(fd))
            else:
                self._connections.pop(fd, None)

    def accepted(self, fd: int, source: str) -> None:
        """A new connection on `fd` from `source`: make room for it among those waiting."""
        self._connections.pop(fd, None)  # its old connection's news was missed
        waiting = sorted(
            (c.accepted, other) for other, c in self._connections.items() if c.proof is None
        )
        same = [item for item in waiting if self._connections[item[1]].source == source]
        if len(same) >= self._max_per_source:
            self._log.info(
                "closed a data connection: too many waiting %s from one address", self._waiting_for
            )
            self.close(same[0][1])
        elif len(waiting) >= self._max_waiting:
            self._log.info("closed a data connection: too many waiting %s", self._waiting_for)
            self.close(waiting[0][1])
        self._connections[fd] = Watched(self._clock(), source)

    def get(self, fd: int) -> Watched | None:
        return self._connections.get(fd)

    def identify(self, fd: int, identity: bytes) -> Watched | None:
        """The connection on `fd`, if the monitor announced it; the first identity seen
        on it is recorded (compare it with `identity` to know the message is its own)."""
        connection = self._connections.get(fd)
        if connection is not None and connection.identity is None:
            connection.identity = identity
        return connection

    def proved(self, fd: int, proof: bytes) -> None:
        connection = self._connections.get(fd)
        if connection is not None:
            connection.proof = proof

    def close(self, fd: int) -> None:
        del self._connections[fd]
        shut_down(fd)

    def sweep(self, alive: Callable[[bytes], bool] = lambda proof: True) -> None:
        """Close the connections still waiting past the deadline, and those whose proof
        is no longer `alive` (a transfer ended)."""
        too_old = self._clock() - self._deadline
        for fd, connection in list(self._connections.items()):
            if connection.proof is None:
                if connection.accepted < too_old:
                    self.close(fd)
            elif not alive(connection.proof):
                self.close(fd)


def peer_address(fd: int) -> str:
    """The address at the other end of `fd`, without the port ("" if it is gone)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return ""
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return ""
    with sock:
        try:
            address = sock.getpeername()
        except OSError:
            return ""
    return str(address[0]) if isinstance(address, tuple) else str(address)


def shut_down(fd: int) -> None:
    """Shut the TCP connection on `fd` down (on a duplicate of the descriptor, so
    ZeroMQ's own stays untouched); ZeroMQ notices and closes it."""
    try:
        dup = os.dup(fd)
    except OSError:
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
