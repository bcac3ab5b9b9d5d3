"""The broker's sockets: one CurveZMQ ROUTER facing clients, worker threads behind it.

The ZeroMQ guide's load-balancing pattern, with a fast lane: the main loop reads what
clients sent, answers from the cache (`sfs.broker.cache`: lookups with a cached
session) at once, hands the rest to the least recently used worker over inproc, and
routes the replies back. bcrypt and SQL run in the workers, so they never stall the
socket loop; the loop reads only the store's generation, once per batch. A frame with
an unexpected shape is dropped; everything else is answered.
Each request reaches its worker with the sender's CurveZMQ key and source IP address.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from sfs.broker.generation_reads import GenerationReads
from sfs.broker.service import BrokerService
from sfs.common.curve import client_key, start_authenticator
from sfs.common.errors import ConfigError, InUse, SfsError
from sfs.common.protocol import MAX_BROKER_FRAME

log = logging.getLogger("sfs.broker")

_BACKEND = "inproc://sfs-broker-workers"
_READY = b"READY"
_POLL_MS = 200
# What one client connection can make the broker hold: `maxmsgsize` bounds a frame, these
# the number of messages queued. A full receive queue makes ZeroMQ stop reading the
# connection (TCP pushes back), so a flood of requests waits in the sender's memory.
# Not 1: with a ZAP handler, libzmq 4.3.5 delivers nothing to a ROUTER with rcvhwm 1.
REQUEST_QUEUE_LIMIT = 2
# A full send queue drops the reply, so a client that asks for large replies and never
# reads them cannot pile them up here: at most this many, each at most a lookup's tree
# header (MAX_MANIFEST_BYTES) and its holders, about 40 MiB a connection. Clients keep one
# request in flight; a pipelining one's requests wait their turn (PER_CLIENT), but on a
# loaded machine ZeroMQ's I/O thread can trail the socket thread by dozens of cheap
# replies (16 lost replies of a 100-request pipeline so): the room is for that lag.
REPLY_QUEUE_LIMIT = 128
# Requests read in one go, which one read of the store's generation serves (the cache's
# answers need one read after the requests arrived; see sfs.broker.cache).
BATCH = 64
# Requests read and waiting for a worker (bcrypt, SQL): beyond this, clients wait in
# ZeroMQ's queues, which push back on their connections.
WAITING_LIMIT = 64
# Requests of one connection being answered at once: its replies then come at most this
# many in a burst, well under REPLY_QUEUE_LIMIT (a full send queue drops a reply). Its
# further requests wait their turn here, counted in WAITING_LIMIT.
PER_CLIENT = 2
WAITING_BYTES = 64 * 1024 * 1024


def peer_address(frame: zmq.Frame) -> str:
    """The sender's IP address as ZeroMQ saw it ("" if unknown): the per-address limits
    on registration count by it."""
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return ""
    return str(address or "")[:100]


def listen_error(endpoint: str, exc: zmq.ZMQError) -> SfsError:
    """Why a bind failed, in words. Several brokers may share one config and database on
    purpose, so a taken address is reported, never prevented by a lock."""
    if exc.errno == errno.EADDRINUSE:
        return InUse(
            f"cannot listen on {endpoint}: the address is in use (another broker, or another"
            " program, listens there); stop it or change `bind`"
        )
    return ConfigError(f"cannot listen on {endpoint}: {exc}; check `bind` in the config")


class BrokerServer:
    def __init__(
        self,
        service: BrokerService,
        bind: str,
        secret_key: bytes,
        public_key: bytes,
        workers: int = 4,
    ) -> None:
        self._service = service
        self._bind = bind
        self._secret_key, self._public_key = secret_key, public_key
        self._worker_count = workers
        self._stop = threading.Event()
        self.bound = threading.Event()  # set once the frontend listens (for tests)
        self.endpoint = bind

    def stop(self) -> None:
        self._stop.set()

    def serve(self, on_listening: Callable[[str], None] | None = None) -> None:
        """Run until `stop()` is called (from a signal handler or another thread).
        `on_listening(endpoint)` once the frontend is bound (nothing is said before)."""
        context = zmq.Context()
        authenticator = None
        threads: list[threading.Thread] = []
        frontend = backend = None
        try:
            authenticator = start_authenticator(context, "sfs.broker.zap")
            frontend = self._frontend(context)
            backend = context.socket(zmq.ROUTER)
            backend.linger = 0
            backend.bind(_BACKEND)
            for number in range(self._worker_count):
                thread = threading.Thread(
                    target=self._work, args=(context,), name=f"broker-worker-{number}", daemon=True
                )
                thread.start()
                threads.append(thread)
            self.bound.set()
            if on_listening is not None:
                on_listening(self.endpoint)
            self._route(frontend, backend)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=5)
            for sock in (frontend, backend):
                if sock is not None:
                    sock.close(linger=0)
            if authenticator is not None:
                authenticator.stop()
            context.term()

    def _frontend(self, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        sock = context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.maxmsgsize = MAX_BROKER_FRAME
        sock.ipv6 = True  # `bind` may be `tcp://[...]:PORT`; `*` then takes IPv4 and IPv6
        sock.rcvhwm = REQUEST_QUEUE_LIMIT
        sock.sndhwm = REPLY_QUEUE_LIMIT
        sock.curve_server = True
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self._public_key
        try:
            sock.bind(self._bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise listen_error(self._bind, exc) from exc
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _route(self, frontend: zmq.Socket[bytes], backend: zmq.Socket[bytes]) -> None:
        reads = self._service.generation_reads()
        try:
            _Router(self, frontend, backend, reads).run()
        finally:
            if reads is not None:
                reads.close()

    def _moved(self, generation: int | None) -> bool:
        """Whether the generation moved since `generation` was read (so the reply is
        held for the lease; see `sfs.broker.cache`). Never, without a lease."""
        if not self._service.lease:
            return False
        if generation is None:
            return True
        try:
            return self._service.store.generation() != generation
        except Exception:  # cannot tell: hold it
            return True

    def _work(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(_BACKEND)
        sock.send(_READY)
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                tag, key, address, payload, generation = sock.recv_multipart()
                given = int.from_bytes(generation, "big") if generation else None
                reply = self._service.handle(payload, key or None, address.decode() or None, given)
                sock.send_multipart([tag, reply, b"\x01" if self._moved(given) else b""])
        finally:
            sock.close(linger=0)


Arrived = tuple[list[bytes], zmq.Frame]  # a request's route (client identity, ...) and frame


class _Router:
    """The socket thread's loop (see the module's docstring): requests are read in
    batches; a batch is answered with a read of the store's generation that started after
    it arrived (SQLite: one read per batch, made at once, in microseconds), or with
    PostgreSQL at most `lease` seconds before (`sfs.broker.cache`). Such reads run on
    connections of their own (`reads`), several in flight, and the loop never waits for
    one. Then the cache answers what it can, and the workers the rest; a worker's reply
    to a request that moved the generation is held for `lease` seconds."""

    def __init__(
        self,
        server: BrokerServer,
        frontend: zmq.Socket[bytes],
        backend: zmq.Socket[bytes],
        reads: GenerationReads | None,
    ) -> None:
        self._server = server
        self._service = server._service
        self._frontend, self._backend, self._reads = frontend, backend, reads
        self._lease = self._service.lease if reads is not None else 0.0
        self._ready: deque[bytes] = deque()  # idle workers
        self._routes: dict[bytes, list[bytes]] = {}  # by tag: where a worker's reply goes
        self._waiting: deque[list[bytes]] = deque()  # for a worker: [tag, key, ...]
        self._held_bytes = 0  # their frames' sizes
        self._arrived: list[Arrived] = []  # read from clients in this turn of the loop
        self._pending: list[tuple[float, list[Arrived]]] = []  # (read at, batch): for a read
        self._latest: tuple[float, int] | None = None  # (sent at, generation): newest read
        self._last_request = 0.0
        self._held_replies: list[tuple[float, int, list[bytes]]] = []  # a heap, by release
        self._held = 0  # requests read and not yet answered or handed to a worker
        self._busy_clients: dict[bytes, int] = {}  # by connection: requests being answered
        self._deferred: dict[bytes, deque[Arrived]] = {}  # by connection: over PER_CLIENT
        self._sequence = 0
        self._poller = zmq.Poller()
        self._poller.register(backend, zmq.POLLIN)
        self._polled: set[int] = set()

    def run(self) -> None:
        while not self._server._stop.is_set():
            # Read clients while few requests are held; others queue in ZeroMQ.
            if self._held < WAITING_LIMIT and self._held_bytes < WAITING_BYTES:
                self._poller.register(self._frontend, zmq.POLLIN)
            else:
                with contextlib.suppress(KeyError):
                    self._poller.unregister(self._frontend)
            self._poll_reads()
            events = dict(self._poller.poll(self._timeout_ms()))
            if self._backend in events:
                self._replies()
            self._release_held()
            if self._frontend in events:
                self._read_clients()
            if self._reads is not None:
                for sock in self._reads.sockets():
                    if sock in events:
                        self._read_done(self._reads.receive(sock))
            if self._arrived:
                self._new_batch()
            if self._reads is not None:
                self._keep_reading()
            while self._ready and self._waiting:
                payload = self._waiting.popleft()
                self._held_bytes -= len(payload[3])
                self._held -= 1
                self._backend.send_multipart([self._ready.popleft(), *payload])

    def _timeout_ms(self) -> int:
        if self._arrived:  # a deferred request was let in: answer it now
            return 0
        timeout = float(_POLL_MS)
        if self._held_replies:
            timeout = min(timeout, (self._held_replies[0][0] - time.monotonic()) * 1000)
        if self._reads is not None and time.monotonic() - self._last_request < 1:
            timeout = min(timeout, self._lease * 250)  # refresh the read while busy
        return max(0, math.ceil(timeout))

    def _new_batch(self) -> None:
        batch, self._arrived = self._arrived, []
        now = time.monotonic()  # after the requests were read: later than they arrived
        self._last_request = now
        if self._reads is None:
            try:
                generation: int | None = self._service.generation()
            except SfsError:  # the workers' `handle` says so to each client
                generation = None
            except Exception:
                log.exception("bug while reading the store's generation")
                generation = None
            self._answer(batch, generation)
        elif self._latest is not None and self._latest[0] > now - self._lease:
            self._answer(batch, self._latest[1])
        else:
            self._pending.append((now, batch))

    def _read_done(self, done: tuple[int, int | None, float] | None) -> None:
        if done is None:
            return
        _, generation, started = done
        if generation is None or (self._latest is not None and started <= self._latest[0]):
            return
        self._latest = (started, generation)
        self._service.cache.saw(generation)
        still = []
        for read_at, batch in self._pending:
            if started > read_at - self._lease:
                self._answer(batch, generation)
            else:
                still.append((read_at, batch))
        self._pending = still

    def _keep_reading(self) -> None:
        """A read for the pending batches, if none in flight started late enough; and,
        while clients are busy, a fresh one whenever the newest is a quarter lease old."""
        assert self._reads is not None
        now = time.monotonic()
        self._reads.give_up_slow()
        newest = self._reads.newest_start()
        if self._pending:
            latest_batch = max(read_at for read_at, _ in self._pending)
            if newest is None or newest <= latest_batch - self._lease:
                self._sequence += 1
                if not self._reads.send(self._sequence) and not self._reads.in_flight():
                    for _, batch in self._pending:  # no database connection: the workers
                        self._answer(batch, None)  # read it themselves, or say why not
                    self._pending = []
        elif now - self._last_request < 1:
            sent = max(newest or 0.0, self._latest[0] if self._latest else 0.0)
            if now - sent > self._lease / 4:  # staggered: one lagging read leaves no gap
                self._sequence += 1
                self._reads.send(self._sequence)

    def _release_held(self) -> None:
        now = time.monotonic()
        while self._held_replies and self._held_replies[0][0] <= now:
            _, _, frames = heapq.heappop(self._held_replies)
            self._send(frames[:-1], frames[-1])

    def _send(self, route: list[bytes], reply: bytes) -> None:
        """Send a reply; let the connection's next deferred request in, if any."""
        self._frontend.send_multipart([*route, reply])
        client = route[0]
        deferred = self._deferred.get(client)
        if deferred:
            self._arrived.append(deferred.popleft())
            if not deferred:
                del self._deferred[client]
            return  # the same number of its requests are being answered
        busy = self._busy_clients.get(client, 0) - 1
        if busy > 0:
            self._busy_clients[client] = busy
        else:
            self._busy_clients.pop(client, None)

    def _poll_reads(self) -> None:
        if self._reads is None:
            return
        socks = set(self._reads.sockets())
        for sock in self._polled - socks:
            self._poller.unregister(sock)
        for sock in socks - self._polled:
            self._poller.register(sock, zmq.POLLIN)
        self._polled = socks

    def _replies(self) -> None:
        """Every worker message that has arrived: READY, or a reply to route back."""
        while True:
            try:
                worker, *rest = self._backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._ready.append(worker)
            if len(rest) == 3:
                tag, reply, hold = rest
                route = self._routes.pop(tag, None)
                if route is None:
                    continue
                if hold == b"\x01":  # it moved the generation: after the lease, from now
                    self._sequence += 1
                    release = time.monotonic() + self._lease
                    heapq.heappush(self._held_replies, (release, self._sequence, [*route, reply]))
                else:
                    self._send(route, reply)

    def _read_clients(self) -> None:
        for _ in range(BATCH):
            if self._held >= WAITING_LIMIT or self._held_bytes >= WAITING_BYTES:
                return
            try:
                frames = self._frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # DEALER clients send [payload]; REQ clients add an empty delimiter.
            prefix = frames[1:-1]
            if len(prefix) > 1 or (prefix and prefix[0].bytes):
                log.debug("dropped a request with an unexpected frame layout")
                continue
            route = [frames[0].bytes, *(f.bytes for f in prefix)]
            self._held += 1
            self._held_bytes += len(frames[-1])
            busy = self._busy_clients.get(route[0], 0)
            if busy >= PER_CLIENT:
                self._deferred.setdefault(route[0], deque()).append((route, frames[-1]))
            else:
                self._busy_clients[route[0]] = busy + 1
                self._arrived.append((route, frames[-1]))

    def _answer(self, batch: list[Arrived], generation: int | None) -> None:
        """Answer from the cache what it can for `generation` (None: nothing), and queue
        the rest for the workers, with the generation."""
        if generation is not None:
            self._service.cache.saw(generation)
        given = b"" if generation is None else generation.to_bytes(8, "big")
        for route, frame in batch:
            key = client_key(frame) or b""
            payload = frame.bytes
            if generation is not None:
                try:
                    reply = self._service.answer_from_cache(payload, key or None, generation)
                except Exception:  # a bug: the worker's `handle` answers it
                    log.exception("bug while answering from the cache")
                    reply = None
                if reply is not None:
                    self._held -= 1
                    self._held_bytes -= len(payload)
                    self._send(route, reply)
                    continue
            self._sequence += 1
            tag = self._sequence.to_bytes(8, "big")
            self._routes[tag] = route
            self._waiting.append([tag, key, peer_address(frame).encode(), payload, given])
