"""The relay against hostile or careless clients, over real CurveZMQ sockets on the
loopback: tickets it must refuse (none, forged, expired, reused, someone else's), a
holder that is not attached, the limits (each refusal says why and when to retry), and
frames forwarded both ways untouched, with the requester's key as the relay saw it; and
the data legs (NULL mechanism): only a ticket the relay handed out opens one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq
import zmq.utils.z85
from zmq.utils.monitor import recv_monitor_message

from sfs.broker.relay import RelayServer
from sfs.broker.relay_data_conns import MAX_WAITING_PER_SOURCE
from sfs.broker.relay_failures import FAILED_PER_ADDRESS, FAILED_PER_KEY
from sfs.common import crypto, protocol, relay_protocol
from sfs.common.codec import from_wire
from sfs.common.config import RelayLimits
from sfs.common.protocol import ErrorBody
from tests.harness import free_port

TICKET_KEY = crypto.generate_ticket_key()
FILE_ID = "ab" * 16


@dataclass
class Relay:
    endpoint: str
    data_endpoint: str
    public: bytes  # z85
    context: zmq.Context[zmq.Socket[bytes]]
    sockets: list[zmq.Socket[bytes]]


@dataclass
class Client:
    sock: zmq.Socket[bytes]
    key: bytes  # raw public key

    def send(self, op: str, body: relay_protocol.Record, rid: int = 1) -> None:
        self.sock.send(protocol.encode(op, body, rid))

    def reply(self) -> protocol.Envelope:
        assert self.sock.poll(5000), "the relay did not answer"
        (frame,) = self.sock.recv_multipart()
        return protocol.decode_envelope(frame)

    def refusal(self) -> ErrorBody:
        envelope = self.reply()
        assert envelope.op == "error", envelope.body
        return from_wire(ErrorBody, envelope.body)


def serve_relay(limits: RelayLimits, **options: float) -> Iterator[Relay]:
    public, secret = zmq.curve_keypair()
    stop = threading.Event()
    server = RelayServer(
        f"tcp://127.0.0.1:{free_port()}",
        (public, secret),
        crypto.ticket_public_key(TICKET_KEY),
        limits,
        stop,
        **options,
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(context, lambda _: ready.set()))
    thread.start()
    assert ready.wait(5)
    try:
        relay = Relay(server.endpoint, server.data_endpoint, public, context, [])
        yield relay
    finally:
        stop.set()
        thread.join()
        for sock in relay.sockets:
            sock.close(linger=0)
        context.term()


@pytest.fixture
def relay() -> Iterator[Relay]:
    yield from serve_relay(RelayLimits(user_circuits=2, circuits_per_minute=3))


def client(relay: Relay, *, stalled: bool = False) -> Client:
    """`stalled`: its libzmq and kernel take in as little as they can (see `data_leg`)."""
    public, secret = zmq.curve_keypair()
    sock = relay.context.socket(zmq.DEALER)
    sock.linger = 0
    if stalled:
        sock.rcvhwm = 1
        sock.rcvbuf = 4096
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = relay.public, public, secret
    sock.connect(relay.endpoint)
    relay.sockets.append(sock)
    return Client(sock, zmq.utils.z85.decode(public))


def attach(relay: Relay, username: str = "alice") -> Client:
    holder = client(relay)
    ticket = relay_protocol.AttachTicket(
        relay_protocol.ATTACH_DOMAIN,
        username,
        holder.key,
        ["tcp://192.0.2.1:7000"],  # not where it connects from: probed as unreachable
        int(time.time()) + 60,
        crypto.random_bytes(16),
    )
    holder.send("attach", relay_protocol.Attach(*relay_protocol.sign_ticket(TICKET_KEY, ticket)))
    assert holder.reply().op == "result"
    return holder


def circuit_ticket(
    requester: Client,
    holder: Client,
    expires_in: int = 60,
    key: bytes = TICKET_KEY,
    name: str = "bob",
) -> relay_protocol.Open:
    ticket = relay_protocol.CircuitTicket(
        relay_protocol.CIRCUIT_DOMAIN,
        name,
        requester.key,
        "alice",
        holder.key,
        FILE_ID,
        int(time.time()) + expires_in,
        crypto.random_bytes(16),
    )
    return relay_protocol.Open(*relay_protocol.sign_ticket(key, ticket))


def test_frames_go_both_ways_untouched_with_the_requester_key(relay: Relay) -> None:
    alice, bob = attach(relay), client(relay)
    bob.send("open", circuit_ticket(bob, alice))
    assert bob.reply().op == "result"
    bob.sock.send(b"hello, opaque to the relay")
    assert alice.sock.poll(5000)
    circuit, key, frame = alice.sock.recv_multipart()
    assert len(circuit) == 16 and key == bob.key and frame == b"hello, opaque to the relay"
    alice.sock.send_multipart([circuit, b"envelope", b"\x00" * 1_000_000])
    assert bob.sock.poll(5000)
    assert bob.sock.recv_multipart() == [b"envelope", b"\x00" * 1_000_000]


def test_no_ticket_a_forged_one_or_a_stolen_one_is_refused(relay: Relay) -> None:
    alice, bob, mallory = attach(relay), client(relay), client(relay)
    mallory.send("open", relay_protocol.Open(b"\x00" * 100, b"\x00" * 64))
    refused = mallory.refusal()
    assert (
        refused.code == "unauthorized" and "not a ticket of this relay's broker" in refused.message
    )
    forged = circuit_ticket(mallory, alice, key=crypto.generate_ticket_key())
    mallory.send("open", forged)
    assert "not a ticket of this relay's broker" in mallory.refusal().message
    stolen = circuit_ticket(bob, alice)  # bob's ticket, presented on mallory's connection
    mallory.send("open", stolen)
    refused = mallory.refusal()
    assert refused.code == "forbidden" and "not the ticket's" in refused.message
    mallory.sock.send(b"anything")  # no circuit: nothing reaches alice
    assert not alice.sock.poll(300)


def test_an_expired_or_reused_ticket_is_refused_with_a_retry(relay: Relay) -> None:
    alice, bob = attach(relay), client(relay)
    bob.send("open", circuit_ticket(bob, alice, expires_in=-1))
    refused = bob.refusal()
    assert refused.message.startswith("ticket expired") and "retry in" in refused.message
    ticket = circuit_ticket(bob, alice)
    bob.send("open", ticket)
    assert bob.reply().op == "result"
    replay = client(relay)
    replay.send("open", ticket)  # a replay from another connection: the key differs
    assert replay.refusal().code in ("forbidden", "unauthorized")


def test_a_holder_that_is_not_attached_and_a_forged_attach(relay: Relay) -> None:
    bob, alice = client(relay), client(relay)  # alice never attached
    bob.send("open", circuit_ticket(bob, alice))
    refused = bob.refusal()
    assert refused.code == "not_found" and "retry in 5 s" in refused.message
    mallory = client(relay)
    ticket = relay_protocol.AttachTicket(
        relay_protocol.ATTACH_DOMAIN, "alice", alice.key, [], int(time.time()) + 60, b"n" * 16
    )
    mallory.send("attach", relay_protocol.Attach(*relay_protocol.sign_ticket(TICKET_KEY, ticket)))
    assert mallory.refusal().code == "forbidden"  # alice's ticket, mallory's key
    mallory.send("probe", relay_protocol.Probe())
    assert "attach first" in mallory.refusal().message


def test_limits_say_why_and_when_to_retry(relay: Relay) -> None:
    alice = attach(relay)
    opened = []
    for _ in range(2):
        bob = client(relay)
        bob.send("open", circuit_ticket(bob, alice))
        assert bob.reply().op == "result"
        opened.append(bob)
    third = client(relay)
    third.send("open", circuit_ticket(third, alice))
    refused = third.refusal()
    assert refused.code == "busy" and refused.message.startswith("relay busy")
    assert "retry in 10 s" in refused.message


def test_circuits_opened_a_minute_are_limited() -> None:
    for relay in serve_relay(RelayLimits(circuits_per_minute=2)):
        alice = attach(relay)
        for _ in range(2):
            bob = client(relay)
            bob.send("open", circuit_ticket(bob, alice))
            assert bob.reply().op == "result"
        bob = client(relay)
        bob.send("open", circuit_ticket(bob, alice))
        refused = bob.refusal()
        assert refused.code == "throttled" and refused.message.startswith("rate limited: retry in")


def test_the_probe_never_leaves_the_holder_s_own_address(relay: Relay) -> None:
    alice = attach(relay)  # advertises 192.0.2.1, connects from 127.0.0.1
    started = time.monotonic()
    alice.send("probe", relay_protocol.Probe(), rid=2)
    reply = alice.reply()
    assert reply.rid == 2 and reply.op == "result"
    result = from_wire(relay_protocol.ProbeResult, reply.body)
    assert not result.reachable
    assert time.monotonic() - started < 1  # answered without trying to connect anywhere
    alice.send("probe", relay_protocol.Probe(), rid=2)  # at most once per 30 s
    assert alice.refusal().message.startswith("rate limited: retry in")


def test_an_idle_circuit_is_closed() -> None:
    for relay in serve_relay(RelayLimits(idle=5)):
        alice, bob = attach(relay), client(relay)
        bob.send("open", circuit_ticket(bob, alice))
        assert bob.reply().op == "result"
        time.sleep(5.5)
        bob.sock.send(b"late")
        assert not alice.sock.poll(500)


# --- data legs ------------------------------------------------------------------------


def data_leg(
    relay: Relay, reply: protocol.Envelope | None = None, *, stalled: bool = False
) -> zmq.Socket[bytes]:
    """A NULL-mechanism DEALER to the relay's data port; it sends the ticket in `reply`
    (an answer to attach or open), if given, and expects it taken. `stalled`: its
    libzmq and kernel take in as little as they can, for an end that stops reading."""
    sock = relay.context.socket(zmq.DEALER)
    sock.linger = 0
    if stalled:
        sock.rcvhwm = 1
        sock.rcvbuf = 4096
    sock.connect(relay.data_endpoint)
    relay.sockets.append(sock)
    if reply is not None:
        leg = from_wire(relay_protocol.DataLeg, reply.body)
        assert relay.data_endpoint.endswith(f":{leg.port}")
        sock.send(leg.ticket)
        assert sock.poll(5000)
        assert protocol.decode_envelope(sock.recv()).op == "result"
    return sock


def refusal_on(sock: zmq.Socket[bytes]) -> ErrorBody:
    assert sock.poll(5000), "the relay did not answer"
    envelope = protocol.decode_envelope(sock.recv())
    assert envelope.op == "error"
    return from_wire(ErrorBody, envelope.body)


def attach_with_leg(relay: Relay) -> tuple[Client, zmq.Socket[bytes]]:
    alice = client(relay)
    ticket = relay_protocol.AttachTicket(
        relay_protocol.ATTACH_DOMAIN, "alice", alice.key, [], int(time.time()) + 60, b"a" * 16
    )
    alice.send("attach", relay_protocol.Attach(*relay_protocol.sign_ticket(TICKET_KEY, ticket)))
    return alice, data_leg(relay, alice.reply())


def open_with_leg(relay: Relay, holder: Client) -> tuple[Client, zmq.Socket[bytes]]:
    """bob, with a circuit to `holder` and its data leg open."""
    bob = client(relay)
    bob.send("open", circuit_ticket(bob, holder))
    return bob, data_leg(relay, bob.reply())


def test_data_legs_carry_frames_both_ways_untouched(relay: Relay) -> None:
    alice, alice_leg = attach_with_leg(relay)
    bob, bob_leg = open_with_leg(relay, alice)
    bob_leg.send(b"attach, opaque to the relay")
    assert alice_leg.poll(5000)
    circuit, frame = alice_leg.recv_multipart()
    assert len(circuit) == 16 and frame == b"attach, opaque to the relay"
    alice_leg.send_multipart([circuit, b"envelope", b"\x00" * 1_000_000])
    assert bob_leg.poll(5000)
    assert bob_leg.recv_multipart() == [b"envelope", b"\x00" * 1_000_000]
    assert not bob.sock.poll(100)  # nothing on the CurveZMQ circuit


def test_a_forged_absent_or_reused_data_ticket_is_refused(relay: Relay) -> None:
    alice, alice_leg = attach_with_leg(relay)
    bob = client(relay)
    bob.send("open", circuit_ticket(bob, alice))
    opened = bob.reply()
    mallory = data_leg(relay)
    mallory.send(crypto.random_bytes(relay_protocol.DATA_TICKET_SIZE))  # forged
    refused = refusal_on(mallory)
    assert refused.code == "unauthorized" and "not a data ticket" in refused.message
    mallory.send(b"an attach, no ticket first")  # absent
    assert "not a data ticket" in refusal_on(mallory).message
    mallory.send_multipart([b"x" * 16, b"two frames"])
    assert "not a data ticket" in refusal_on(mallory).message
    assert not alice_leg.poll(300)  # nothing reached the holder
    data_leg(relay, opened)  # bob's, used once
    ticket = from_wire(relay_protocol.DataLeg, opened.body).ticket
    mallory.send(ticket)  # seen on the wire, replayed: used already
    assert "not a data ticket" in refusal_on(mallory).message


def test_a_data_leg_to_a_holder_without_one_is_refused(relay: Relay) -> None:
    alice = attach(relay)  # never opens its data leg
    bob = client(relay)
    bob.send("open", circuit_ticket(bob, alice))
    leg = from_wire(relay_protocol.DataLeg, bob.reply().body)
    sock = data_leg(relay)
    sock.send(leg.ticket)
    refused = refusal_on(sock)
    assert refused.code == "not_found" and "use the circuit" in refused.message


def test_a_closed_circuit_closes_its_data_leg() -> None:
    for relay in serve_relay(RelayLimits(idle=5)):
        alice, alice_leg = attach_with_leg(relay)
        _bob, bob_leg = open_with_leg(relay, alice)
        time.sleep(5.5)
        bob_leg.send(b"late")
        assert not alice_leg.poll(500)


def test_data_legs_share_the_circuit_s_rate_limit() -> None:
    for relay in serve_relay(RelayLimits(user_rate=1_000_000)):
        alice, alice_leg = attach_with_leg(relay)
        _bob, bob_leg = open_with_leg(relay, alice)
        bob_leg.send(b"first")
        assert alice_leg.poll(5000)
        circuit, _ = alice_leg.recv_multipart()
        alice_leg.send_multipart([circuit, b"chunk", b"\x00" * 3_000_000])  # 3 s of budget
        assert bob_leg.poll(5000)
        bob_leg.recv_multipart()
        started = time.monotonic()
        bob_leg.send(b"second")  # held until the budget is back above zero
        assert alice_leg.poll(10_000)
        assert time.monotonic() - started > 1.5


# --- what one client can make the relay hold (issue 10) -------------------------------


def opened_circuit(relay: Relay) -> tuple[Client, Client]:
    alice, bob = attach(relay), client(relay)
    bob.send("open", circuit_ticket(bob, alice))
    assert bob.reply().op == "result"
    return alice, bob


def test_a_requester_frame_bigger_than_a_request_closes_the_circuit(relay: Relay) -> None:
    alice, bob = opened_circuit(relay)
    bob.sock.send(b"x" * (1024 * 1024))  # requests are a few kB; a chunk's worth is a flood
    refused = bob.refusal()
    assert refused.code == "busy" and "too large" in refused.message
    assert not alice.sock.poll(300)  # nothing forwarded, nothing queued for it
    bob.sock.send(b"after")  # the circuit is gone
    assert not alice.sock.poll(300)


def test_a_data_leg_frame_bigger_than_a_chunk_request_closes_the_circuit(relay: Relay) -> None:
    alice, alice_leg = attach_with_leg(relay)
    bob, bob_leg = open_with_leg(relay, alice)
    bob_leg.send(b"x" * (1024 * 1024))
    refused = bob.refusal()
    assert "too large" in refused.message
    assert not alice_leg.poll(300)


def test_a_holder_message_bigger_than_a_chunk_closes_the_circuit(relay: Relay) -> None:
    alice, bob = opened_circuit(relay)
    bob.sock.send(b"hello")
    assert alice.sock.poll(5000)
    circuit, _, _ = alice.sock.recv_multipart()
    alice.sock.send_multipart([circuit, *([b"\x00" * (4 * 1024 * 1024)] * 5)])  # 20 MiB
    refused = bob.refusal()
    assert "too large" in refused.message
    assert not bob.sock.poll(300)  # the flood itself never reached bob


def test_requests_to_a_holder_spend_the_requester_s_rate_and_are_bounded() -> None:
    """A requester pushing to a holder faster than its rate gets its frames held, a few;
    past that the circuit closes: the relay holds a bounded amount for it."""
    for relay in serve_relay(RelayLimits(user_rate=100_000)):
        alice, bob = opened_circuit(relay)
        for _ in range(100):  # 6 MB: a minute of budget
            bob.sock.send(b"x" * 60_000)
        refused = bob.refusal()
        assert "faster than its rate limit" in refused.message
        received = 0
        while alice.sock.poll(300):
            received += len(alice.sock.recv_multipart()[2])
        assert received <= 200_000  # about a second's budget, not the 6 MB sent


def test_a_circuit_the_requester_closes_is_gone_at_once(relay: Relay) -> None:
    """The relay's user_circuits is 2 here: closed circuits do not count, so a third
    in a row opens; what a closed one's connection sends later is forwarded nowhere."""
    alice = attach(relay)
    for _ in range(3):
        bob = client(relay)
        bob.send("open", circuit_ticket(bob, alice))
        assert bob.reply().op == "result"
        bob.sock.send(relay_protocol.CLOSE_CIRCUIT)
        assert not alice.sock.poll(100)  # the close is the relay's, not forwarded
        bob.sock.send(b"after the close")
        assert not alice.sock.poll(200)


