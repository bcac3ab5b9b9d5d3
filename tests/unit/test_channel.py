"""sfs.peer.channel, sfs.peer.hints and sfs.peer.connect: in-memory channels, hints from a
holder's listing, the connector's order of tries, and the zmq channel against a ROUTER
and a silent port on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import zmq

from sfs.common import protocol
from sfs.common.errors import TransportError
from sfs.peer.channel import Channel, Interrupt, MemoryChannel, ZmqChannel, memory_pair
from sfs.peer.connect import Connector
from sfs.peer.hints import DirectHint, Hint, RelayHint, hints_of
from sfs.peer.keys import Identity, create_identity

# --- in memory ------------------------------------------------------------------------


def test_what_one_end_sends_the_other_receives() -> None:
    near, far = memory_pair("memory://alice")
    assert near.address == "memory://alice"
    near.send([b"a", b"b"])
    near.send([b"c"])
    assert far.receive(1) == [b"a", b"b"]
    assert far.receive(1) == [b"c"]
    far.send([b"back"])
    assert near.receive(1) == [b"back"]


def test_nothing_to_receive_within_the_timeout() -> None:
    near, _far = memory_pair()
    assert near.receive(0) is None
    assert near.receive(0.01) is None


def test_a_closed_end_is_reported_to_the_other() -> None:
    near, far = memory_pair("memory://alice")
    far.send([b"last words"])
    far.close()
    assert near.receive(1) == [b"last words"]  # what was sent before still arrives
    with pytest.raises(TransportError, match=r"^memory://alice closed the connection$"):
        near.receive(1)
    with pytest.raises(TransportError, match=r"^memory://alice is closed$"):
        near.send([b"anyone?"])


def test_a_closed_end_cannot_be_used() -> None:
    near, _far = memory_pair("memory://alice")
    near.close()
    near.close()  # twice is fine
    with pytest.raises(TransportError):
        near.send([b"x"])
    with pytest.raises(TransportError):
        near.receive(0)


# --- hints and the connector ----------------------------------------------------------


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return create_identity(tmp_path_factory.mktemp("alice"), "alice")


@pytest.fixture(scope="module")
def bob(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return create_identity(tmp_path_factory.mktemp("bob"), "bob")


def holder_of(identity: Identity, endpoint: str = "tcp://127.0.0.1:4000") -> protocol.Holder:
    return protocol.Holder(identity.username, endpoint, identity.bundle)


def test_a_holder_is_reached_at_its_endpoint(alice: Identity) -> None:
    assert hints_of(holder_of(alice)) == [DirectHint("tcp://127.0.0.1:4000")]


def test_hints_come_direct_first_ipv6_before_ipv4_then_relays(alice: Identity) -> None:
    listed = protocol.Holder(
        "alice",
        "tcp://10.0.0.2:4000",
        alice.bundle,
        [
            protocol.ConnectionHint("relay", "tcp://relay:5602", b"\x01" * 32),
            protocol.ConnectionHint("direct", "tcp://10.0.0.2:4000"),
            protocol.ConnectionHint("direct", "tcp://[2001:db8::2]:4000"),
            protocol.ConnectionHint("direct", "tcp://10.0.0.2:4000"),  # listed twice: once
        ],
    )
    assert hints_of(listed) == [
        DirectHint("tcp://[2001:db8::2]:4000"),
        DirectHint("tcp://10.0.0.2:4000"),
        RelayHint("tcp://relay:5602", b"\x01" * 32),
    ]


def test_a_direct_hint_before_a_relay_gets_a_short_timeout(alice: Identity) -> None:
    direct, relay = Dialer(), Dialer("tcp://relay")
    hints: list[Hint] = [DirectHint("tcp://home"), RelayHint("tcp://relay", b"\x01" * 32)]
    connector = Connector({DirectHint: direct, RelayHint: relay}, 10)
    channel = connector.connect(holder_of(alice), hints, never)
    assert channel.address == "tcp://relay"
    assert direct.tried == [("tcp://home", 3.0)] and relay.tried == [("tcp://relay", 10)]
    # Without a relay to fall back to, the direct hint has the whole timeout.
    direct.tried.clear()
    with pytest.raises(TransportError):
        Connector({DirectHint: direct}, 10).connect(holder_of(alice), hints[:1], never)
    assert direct.tried == [("tcp://home", 10)]


class Dialer:
    """Opens a memory channel for the endpoints in `up`; the others fail."""

    def __init__(self, *up: str) -> None:
        self.up = set(up)
        self.tried: list[tuple[str, float]] = []

    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        self.tried.append((hint.endpoint, timeout))
        if hint.endpoint not in self.up:
            raise TransportError(f"no answer from {hint.endpoint} within {timeout:g} s")
        return memory_pair(hint.endpoint)[0]


def never() -> None:
    pass


def test_the_connector_tries_hints_in_order(alice: Identity) -> None:
    dialer = Dialer("tcp://b", "tcp://c")
    hints = [DirectHint("tcp://a"), DirectHint("tcp://b"), DirectHint("tcp://c")]
    channel = Connector({DirectHint: dialer}, 7).connect(holder_of(alice), hints, never)
    assert channel.address == "tcp://b"
    assert dialer.tried == [("tcp://a", 7), ("tcp://b", 7)]  # c was not needed


def test_the_connector_names_every_failure(alice: Identity) -> None:
    dialer = Dialer()
    hints = [DirectHint("tcp://a"), DirectHint("tcp://b")]
    with pytest.raises(
        TransportError,
        match=r"^cannot reach alice: no answer from tcp://a within 3 s; "
        r"no answer from tcp://b within 3 s$",
    ):
        Connector({DirectHint: dialer}, 3).connect(holder_of(alice), hints, never)


def test_a_hint_without_a_dialer_is_skipped(alice: Identity) -> None:
    connector = Connector({}, 3)
    with pytest.raises(
        TransportError, match=r"^cannot reach alice: tcp://a: not a way this peer can connect$"
    ):
        connector.connect(holder_of(alice), [DirectHint("tcp://a")], never)


def test_no_hints_at_all(alice: Identity) -> None:
    with pytest.raises(TransportError, match=r"^alice gave no way to reach it$"):
        Connector({DirectHint: Dialer()}, 3).connect(holder_of(alice), [], never)


def test_an_interrupt_while_dialing_is_not_a_failure(alice: Identity) -> None:
    """What `interrupt` raises (a stop, a set-aside) ends the tries at once."""

    class Stop(Exception):
        pass

    class Interrupted(Dialer):
        def dial(
            self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
        ) -> Channel:
            self.tried.append((hint.endpoint, timeout))
            interrupt()
            raise AssertionError("not reached")

    def stop() -> None:
        raise Stop

    dialer = Interrupted()
    with pytest.raises(Stop):
        Connector({DirectHint: dialer}, 3).connect(
            holder_of(alice), [DirectHint("tcp://a"), DirectHint("tcp://b")], stop
        )
    assert dialer.tried == [("tcp://a", 3)]


class SlowDialer:
    """Opens `endpoint` after `delays[endpoint]` seconds (never, if absent: it waits out
    its timeout), calling `interrupt` as a real connection attempt does."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.started: dict[str, float] = {}
        self.called_off: list[str] = []
        self.opened: list[MemoryChannel] = []

    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        self.started[hint.endpoint] = time.monotonic()
        deadline = time.monotonic() + min(timeout, self.delays.get(hint.endpoint, timeout))
        while time.monotonic() < deadline:
            try:
                interrupt()
            except BaseException:
                self.called_off.append(hint.endpoint)
                raise
            time.sleep(0.01)
        if hint.endpoint not in self.delays:
            raise TransportError(f"no answer from {hint.endpoint} within {timeout:g} s")
        channel = memory_pair(hint.endpoint)[0]
        self.opened.append(channel)
        return channel


