"""`sfs-peer serve`: the peer's own ROUTER, answering requesters, plus a heartbeat
thread that keeps this peer marked online at the broker.

The ROUTER is a CurveZMQ server with the user's transport key (unless the config turns
peer transport encryption off); any client key may connect, and the signed hello then
decides who the requester is. One poll loop answers everything but the file I/O, which
runs in one lane per file (`reads.ReadLanes`), so that a file that blocks stops no other
share. Files are read chunk by chunk, so serving stays flat in memory whatever the file
size. With an `upload_rate`, chunks read wait their turn in one queue (`pacing`), while
the loop goes on answering everything else.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from sfs.common import protocol
from sfs.common.config import MAX_WINDOW
from sfs.common.curve import client_key, start_authenticator
from sfs.common.errors import ConfigError, InUse, RemoteError, SfsError
from sfs.common.protocol import ErrorCode, encode_error
from sfs.peer.client import BrokerClient
from sfs.peer.data_port import DataPort, advertised, data_endpoint, routing_id_of
from sfs.peer.keys import Identity
from sfs.peer.pacing import UploadPacer
from sfs.peer.reads import ReadLanes
from sfs.peer.relay_link import RelayLink, RelayState, is_relayed, is_relayed_data
from sfs.peer.session import DeviceNotRegistered, DeviceSession
from sfs.peer.transfer import Attached, AttachRefused, ChunkJob, ChunkOutcome, HolderService

log = logging.getLogger("sfs.peer")

MAX_REQUEST_FRAME = 64 * 1024
# Chunk reads under way for one requester connection, at most (reads run off the loop,
# so ZeroMQ's queues no longer bound them). A download keeps at most a window in flight
# per holder; more are answered `busy` at once, without touching the disk.
MAX_READS_PER_CONNECTION = MAX_WINDOW
# Replies queued for one requester, at most; past it the requester is not reading and
# its transfers are dropped. Twice a window and some: libzmq tells the sending side what
# was taken off a queue only every half queue, so a requester reading steadily can look
# up to half a queue further behind than it is.
SEND_QUEUE_LIMIT = 2 * (MAX_WINDOW + 8)
# Requests queued per requester connection. `maxmsgsize` bounds a frame, this their number:
# once it is reached ZeroMQ stops reading that connection (TCP pushes back), so a flood
# waits in the sender's memory, not here. Nothing is lost; a window only waits its turn.
RECEIVE_QUEUE_LIMIT = 16
_POLL_MS = 500
_DATA_POLL_MS = 200  # while data connections wait to attach: their deadline is checked


def listen_error(endpoint: str, exc: zmq.ZMQError, config: str, key: str = "listen") -> SfsError:
    """Why `listen` (or `key`) could not be bound, in words. Another `serve` of this data
    folder is stopped earlier by its lock, so a taken address is another program's."""
    if exc.errno == errno.EADDRINUSE:
        return InUse(
            f"cannot listen on {endpoint}: the address is in use by another program;"
            f" change `{key}` in {config}"
        )
    return ConfigError(f"cannot listen on {endpoint}: {exc}; check `{key}` in {config}")