# --- replies toward a requester that does not read (issue 10) -------------------------

MIB = 1024 * 1024


def opened_leg(
    relay: Relay, alice: Client, alice_leg: zmq.Socket[bytes], name: str, *, stalled: bool = False
) -> tuple[Client, zmq.Socket[bytes], bytes]:
    """A circuit for `name` to alice with its data leg, and its circuit id as alice sees it."""
    requester = client(relay)
    requester.send("open", circuit_ticket(requester, alice, name=name))
    leg = data_leg(relay, requester.reply(), stalled=stalled)
    leg.send(b"hello")
    assert alice_leg.poll(5000)
    circuit, frame = alice_leg.recv_multipart()
    assert frame == b"hello"
    return requester, leg, circuit


def drain(sock: zmq.Socket[bytes], quiet_ms: int = 500) -> int:
    """How many messages `sock` gets until it has been quiet `quiet_ms`."""
    count = 0
    while sock.poll(quiet_ms):
        sock.recv_multipart()
        count += 1
    return count


def test_requests_wait_while_the_requester_s_replies_are_not_read() -> None:
    """bob gets one chunk of 1 MiB, then asks for 30 more and never reads: the relay
    forwards his requests only while what it holds for him and what they may bring is
    under its reply credit (4 MiB here), so alice is asked for a few, not 30; carol,
    reading, is served meanwhile."""
    for relay in serve_relay(RelayLimits(), reply_credit=4 * MIB):
        alice, alice_leg = attach_with_leg(relay)
        _bob, bob_leg, bob_circuit = opened_leg(relay, alice, alice_leg, "bob", stalled=True)
        _carol, carol_leg, carol_circuit = opened_leg(relay, alice, alice_leg, "carol")
        alice_leg.send_multipart([bob_circuit, b"chunk", b"\x00" * MIB])  # sizes the credit
        assert bob_leg.poll(5000)
        bob_leg.recv_multipart()
        for i in range(30):
            bob_leg.send(b"request %d" % i)
        asked = 0
        while alice_leg.poll(500):  # alice answers every request that reaches her
            circuit, _ = alice_leg.recv_multipart()
            assert circuit == bob_circuit
            asked += 1
            alice_leg.send_multipart([circuit, b"chunk", b"\x00" * MIB])
        alice_leg.send_multipart([carol_circuit, b"for carol"])
        assert carol_leg.poll(5000)
        assert carol_leg.recv_multipart() == [b"for carol"]
        # 4 MiB held by the relay, plus the kernel's buffers (4 MiB at most here) and a
        # reply or two in bob's libzmq: well under the 30 asked for.
        assert asked <= 16, asked
        assert drain(bob_leg) == asked  # nothing was lost: bob gets what alice sent


