"""What both servers need from CurveZMQ: a ZAP handler that lets any client key in (the
signed messages decide who a client is), and the key it saw on each frame."""

from __future__ import annotations

import functools
import logging

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator


def start_authenticator(context: zmq.Context[zmq.Socket[bytes]], name: str) -> ThreadAuthenticator:
    """A running ZAP handler for `context` that accepts every CurveZMQ client key;
    without one, frames carry no client key. Stop it when the server stops."""
    authenticator = ThreadAuthenticator(context, log=logging.getLogger(name))
    authenticator.start()
    authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    return authenticator


def client_key(frame: zmq.Frame) -> bytes | None:
    """The sender's CurveZMQ public key (raw 32 bytes), as the ZAP handler reported it."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return _z85_key(str(user_id)) if user_id else None


@functools.lru_cache(maxsize=4096)
def _z85_key(user_id: str) -> bytes:
    """Decoded once per client (z85 is decoded in Python): a broker sees the same
    keys again and again."""
    return bytes(zmq.utils.z85.decode(user_id))
