"""`DataPort`'s connection table: which connection makes room when too many wait to
attach, and which descriptors it will shut. Real sockets (socket pairs stand for
accepted connections), a real ROUTER for the descriptor checks."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import zmq

from sfs.peer.data_port import MAX_UNATTACHED, MAX_UNATTACHED_PER_SOURCE, DataPort, data_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every connection is younger than the one before
        return self.now


@pytest.fixture
def port() -> Iterator[DataPort]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    data = DataPort(context, "tcp://127.0.0.1:0", 16, 16, clock=Clock())
    try:
        yield data
    finally:
        data.close()
        context.destroy(linger=0)


def pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    made = [socket.socketpair() for _ in range(count)]
    for _, far in made:
        far.settimeout(2.0)
    return made


def is_shut(far: socket.socket) -> bool:
    """The other end of a pair: shut if it reads end of stream."""
    far.setblocking(False)
    try:
        return far.recv(1) == b""
    except BlockingIOError:
        return False
    finally:
        far.settimeout(2.0)


def test_a_full_pool_evicts_the_oldest_waiting_not_the_newest(port: DataPort) -> None:
    sources = [f"10.0.0.{i}" for i in range(MAX_UNATTACHED)]  # under the per-source cap
    made = pairs(MAX_UNATTACHED + 2)
    try:
        for (near, _), source in zip(made, [*sources, "10.0.1.1", "10.0.1.2"], strict=True):
            port.accepted(near.fileno(), source)
        assert port.unattached == MAX_UNATTACHED
        assert [is_shut(far) for _, far in made] == [True, True] + [False] * MAX_UNATTACHED
    finally:
        for near, far in made:
            near.close()
            far.close()


def test_one_address_waits_with_at_most_its_share(port: DataPort) -> None:
    made = pairs(MAX_UNATTACHED_PER_SOURCE + 3)
    try:
        for near, _ in made:
            port.accepted(near.fileno(), "192.0.2.7")
        (other_near, other_far), *_ = extra = pairs(1)
        port.accepted(other_near.fileno(), "192.0.2.8")
        assert port.unattached == MAX_UNATTACHED_PER_SOURCE + 1
        assert [is_shut(far) for _, far in made] == [True] * 3 + [False] * MAX_UNATTACHED_PER_SOURCE
        assert not is_shut(other_far)
        made += extra
    finally:
        for near, far in made:
            near.close()
            far.close()


def test_attached_connections_are_not_counted_or_evicted(port: DataPort) -> None:
    made = pairs(MAX_UNATTACHED_PER_SOURCE + 1)
    try:
        first, _ = made[0]
        port.accepted(first.fileno(), "192.0.2.7")
        port.attached(first.fileno(), b"t" * 16)
        for near, _ in made[1:]:
            port.accepted(near.fileno(), "192.0.2.7")
        assert port.unattached == MAX_UNATTACHED_PER_SOURCE
        assert not any(is_shut(far) for _, far in made)
    finally:
        for near, far in made:
            near.close()
            far.close()


def test_only_descriptors_in_the_table_are_shut_and_only_for_their_connection(
    port: DataPort,
) -> None:
    """A message read after its connection closed carries a descriptor number that may
    belong to another connection now (or to none): closing "its" connection must not
    cut that one."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    stranger, stranger_far = socket.socketpair()
    try:
        dealer.linger = 0
        dealer.reconnect_ivl = -1
        dealer.connect(port.endpoint)
        dealer.send(b"hello")
        assert port.sock.poll(5000)
        received = port.receive()
        assert received is not None
        key, payload, fd = received
        assert payload == b"hello" and port.unattached == 1
        # Not in the table: left alone.
        port.close_connection(stranger.fileno(), key)
        assert not is_shut(stranger_far)
        # In the table, but the message was another connection's: left alone.
        port.close_connection(fd, data_key(b"someone else"))
        assert not monitor.poll(300)
        # Its own: shut.
        port.close_connection(fd, key)
        assert monitor.poll(5000), "the connection stayed open"
    finally:
        stranger.close()
        stranger_far.close()
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)
        context.destroy(linger=0)