def test_a_holder_pushing_replies_to_a_requester_that_does_not_read_closes_it() -> None:
    """Replies nobody asked for, on the circuit, to a requester that does not read: past
    twice the reply credit the relay closes the circuit, refuses that requester new
    circuits while they are unread, and goes on serving others."""
    for relay in serve_relay(RelayLimits(), reply_credit=4 * MIB):
        alice = attach(relay)
        bob, carol = client(relay, stalled=True), client(relay)
        circuits = []
        for requester, name in ((bob, "bob"), (carol, "carol")):
            requester.send("open", circuit_ticket(requester, alice, name=name))
            assert requester.reply().op == "result"
            requester.sock.send(b"hello")
            assert alice.sock.poll(5000)
            circuits.append(alice.sock.recv_multipart()[0])
        for _ in range(30):
            alice.sock.send_multipart([circuits[0], b"chunk", b"\x00" * MIB])
        alice.sock.send_multipart([circuits[1], b"for carol"])  # after bob's, in order
        assert carol.sock.poll(5000)
        assert carol.sock.recv_multipart() == [b"for carol"]
        again = client(relay)
        again.send("open", circuit_ticket(again, alice, name="bob"))
        refused = again.refusal()
        assert refused.code == "busy" and "not read" in refused.message
        assert "retry in" in refused.message
        # 8 MiB, the kernel's 4 MiB and a reply or two in bob's libzmq, not 30; then
        # the reason
        chunks = 0
        while True:
            assert bob.sock.poll(5000)
            frames = bob.sock.recv_multipart()
            if len(frames) == 1:
                break
            chunks += 1
        assert chunks <= 16
        assert "does not read" in protocol.decode_envelope(frames[0]).body["message"]


