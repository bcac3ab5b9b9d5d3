"""A man in the middle for the peer channel: a threaded TCP proxy on 127.0.0.1 that
understands just enough ZMTP 3.x to cut the holder -> receiver byte stream into
messages, and lets a test rewrite that stream.

    with MitmProxy() as proxy:          # listens at once: advertise its port
        proxy.start(holder_port)        # then relay to the holder's real port
        proxy.use(Swap(1, 2))           # every new connection gets this policy

A holder's data connection (chunks, outside CurveZMQ) goes through a second proxy: its
`data_listen` is on another loopback address at the proxy's port, so the offer's data
hint (the `advertise` host, the data port) names the proxy.

Only the NULL mechanism can be read (peer `transport_encryption: false`): with
CurveZMQ every frame after the handshake is encrypted. Receiver -> holder bytes are
relayed untouched. Holder -> receiver: the 64-byte greeting passes through, commands
(READY, PING...) pass through, and each message (its frames up to one without MORE)
goes through the policy, which decides what the receiver gets instead.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

from sfs.common import protocol

GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
_MECHANISM = slice(12, 32)  # in the greeting, after signature (10) and version (2)

Message = list[bytes]  # the frames of one ZMTP message


class Cut(Exception):
    """Raised by a policy: close this connection now and refuse new ones until the
    next `MitmProxy.use`, as if the holder had gone away mid-transfer."""


class Policy:
    """What the receiver gets for each holder message. This one changes nothing;
    attacks override `rewrite`, and count in `fired` how often they struck."""

    def __init__(self) -> None:
        self.fired = 0

    def rewrite(self, message: Message) -> list[Message]:
        return [message]


# --- reading the sfs messages inside ---------------------------------------------------


def envelope_of(message: Message) -> protocol.Envelope:
    return protocol.decode_envelope(message[0])


def chunk_index(message: Message) -> int | None:
    """The index in a chunk message's header; None for any other message."""
    envelope = envelope_of(message)
    return int(envelope.body["index"]) if envelope.op == "chunk" else None


def is_offer(message: Message) -> bool:
    return envelope_of(message).op == "offer"


def flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 1 << bit
    return bytes(changed)


# --- policies ---------------------------------------------------------------------------


class Rewrite(Policy):
    """Each message `select` picks becomes `change(message)`; None drops it."""

    def __init__(
        self, select: Callable[[Message], bool], change: Callable[[Message], Message | None]
    ) -> None:
        super().__init__()
        self._select, self._change = select, change

    def rewrite(self, message: Message) -> list[Message]:
        if not self._select(message):
            return [message]
        self.fired += 1
        changed = self._change(message)
        return [] if changed is None else [changed]


def on_chunk(index: int) -> Callable[[Message], bool]:
    return lambda message: chunk_index(message) == index


class Swap(Policy):
    """Chunk `first` is held back until chunk `second` arrives (the holder answers in
    request order, so `first < second`); then the two whole messages change places, or
    with `payloads` each keeps its header and takes the other's ciphertext."""

    def __init__(self, first: int, second: int, *, payloads: bool = False) -> None:
        super().__init__()
        self._first, self._second, self._payloads = first, second, payloads
        self._held: Message | None = None

    def rewrite(self, message: Message) -> list[Message]:
        index = chunk_index(message)
        if index == self._first:
            self._held = message
            return []
        if index != self._second or self._held is None:
            return [message]
        held, self._held = self._held, None
        self.fired += 1
        if self._payloads:
            return [[held[0], message[1]], [message[0], held[1]]]
        return [message, held]


class Truncate(Policy):
    """Pass the first `keep` messages, then cut the connection."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self._keep = keep
        self._passed = 0

    def rewrite(self, message: Message) -> list[Message]:
        if self._passed == self._keep:
            self.fired += 1
            raise Cut
        self._passed += 1
        return [message]


class Replay(Policy):
    """Chunk `target` is replaced by chunk `source` of the same connection, which came
    earlier: the whole message, or with `payload_only` just its ciphertext, under
    `target`'s own header."""

    def __init__(self, source: int, target: int, *, payload_only: bool = False) -> None:
        super().__init__()
        self._source, self._target, self._payload_only = source, target, payload_only
        self._seen: Message | None = None

    def rewrite(self, message: Message) -> list[Message]:
        index = chunk_index(message)
        if index == self._source:
            self._seen = message
        if index != self._target or self._seen is None:
            return [message]
        self.fired += 1
        return [[message[0], self._seen[1]] if self._payload_only else self._seen]