def test_staggered_the_relay_starts_while_direct_still_waits_and_wins(alice: Identity) -> None:
    dialer = SlowDialer({"tcp://relay": 0.05})
    hints: list[Hint] = [DirectHint("tcp://home"), RelayHint("tcp://relay", b"\x01" * 32)]
    connector = Connector({DirectHint: dialer, RelayHint: dialer}, 10, stagger=0.2)
    started = time.monotonic()
    channel = connector.connect(holder_of(alice), hints, never)
    assert channel.address == "tcp://relay"
    assert time.monotonic() - started < 1.5  # not the direct hint's 3 s
    assert dialer.started["tcp://relay"] - dialer.started["tcp://home"] >= 0.19
    deadline = time.monotonic() + 2
    while "tcp://home" not in dialer.called_off:  # the loser is called off
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_staggered_a_fast_first_hint_never_starts_the_next(alice: Identity) -> None:
    dialer = SlowDialer({"tcp://home": 0.0, "tcp://relay": 0.0})
    hints: list[Hint] = [DirectHint("tcp://home"), RelayHint("tcp://relay", b"\x01" * 32)]
    connector = Connector({DirectHint: dialer, RelayHint: dialer}, 10, stagger=0.5)
    assert connector.connect(holder_of(alice), hints, never).address == "tcp://home"
    assert list(dialer.started) == ["tcp://home"]