# --- failed opens are rate limited (issue 10) -----------------------------------------


def client_from(relay: Relay, source: str) -> Client:
    """A client whose connection comes from `source` (a loopback address)."""
    public, secret = zmq.curve_keypair()
    sock = relay.context.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = relay.public, public, secret
    sock.connect(relay.endpoint.replace("tcp://", f"tcp://{source}:0;"))
    relay.sockets.append(sock)
    return Client(sock, zmq.utils.z85.decode(public))


def test_failed_opens_are_rate_limited_per_key_then_per_address(relay: Relay) -> None:
    alice = attach(relay)
    mallory = client(relay)
    for _ in range(FAILED_PER_KEY):
        mallory.send("open", circuit_ticket(mallory, alice, expires_in=-1))
        assert mallory.refusal().message.startswith("ticket expired")
    mallory.send("open", circuit_ticket(mallory, alice))  # even a good ticket, now
    refused = mallory.refusal()
    assert refused.code == "throttled" and refused.message.startswith("rate limited")
    assert "retry in" in refused.message
    failed = FAILED_PER_KEY
    while failed < FAILED_PER_ADDRESS:  # fresh keys, same address
        other = client(relay)
        other.send("open", relay_protocol.Open(b"\x00" * 100, b"\x00" * 64))
        assert "not a ticket" in other.refusal().message
        failed += 1
    late = client(relay)
    late.send("open", circuit_ticket(late, alice))
    refused = late.refusal()
    assert refused.code == "throttled" and "your address" in refused.message
    bob = client_from(relay, "127.0.0.2")  # another address is not held up
    bob.send("open", circuit_ticket(bob, alice))
    assert bob.reply().op == "result"


