"""zmq socket-monitor events, read without `zmq.utils.monitor`: that module imports
zmq.asyncio, and so asyncio, which would cost every `get` its import time."""

from __future__ import annotations

import struct

import zmq

from sfs.common.errors import TransportError


def next_event(monitor: zmq.Socket[bytes]) -> int:
    """The event number of the next message on a monitor socket (`get_monitor_socket`):
    two frames, the first `uint16 event, int32 value` in native byte order."""
    frames = monitor.recv_multipart()
    if len(frames) != 2 or len(frames[0]) != 6:
        raise TransportError("zmq sent a malformed socket monitor event")
    event: int = struct.unpack("=Hi", frames[0])[0]
    return event