class Recorder(Policy):
    """Changes nothing and keeps every message, for a later replay."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Message] = []

    def rewrite(self, message: Message) -> list[Message]:
        self.messages.append(message)
        return [message]

    def first(self, select: Callable[[Message], bool]) -> Message:
        return next(message for message in self.messages if select(message))


# --- ZMTP framing -----------------------------------------------------------------------


class _Closed(Exception):
    """One side closed its connection."""


def _read_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        got = sock.recv_into(view[done:])
        if got == 0:
            raise _Closed
        done += got
    return bytes(buffer)


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(flags, body) of the next frame."""
    flags = _read_exact(sock, 1)[0]
    size = int.from_bytes(_read_exact(sock, 8 if flags & LONG else 1), "big")
    return flags, _read_exact(sock, size)


def encode_frame(body: bytes, flags: int) -> bytes:
    """A frame with `flags` (MORE, COMMAND); LONG is set from the body's size."""
    if len(body) > 255:
        return bytes([flags | LONG]) + len(body).to_bytes(8, "big") + body
    return bytes([flags & ~LONG, len(body)]) + body


def encode_message(message: Message) -> bytes:
    last = len(message) - 1
    return b"".join(encode_frame(body, MORE if i < last else 0) for i, body in enumerate(message))


# --- the proxy --------------------------------------------------------------------------


class _Connection:
    """One receiver connection and its own connection to the holder."""

    def __init__(self, receiver: socket.socket, holder: socket.socket) -> None:
        self.receiver, self.holder = receiver, holder

    def close(self) -> None:
        for sock in (self.receiver, self.holder):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other relay thread
            sock.close()


class MitmProxy:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accept loop notices `close`
        self.port: int = self._listener.getsockname()[1]
        self.errors: list[str] = []  # what went wrong inside the proxy itself
        self._target = 0
        self._target_host = "127.0.0.1"
        self._policy = Policy()
        self._skip = 0
        self._refusing = False
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def __enter__(self) -> MitmProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """Relay to the holder at `target_host`:`target_port`."""
        self._target, self._target_host = target_port, target_host
        threading.Thread(target=self._accept_loop, name="mitm-accept", daemon=True).start()

    def use(self, policy: Policy, skip: int = 0) -> Policy:
        """The policy for connections made from now on, after the next `skip` (which
        get none); also accept connections again."""
        with self._lock:
            self._policy, self._refusing, self._skip = policy, False, skip
        return policy

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                receiver, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with self._lock:
                refusing, policy = self._refusing, self._policy
                if self._skip and not refusing:
                    self._skip -= 1
                    policy = Policy()
            if refusing:
                receiver.close()
                continue
            self._open(receiver, policy)

    def _open(self, receiver: socket.socket, policy: Policy) -> None:
        receiver.settimeout(None)
        try:
            holder = socket.create_connection((self._target_host, self._target))
        except OSError as exc:
            self.errors.append(f"cannot reach the holder: {exc}")
            receiver.close()
            return
        connection = _Connection(receiver, holder)
        with self._lock:
            self._connections.append(connection)
        self._thread(connection, _relay_bytes, receiver, holder)
        self._thread(connection, self._relay_messages, connection, policy)

    def _thread(self, connection: _Connection, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except (_Closed, OSError):
                pass  # a side went away (or the proxy closed): end this connection
            except Cut:
                with self._lock:
                    self._refusing = True
            except Exception as exc:  # a broken policy or a stream we cannot parse
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                connection.close()
                with self._lock, contextlib.suppress(ValueError):  # the other relay did it
                    self._connections.remove(connection)

        threading.Thread(target=run, name="mitm-relay", daemon=True).start()

    def _relay_messages(self, connection: _Connection, policy: Policy) -> None:
        holder, receiver = connection.holder, connection.receiver
        greeting = b""
        while len(greeting) < GREETING_SIZE:  # relayed as it comes: each side waits for
            part = holder.recv(GREETING_SIZE - len(greeting))  # the other's first bytes
            if not part:
                raise _Closed
            receiver.sendall(part)
            greeting += part
        if greeting[_MECHANISM].rstrip(b"\0") != b"NULL":
            raise ValueError(f"mechanism {greeting[_MECHANISM]!r}: only NULL can be read")
        frames: Message = []
        while True:
            flags, body = read_frame(holder)
            if flags & COMMAND:
                receiver.sendall(encode_frame(body, COMMAND))
                continue
            frames.append(body)
            if flags & MORE:
                continue
            message, frames = frames, []
            for out in policy.rewrite(message):
                receiver.sendall(encode_message(out))


def _relay_bytes(source: socket.socket, sink: socket.socket) -> None:
    while data := source.recv(1 << 16):
        sink.sendall(data)