class PeerServer:
    def __init__(
        self,
        service: HolderService,
        identity: Identity,
        listen: str,
        transport_encryption: bool = True,
        stop: threading.Event | None = None,
        on_ready: Callable[[str], None] | None = None,
        upload_rate: int = 0,
        config: str = "the config",
        data_listen: str | None = None,
        advertise: str | None = None,
        relay: RelayState | None = None,
    ) -> None:
        """`upload_rate`: bytes a second for every chunk sent, together; 0 for no cap.
        `config`: where `listen` was set, for the message when it cannot be bound.
        `data_listen`: where data connections are taken (`data_port`), by default
        `listen`'s host on any free port; offers name it with `advertise`'s host (by
        default the bound `listen`'s). "off": no data port, chunks on the control
        connection only.
        `relay`: keep a connection to a relay as it says (None: direct only)."""
        self._service = service
        self._identity = identity
        self._listen = listen
        self._config = config
        self._encrypt = transport_encryption
        self._stop = stop or threading.Event()
        self._on_ready = on_ready
        self.endpoint = listen
        self._data_listen = data_endpoint(listen) if data_listen is None else data_listen
        self._advertise = advertise
        self.data_endpoint = ""  # once bound
        self._data: DataPort | None = None
        self._reading: dict[bytes, int] = {}  # connection -> chunk reads under way
        self._pacer = UploadPacer(upload_rate)
        # Chunks read, waiting for the upload cap; still counted in `_reading`, so each
        # connection has at most MAX_READS_PER_CONNECTION here.
        self._paced: deque[tuple[ChunkJob, ChunkOutcome]] = deque()
        self._relay_state = relay
        self._link: RelayLink | None = None
        self._sock: zmq.Socket[bytes] | None = None

    def stop(self) -> None:
        self._stop.set()

    def serve(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        authenticator = None
        if self._encrypt:
            authenticator = start_authenticator(context, "sfs.peer.zap")
        sock = context.socket(zmq.ROUTER)
        try:
            sock.linger = 0
            sock.maxmsgsize = MAX_REQUEST_FRAME
            sock.ipv6 = True  # `listen` may be `tcp://[...]:PORT`; `*` takes IPv4 and IPv6
            sock.sndhwm = SEND_QUEUE_LIMIT
            sock.rcvhwm = RECEIVE_QUEUE_LIMIT
            sock.router_mandatory = True  # a full queue raises instead of silently dropping
            if self._encrypt:
                sock.curve_server = True
                sock.curve_secretkey = self._identity.curve_secret_z85
                sock.curve_publickey = self._identity.curve_public_z85
            try:
                sock.bind(self._listen)
            except zmq.ZMQError as exc:
                raise listen_error(self._listen, exc, self._config) from exc
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if self._data_listen != "off":
                self._open_data_port(context)
            self._sock = sock
            if self._relay_state is not None:
                self._link = RelayLink(context, self._identity, self._relay_state)
            if self._on_ready is not None:
                self._on_ready(self.endpoint)
            self._loop(sock)
        finally:
            if self._link is not None:
                self._link.close()
            sock.close(linger=0)
            if self._data is not None:
                self._data.close()
            if authenticator is not None:
                authenticator.stop()

    def _open_data_port(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        try:
            self._data = DataPort(context, self._data_listen, SEND_QUEUE_LIMIT, RECEIVE_QUEUE_LIMIT)
        except zmq.ZMQError as exc:
            raise listen_error(self._data_listen, exc, self._config, "data_listen") from exc
        self.data_endpoint = self._data.endpoint
        hint = advertised(self._advertise or self.endpoint, self.data_endpoint)
        self._service.offer_data([hint])

    def _loop(self, sock: zmq.Socket[bytes]) -> None:
        lanes = ReadLanes(self._service.read)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(lanes.wakeup_fd, zmq.POLLIN)
        data = self._data
        if data is not None:
            poller.register(data.sock, zmq.POLLIN)
            assert data.monitor is not None
            poller.register(data.monitor, zmq.POLLIN)
        polled_link: zmq.Socket[bytes] | None = None
        polled_leg: zmq.Socket[bytes] | None = None  # the relay's data leg
        try:
            while not self._stop.is_set():
                if self._link is not None:
                    self._link.tick(time.monotonic())
                    if self._link.sock is not polled_link:  # it (re)connected or dropped
                        if polled_link is not None:
                            poller.unregister(polled_link)
                        polled_link = self._link.sock
                        if polled_link is not None:
                            poller.register(polled_link, zmq.POLLIN)
                    if self._link.data_sock is not polled_leg:
                        if polled_leg is not None:
                            poller.unregister(polled_leg)
                        polled_leg = self._link.data_sock
                        if polled_leg is not None:
                            poller.register(polled_leg, zmq.POLLIN)
                ready = dict(poller.poll(self._poll_ms(data)))
                self._send_paced(sock)
                if data is not None:
                    if data.monitor in ready:
                        data.watch()
                    if data.sock in ready:
                        self._receive_data(data, lanes)
                    data.sweep(self._service.transfer_alive)
                if polled_link is not None and polled_link in ready and self._link is not None:
                    for connection, key, payload in self._link.receive():
                        self._answer(connection, key, payload, lanes)
                if polled_leg is not None and polled_leg in ready and self._link is not None:
                    for connection, payload in self._link.receive_data():
                        self._answer_relayed_data(connection, payload, lanes)
                if not ready:
                    self._service.expire_idle()
                    continue
                if lanes.wakeup_fd in ready:
                    for job, outcome in lanes.finished():
                        if self._pacer.enabled and isinstance(outcome, bytes):
                            self._paced.append((job, outcome))
                        else:
                            self._finish_read(sock, job, outcome)
                    self._send_paced(sock)
                if sock in ready:
                    self._receive(sock, lanes)
        finally:
            lanes.close()

    def _poll_ms(self, data: DataPort | None) -> int:
        longest = _POLL_MS if data is None or not data.unattached else _DATA_POLL_MS
        if not self._paced:
            return longest
        return min(longest, math.ceil(self._pacer.wait() * 1000))

    def _receive_data(self, data: DataPort, lanes: ReadLanes) -> None:
        """One message on the data port: an attach, or a chunk request of the transfer
        the connection is attached to."""
        received = data.receive()
        if received is None:
            return
        connection, payload, fd = received
        try:
            answer = self._service.receive_data(connection, payload)
        except AttachRefused as exc:
            log.info("closed a data connection: %s", exc)
            data.close_connection(fd, connection)
            return
        if isinstance(answer, Attached):
            data.attached(fd, answer.transfer_id)
            if answer.answer:  # the requester asks for chunks here once it has this
                ack = protocol.DataAttached(answer.transfer_id)
                self._send(data.sock, connection, [protocol.encode("attached", ack)])
            return
        if isinstance(answer, ChunkJob):
            answer = self._start_reading(answer, lanes)
        self._send(data.sock, connection, answer)

    def _answer_relayed_data(self, connection: bytes, payload: bytes, lanes: ReadLanes) -> None:
        """One message of a requester's data connection through the relay (its leg
        is not ours to close: a refused one is only forgotten)."""
        try:
            answer = self._service.receive_data(connection, payload)
        except AttachRefused as exc:
            log.info("ignored a relayed data connection: %s", exc)
            return
        if isinstance(answer, Attached):
            return
        if isinstance(answer, ChunkJob):
            answer = self._start_reading(answer, lanes)
        assert self._sock is not None
        self._send(self._sock, connection, answer)

    def _send_paced(self, sock: zmq.Socket[bytes]) -> None:
        """Send the chunks waiting for the upload cap whose turn has come, in order."""
        while self._paced and self._pacer.wait() == 0:
            job, outcome = self._paced.popleft()
            if self._finish_read(sock, job, outcome):
                self._pacer.spend(job.length)

    def _finish_read(self, sock: zmq.Socket[bytes], job: ChunkJob, outcome: ChunkOutcome) -> bool:
        """Reply to a chunk request whose read is done; whether a chunk went out (the
        transfer may have ended meanwhile: finished, expired or unshared)."""
        self._done_reading(job.connection)
        replies = self._service.complete(job, outcome)
        self._send(sock, job.connection, replies)
        return len(replies) == 2

    def _receive(self, sock: zmq.Socket[bytes], lanes: ReadLanes) -> None:
        frames = sock.recv_multipart(copy=False)
        if len(frames) != 2:  # requesters are DEALERs sending one frame at a time
            log.debug("dropped a message of %d frames", len(frames))
            return
        connection, payload = frames
        key = client_key(payload) if self._encrypt else None
        self._answer(connection.bytes, key, payload.bytes, lanes)

    def _answer(
        self, connection: bytes, key: bytes | None, payload: bytes, lanes: ReadLanes
    ) -> None:
        """`key`: the requester's transport key, as its connection (or the relay, which
        checked it against the broker's ticket) says."""
        answer = self._service.receive(connection, key, payload)
        if isinstance(answer, ChunkJob):  # file I/O: never on this loop
            answer = self._start_reading(answer, lanes)
        assert self._sock is not None  # set before the loop starts
        self._send(self._sock, connection, answer)  # a relayed one goes to the relay

    def _start_reading(self, job: ChunkJob, lanes: ReadLanes) -> list[bytes]:
        """Hand `job` to its lane; the replies to send now (none, unless refused)."""
        reading = self._reading.get(job.connection, 0)
        if reading >= MAX_READS_PER_CONNECTION:
            return [encode_error(ErrorCode.BUSY, "too many chunk requests in flight; retry")]
        if not lanes.submit(job):
            message = f"the holder is behind reading {job.share.name}; retry"
            return [encode_error(ErrorCode.BUSY, message)]
        self._reading[job.connection] = reading + 1
        return []

    def _done_reading(self, connection: bytes) -> None:
        left = self._reading.pop(connection) - 1
        if left:
            self._reading[connection] = left

    def _send(self, sock: zmq.Socket[bytes], connection: bytes, replies: list[bytes]) -> None:
        """Send `replies` to `connection`: on the data port if it is a data connection."""
        if not replies:
            return
        if is_relayed_data(connection):
            if self._link is None or not self._link.send_data(connection, replies):
                log.info("dropped a relayed data connection (the relay is not taking more)")
                self._service.drop_connection(connection)
            return
        if is_relayed(connection):
            if self._link is None or not self._link.send(connection, replies):
                log.info("dropped a relayed requester (the relay is not taking more)")
                self._service.drop_connection(connection)
            return
        routing_id = routing_id_of(connection)
        if routing_id is not None:
            assert self._data is not None
            sock, connection = self._data.sock, routing_id
        try:
            sock.send_multipart([connection, *replies], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # not reading (queue full) or gone
            log.info("dropped a requester that is not reading (%s)", exc.strerror)
            self._service.drop_connection(connection)


class Heartbeat(threading.Thread):
    """Keeps this peer online at the broker: a heartbeat every `interval` seconds (more
    often if the broker's presence ttl needs it), and a goodbye when stopped. Network
    failures are logged and retried; an expired session is remade with the device's
    keys (`DeviceSession`). A refused beat (an account an operator disabled) is said
    once and retried, so serving resumes by itself once it is enabled. Only a broker
    that refuses those keys ends serving, through `on_session_lost`. The thread makes
    and closes its own broker client."""

    def __init__(
        self,
        connect: Callable[[], BrokerClient],
        session: DeviceSession,
        endpoint: str,
        interval: float,
        on_session_lost: Callable[[], None],
        relay: RelayState | None = None,
    ) -> None:
        """`relay`: its hints go into every beat (a change beats at once), and its
        grant is renewed from here."""
        super().__init__(name="heartbeat", daemon=True)
        self._connect, self._session, self._endpoint = connect, session, endpoint
        self._relay = relay
        self._interval = interval
        self._on_session_lost = on_session_lost
        self._halt = threading.Event()
        self.session_lost: DeviceNotRegistered | None = None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        with self._connect() as broker:
            self._beat_until_stopped(broker)
            if self.session_lost is None:
                try:
                    self._session.call(broker, broker.offline)
                    self._session.end(broker)
                except SfsError as exc:
                    log.debug("could not tell the broker we go offline: %s", exc)

    def _wait(self, seconds: float) -> bool:
        """Whether to stop, after `seconds` or sooner if the relay hints changed."""
        if self._relay is None:
            return self._halt.wait(seconds)
        deadline = time.monotonic() + seconds
        while not self._halt.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._relay.changed.wait(min(left, 0.2)):
                self._relay.changed.clear()
                return self._halt.is_set()
        return True

    def _beat(self, broker: BrokerClient, token: str) -> int:
        if self._relay is None:
            return broker.heartbeat(token, self._endpoint)
        if self._relay.mode != "never" and self._relay.grant_stale():
            try:
                self._relay.set_grant(broker.relay_grant(token, [self._endpoint]))
            except RemoteError as exc:  # an older broker: ask again in a while, not each beat
                log.debug("no relay grant: %s", exc)
                self._relay.set_grant(protocol.RelayGrantResult([], b"", bytes(64)))
        return broker.heartbeat_hints(token, self._endpoint, self._relay.hints())

    def _beat_until_stopped(self, broker: BrokerClient) -> None:
        interval, failing = self._interval, False
        refused = ""  # said once: a disabled account is refused at every beat
        while not self._wait(interval):
            try:
                ttl = self._session.call(broker, lambda token: self._beat(broker, token))
            except DeviceNotRegistered as exc:
                log.error("%s", exc)
                self.session_lost = exc
                self._on_session_lost()
                return
            except RemoteError as exc:
                if str(exc) != refused:
                    log.warning("heartbeat refused: %s (retrying)", exc)
                refused = str(exc)
                continue
            except SfsError as exc:
                if not failing:
                    log.warning("heartbeat failed: %s (retrying)", exc)
                failing = True
                continue
            if failing or refused:
                log.info("the broker takes heartbeats again")
            failing, refused = False, ""
            interval = min(self._interval, max(1.0, ttl / 3))