# --- data-port connections that never give a ticket (issue 10) ------------------------


def watched(relay: Relay, source: str = "127.0.0.1") -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A DEALER connected to the data port from `source` that sends nothing, and a
    monitor of its connection's end."""
    sock = relay.context.socket(zmq.DEALER)
    sock.linger = 0
    sock.reconnect_ivl = -1  # a closed connection stays closed
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    sock.connect(relay.data_endpoint.replace("tcp://", f"tcp://{source}:0;"))
    relay.sockets.extend([sock, monitor])
    assert event_on(monitor, 5000) == zmq.EVENT_CONNECTED
    return sock, monitor


def event_on(monitor: zmq.Socket[bytes], timeout_ms: int) -> int | None:
    if not monitor.poll(timeout_ms):
        return None
    return int(recv_monitor_message(monitor)["event"])


def test_a_data_connection_that_sends_no_ticket_is_closed_at_its_deadline() -> None:
    for relay in serve_relay(RelayLimits(), data_deadline=1):
        alice, alice_leg = attach_with_leg(relay)  # legs that give their ticket stay
        _bob, bob_leg = open_with_leg(relay, alice)
        started = time.monotonic()
        raw = socket.create_connection(("127.0.0.1", int(relay.data_endpoint.rsplit(":", 1)[1])))
        _sock, monitor = watched(relay)
        assert event_on(monitor, 10_000) == zmq.EVENT_DISCONNECTED
        assert time.monotonic() - started >= 0.5
        with raw:  # not even ZeroMQ's greeting: closed by the handshake's deadline
            raw.settimeout(10)
            while raw.recv(4096):
                pass
        bob_leg.send(b"still here")  # its legs are past the deadline, and open
        assert alice_leg.poll(5000)
        assert alice_leg.recv_multipart()[1] == b"still here"


def test_data_connections_waiting_for_a_ticket_are_counted_per_address(relay: Relay) -> None:
    _first, first_monitor = watched(relay)
    for _ in range(MAX_WAITING_PER_SOURCE):
        watched(relay)
    # one too many from 127.0.0.1: the oldest waiting is closed
    assert event_on(first_monitor, 5000) == zmq.EVENT_DISCONNECTED
    _other, other_monitor = watched(relay, "127.0.0.2")  # another address is not affected
    alice, alice_leg = attach_with_leg(relay)  # and a leg with a ticket opens
    _bob, bob_leg = open_with_leg(relay, alice)
    bob_leg.send(b"through")
    assert alice_leg.poll(5000)
    assert event_on(other_monitor, 100) is None