def test_staggered_a_failure_starts_the_next_at_once_and_all_are_named(alice: Identity) -> None:
    dialer = Dialer()  # fails at once
    hints: list[Hint] = [DirectHint("tcp://a"), DirectHint("tcp://b"), DirectHint("tcp://c")]
    connector = Connector({DirectHint: dialer}, 3, stagger=10)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"^cannot reach alice: no answer from tcp://a"):
        connector.connect(holder_of(alice), hints, never)
    assert time.monotonic() - started < 2  # never waited out a 10 s stagger
    assert sorted(endpoint for endpoint, _ in dialer.tried) == ["tcp://a", "tcp://b", "tcp://c"]


def test_staggered_the_caller_s_interrupt_calls_every_attempt_off(alice: Identity) -> None:
    class Stop(Exception):
        pass

    stops = iter([False] * 10 + [True] * 1000)

    def stop_soon() -> None:
        if next(stops):
            raise Stop

    dialer = SlowDialer({})
    hints: list[Hint] = [DirectHint("tcp://a"), DirectHint("tcp://b")]
    with pytest.raises(Stop):
        Connector({DirectHint: dialer}, 30, stagger=0.05).connect(
            holder_of(alice), hints, stop_soon
        )
    deadline = time.monotonic() + 2
    while sorted(dialer.called_off) != ["tcp://a", "tcp://b"]:
        assert time.monotonic() < deadline, dialer.called_off
        time.sleep(0.01)


# --- zmq ------------------------------------------------------------------------------


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    made: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield made
    made.destroy(linger=0)


@pytest.mark.parametrize("encrypted", [True, False], ids=["curve", "plain"])
def test_a_zmq_channel_to_a_router(
    context: zmq.Context[zmq.Socket[bytes]], alice: Identity, bob: Identity, encrypted: bool
) -> None:
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    if encrypted:
        router.curve_server = True
        router.curve_secretkey = alice.curve_secret_z85
        router.curve_publickey = alice.curve_public_z85
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    curve = (alice.bundle.curve_z85(), bob.curve_public_z85, bob.curve_secret_z85)
    channel = ZmqChannel.open(context, endpoint, 20, never, curve if encrypted else None)
    try:
        assert channel.address == endpoint
        channel.send([b"hello", b"there"])
        assert router.poll(20_000)
        routing, *frames = router.recv_multipart()
        assert frames == [b"hello", b"there"]
        router.send_multipart([routing, b"offer"])
        assert channel.receive(20) == [b"offer"]
        assert channel.receive(0.01) is None
    finally:
        channel.close()
        router.close()


def test_a_wrong_server_key_never_opens(
    context: zmq.Context[zmq.Socket[bytes]], alice: Identity, bob: Identity
) -> None:
    """A holder that cannot prove alice's key fails the CurveZMQ handshake: no channel."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_server = True
    router.curve_secretkey = bob.curve_secret_z85  # not alice's
    router.curve_publickey = bob.curve_public_z85
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    curve = (alice.bundle.curve_z85(), bob.curve_public_z85, bob.curve_secret_z85)
    try:
        with pytest.raises(TransportError, match=rf"^no answer from {endpoint} within 0\.5 s$"):
            ZmqChannel.open(context, endpoint, 0.5, never, curve)
    finally:
        router.close()


def test_a_silent_port_never_opens(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """The kernel accepts the TCP connection; nobody speaks ZMTP."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(TransportError, match=rf"^no answer from {endpoint} within 0\.3 s$"):
            ZmqChannel.open(context, endpoint, 0.3, never, None)


def test_waiting_for_a_silent_port_can_be_interrupted(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    calls = 0

    class Stop(Exception):
        pass

    def stop_on_third() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Stop

    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(Stop):
            ZmqChannel.open(context, endpoint, 600, stop_on_third, None)
    assert calls == 3


def test_an_endpoint_zmq_cannot_parse(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    with pytest.raises(TransportError, match=r"^cannot connect to tcp://no port: "):
        ZmqChannel.open(context, "tcp://no port", 1, never, None)


def test_a_chunk_sized_frame_is_not_copied_out_of_zmq(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A chunk comes as a view of ZeroMQ's own buffer; small frames stay bytes."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    channel = ZmqChannel.open(context, endpoint, 20, never, None)
    try:
        channel.send([b"get"])
        assert router.poll(20_000)
        routing, _ = router.recv_multipart()
        chunk = bytes(range(256)) * 4096  # 1 MiB
        router.send_multipart([routing, b"chunk", chunk])
        reply = channel.receive(20)
        assert reply is not None
        header, payload = reply
        assert isinstance(header, bytes) and header == b"chunk"
        assert isinstance(payload, memoryview) and payload == chunk
    finally:
        channel.close()
        router.close()
