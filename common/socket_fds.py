"""A ZeroMQ socket's TCP connections, by file descriptor (as its monitor and `ZMQ_SRCFD`
name them): who is at the other end, and shutting one down.

ZeroMQ cannot close one peer of a ROUTER; shutting the TCP connection down makes it
notice and close it. Each call works on a duplicate of the descriptor, so ZeroMQ's own
stays untouched, and a descriptor that is already gone is no error.
"""

from __future__ import annotations

import contextlib
import os
import socket


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
    """Shut the TCP connection on `fd` down; ZeroMQ notices and closes it."""
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
