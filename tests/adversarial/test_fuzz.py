"""Fuzzing real `sfs-broker serve` and `sfs-peer serve` processes.

The attacker is this test process, with a CurveZMQ key of its own: it reaches the broker
with the broker's public key and alice's holder with her transport key, then sends what
no client should. Each request must be answered with an error or dropped, the server
must stay up with its memory bounded and no traceback or error in its log, and a real
client must be served afterwards (`sfs-peer search`, and `sfs-peer get` with the
original SHA-256).

What stops each attack:

- a frame over `maxmsgsize` (16 MiB broker, 64 KiB holder): ZeroMQ's decoder reads the
  size and drops the connection before it allocates anything;
- garbage, wrong types, unknown or missing fields, floats, extension types: `codec.unpack`,
  `protocol.decode_envelope` and `codec.from_wire`, answered `bad_request`;
- deep nesting: msgpack's 1024-level stack; containers declared huge:
  `codec.MAX_CONTAINER_ITEMS`; a frame of millions of small objects:
  `codec.MAX_DOCUMENT_ITEMS` (before it, one 16 MiB frame took ~370 MiB to decode);
- an unknown field named by 16 MiB of bytes: `codec.from_wire` names only a prefix
  (before, `str()` of the name made a 64 MiB string, then its repr another);
- extra frames: the frame layout checks of `broker/server.py` and `peer/server.py` drop
  the message unanswered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from sfs.common import codec, protocol
from sfs.common.config import load_peer_config
from sfs.common.errors import SfsError
from sfs.peer.client import BrokerClient
from sfs.peer.keys import Identity, load_identity
from sfs.peer.server import MAX_REQUEST_FRAME
from tests.harness import Cluster, Process

MiB = 1024 * 1024
REPLY_TIMEOUT_MS = 10_000  # generous: other test modules load the machine too
SILENCE_MS = 300  # how long "no answer" is awaited
# Peak resident memory a server may gain while it handles one attack. The holder reads
# frames of at most 64 KiB. A broker frame may be 16 MiB, and one is held up to six times
# over: encrypted and decrypted by ZeroMQ, copied twice by the router and once by a worker,
# and decoded. (Buffers that size stay in each thread's malloc arena afterwards, so the
# broker's memory after many such requests is bounded by its thread count, not by this.)
HOLDER_MEMORY_BOUND = 32 * MiB
BROKER_MEMORY_BOUND = 96 * MiB
OVERSIZED = 64 * MiB  # a frame far over both servers' limits

pytestmark = pytest.mark.harness


# --- memory -----------------------------------------------------------------------------


def status_bytes(pid: int, field: str) -> int:
    """A `VmXXX` line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no {field}")


class PeakMemory:
    """How far a process's resident memory rose during a `with` block: the kernel's peak
    (VmHWM) is reset on entry through /proc/PID/clear_refs and read on exit."""

    def __init__(self, process: Process) -> None:
        self.pid = process.popen.pid
        self.start = self.peak = 0

    def __enter__(self) -> PeakMemory:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
        self.start = status_bytes(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = status_bytes(self.pid, "VmHWM")

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def __str__(self) -> str:
        return f"peak {self.peak / MiB:.0f} MiB, {self.growth / MiB:+.1f} MiB over the start"


# --- the cluster and the attacker -----------------------------------------------------


@dataclass
class Target:
    """A server under attack."""

    name: str
    endpoint: str
    server_key: bytes  # z85 CurveZMQ public key
    process: Process
    max_frame: int
    memory_bound: int


@dataclass
class Setup:
    cluster: Cluster
    broker: Target
    holder: Target
    file_id: str
    sha256: str
    alice: Identity
    bob: Identity

    def target(self, name: str) -> Target:
        return self.broker if name == "broker" else self.holder

    def assert_serving(self, target: Target) -> None:
        """The server is up, its log is clean, and a real client is served."""
        for process in (self.broker.process, self.holder.process):
            log = process.output()
            assert process.alive(), f"{process.name} died:\n{log}"
            assert "Traceback" not in log and " ERROR " not in log, log
        bob = self.cluster.peers["bob"]
        if target is self.broker:
            key = self.cluster.broker_public_key()
            with BrokerClient(self.cluster.broker_endpoint, key, timeout=10) as client:
                assert client.ping().version == protocol.VERSION
            hits = bob.run("search", "--json").check().json()["hits"]
            assert self.file_id in [hit["file_id"] for hit in hits]
        else:
            got = bob.run("get", self.file_id, "--json").check().json()
            data = Path(got["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == self.sha256


@contextmanager
def running_cluster() -> Iterator[Setup]:
    """A broker, alice serving a shared 1.5 MiB file (two chunks), and bob."""
    with Cluster() as cluster:
        broker = cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        original = cluster.root / "shared.bin"
        original.write_bytes(os.urandom(3 * MiB // 2))
        file_id = alice.share(original)
        alice_identity = load_identity(alice.data_dir, "alice")
        assert alice.server is not None
        yield Setup(
            cluster,
            Target(
                "broker",
                cluster.broker_endpoint,
                cluster.broker_public_key(),
                broker,
                protocol.MAX_BROKER_FRAME,
                BROKER_MEMORY_BOUND,
            ),
            Target(
                "holder",
                load_peer_config(alice.config).listen,
                alice_identity.curve_public_z85,
                alice.server,
                MAX_REQUEST_FRAME,
                HOLDER_MEMORY_BOUND,
            ),
            file_id,
            hashlib.sha256(original.read_bytes()).hexdigest(),
            alice_identity,
            load_identity(bob.data_dir, "bob"),
        )


class Attacker:
    """Raw sockets in the test process, closed together at the end."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.opened: list[zmq.Socket[bytes]] = []

    def socket(
        self,
        endpoint: str,
        server_key: bytes | None,
        kind: int = zmq.DEALER,
        key_pair: tuple[bytes, bytes] | None = None,
        rcvhwm: int = 0,
    ) -> zmq.Socket[bytes]:
        """Connected to `endpoint`, with CurveZMQ toward `server_key` unless it is None,
        using `key_pair` (public, secret; z85) or a fresh one. By default nothing limits
        the queues: a flood waits here, and replies never back up at the server."""
        sock = self.context.socket(kind)
        self.opened.append(sock)
        sock.linger = 0
        sock.sndhwm = 0
        sock.rcvhwm = rcvhwm
        if server_key is not None:
            public, secret = key_pair or zmq.curve_keypair()
            sock.curve_serverkey = server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(endpoint)
        return sock

    def dealer(self, target: Target) -> zmq.Socket[bytes]:
        return self.socket(target.endpoint, target.server_key)

    def close(self) -> None:
        for sock in self.opened:
            sock.close(linger=0)
        self.context.term()


# --- replies ----------------------------------------------------------------------------


def receive(sock: zmq.Socket[bytes], what: str) -> list[bytes]:
    assert sock.poll(REPLY_TIMEOUT_MS), f"no answer to {what}"
    return sock.recv_multipart()


def check_reply(target: Target, reply: list[bytes], what: str) -> protocol.Envelope:
    """A reply is one well-formed envelope: a result (broker only) or an error whose
    code is a documented one."""
    assert len(reply) == 1, f"{what}: {len(reply)} frames in the reply"
    envelope = protocol.decode_envelope(reply[0])
    allowed = {"result", "error"} if target.name == "broker" else {"error"}
    assert envelope.op in allowed, f"{what}: reply {envelope.op!r}"
    if envelope.op == "error":
        error = codec.from_wire(protocol.ErrorBody, envelope.body, "error")
        assert error.code in {code.value for code in protocol.ErrorCode}, what
    return envelope


def expect_silence(sock: zmq.Socket[bytes], what: str) -> None:
    assert not sock.poll(SILENCE_MS), f"{what} got an answer"


def unanswered(target: Target, frame: bytes) -> bool:
    """Whether a well-behaved holder sends nothing back: `finish` has no reply."""
    if target.name != "holder":
        return False
    try:
        envelope = protocol.decode_envelope(frame)
        request = protocol.decode_body(envelope, protocol.PEER_REQUESTS)
    except SfsError:
        return False
    return isinstance(request, protocol.Finish)


# --- the catalogue of malformed messages ---------------------------------------------


def envelope(op: Any = "ping", body: Any = None, **fields: Any) -> bytes:
    body = {} if body is None else body
    value = {"v": protocol.VERSION, "op": op, "rid": 1, "body": body, **fields}
    return codec.pack(value)


def nested(levels: int, header: bytes = b"\x91") -> bytes:
    """`levels` containers, each holding the next, around a nil."""
    return header * levels + b"\xc0"


def small_objects(size: int) -> bytes:
    """About `size` bytes of lists of short strings: 3 bytes each on the wire, about 60
    once decoded into Python objects."""
    branch = b"\xdc\x00\x10" + codec.pack(["ab"] * 1000) * 16  # 16 lists of 1000
    count = max(1, size // len(branch))
    return b"\xdd" + count.to_bytes(4, "big") + branch * count


def declared(header: bytes, length: int, tail: bytes = b"") -> bytes:
    """A msgpack header that announces `length` items or bytes, followed by `tail` only."""
    return header + length.to_bytes(4, "big") + tail


def malformed_frames(target: Target) -> dict[str, bytes]:
    """Single frames that must each be answered with `bad_request`."""
    room = min(target.max_frame, 16 * MiB) - 4096  # below maxmsgsize, with CurveZMQ's overhead
    ping = protocol.encode("ping", protocol.Ping(), 1)
    if target.name == "broker":
        wrong_field = envelope("login", {"username": 7, "password": b"x"})
        unknown_field = envelope("ping", {"extra": 1})
        bool_as_int = envelope("search", {"token": "t", "limit": True})
        field_name = "token"
    else:
        wrong_field = envelope("get", {"transfer_id": "x" * 16, "index": "0"})
        unknown_field = envelope("finish", {"transfer_id": bytes(16), "extra": 1})
        bool_as_int = envelope("get", {"transfer_id": bytes(16), "index": True})
        field_name = "transfer_id"
    in_body = envelope("search", {field_name: None})[:-1]  # ends in the nil of that field
    return {
        "empty": b"",
        "nul": b"\x00",
        "never-used-byte": b"\xc1",
        "random": os.urandom(200),
        "list": codec.pack([1, 2, 3]),
        "int": codec.pack(7),
        "str": codec.pack("ping"),
        "bin": codec.pack(b"ping"),
        "float-version": envelope(v=float(protocol.VERSION)),
        "bool-version": envelope(v=True),
        "str-rid": envelope(rid="1"),
        "negative-rid": envelope(rid=-1),
        "rid-over-63-bits": envelope(rid=2**64 - 1),
        "int-op": envelope(op=5),
        "unknown-op": envelope(op="nonsense"),
        "list-body": envelope(body=[]),
        "missing-body": codec.pack({"v": protocol.VERSION, "op": "ping", "rid": 1}),
        "extra-envelope-key": envelope(extra=1),
        "field-of-wrong-type": wrong_field,
        "unknown-field": unknown_field,
        "bool-for-int": bool_as_int,
        "ext-type": codec.pack(msgpack.ExtType(1, b"x")),
        "ext-in-body": envelope("search", {field_name: msgpack.ExtType(5, b"")}),
        "timestamp-rid": envelope(rid=msgpack.Timestamp(1, 0)),
        "int-map-key": b"\x81\x01\x02",
        "invalid-utf8": b"\xa2\xff\xfe",
        "truncated": ping[:-1],
        "trailing-bytes": ping + b"trailing",
        "two-documents": ping + ping,
        "nested-lists": nested(min(100_000, room - 1)),
        "nested-maps": nested(min(100_000, room // 3 - 1), b"\x81\xa1k"),
        "nested-in-body": in_body + nested(min(100_000, room - len(in_body) - 1)),
        "nested-huge-headers": nested(1000, declared(b"\xdd", 100_000)),
        "map-declaring-4g-entries": declared(b"\xdf", 2**32 - 1),
        "array-declaring-4g-items": declared(b"\xdd", 2**32 - 1),
        "body-declaring-4g-entries": envelope()[:-1] + declared(b"\xdf", 2**32 - 1),
        "str-declaring-4-gib": declared(b"\xdb", 2**32 - 1, b"abc"),
        "bin-declaring-4-gib": declared(b"\xc6", 2**32 - 1, b"abc"),
        "ext-declaring-4-gib": declared(b"\xc9", 2**32 - 1, b"\x01abc"),
        "million-nils": declared(b"\xdd", room - 5, b"\xc0" * (room - 5)),
        "small-objects-filling-the-frame": small_objects(room),
        "huge-str-op": envelope(op="x" * (room - 100)),
        "huge-unknown-field": envelope(body={"k" * (room - 100): 1}),
        "huge-unknown-bytes-field": envelope(body={bytes(room - 100): 1}),  # str() x4
    }


def extra_frame_messages(target: Target) -> dict[str, list[bytes]]:
    """Messages whose layout allows no reply: dropped."""
    ping = protocol.encode("ping", protocol.Ping(), 1)
    messages = {
        "three-frames": [b"one", b"two", b"three"],
        "non-empty-delimiter": [b"x", ping],
        "extra-frame-after": [ping, b"extra"],
        "two-delimiters": [b"", b"", ping],
        "a-thousand-frames": [b"x"] * 1000,
    }
    if target.name == "holder":  # requesters are DEALERs; the REQ layout is not accepted
        messages["req-layout"] = [b"", ping]
    return messages


@pytest.mark.parametrize("name", ["broker", "holder"])
def test_malformed_frames_are_refused(setup: Setup, attacker: Attacker, name: str) -> None:
    target = setup.target(name)
    sock = attacker.dealer(target)
    worst = (0, "")
    for what, frame in malformed_frames(target).items():
        with PeakMemory(target.process) as memory:
            sock.send(frame, copy=False)
            envelope = check_reply(target, receive(sock, what), what)
        assert envelope.op == "error" and envelope.body["code"] == "bad_request", what
        assert memory.growth < target.memory_bound, f"{what}: {memory}"
        worst = max(worst, (memory.growth, f"{what}: {memory}"))
    print(f"{name}, malformed frames, the worst: {worst[1]}")
    with PeakMemory(target.process) as memory:
        for what, frames in extra_frame_messages(target).items():
            sock.send_multipart(frames)
            expect_silence(sock, what)
        if name == "broker":  # a REQ client's layout, with its empty delimiter: answered
            sock.send_multipart([b"", protocol.encode("ping", protocol.Ping(), 7)])
            delimiter, reply = receive(sock, "the REQ layout")
            assert delimiter == b"" and check_reply(target, [reply], "REQ").rid == 7
    print(f"{name}, extra frames: {memory}")
    assert memory.growth < target.memory_bound, str(memory)
    setup.assert_serving(target)


@pytest.mark.parametrize("name", ["broker", "holder"])
def test_oversized_frames_drop_the_connection(setup: Setup, attacker: Attacker, name: str) -> None:
    target = setup.target(name)
    with PeakMemory(target.process) as memory:
        for size in (target.max_frame + 1, OVERSIZED):
            sock = attacker.dealer(target)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                sock.send(zmq.Frame(bytes(size)), copy=False)
                assert monitor.poll(REPLY_TIMEOUT_MS), f"a {size}-byte frame kept the connection"
                assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
                expect_silence(sock, f"a {size}-byte frame")
            finally:
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
    print(f"{name}, oversized frames: {memory}")
    # Refused from the length header: the 64 MiB frame is never held.
    assert memory.growth < 8 * MiB, str(memory)
    setup.assert_serving(target)


# --- random frames --------------------------------------------------------------------


def msgpack_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(),
        st.text(max_size=40),
        st.binary(max_size=40),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
        # values that get past the type checks more often
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=32, max_size=32),
        st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        st.from_regex(protocol.USERNAME_PATTERN, fullmatch=True),
        st.just("tcp://127.0.0.1:1"),
    )
    keys = st.one_of(st.text(max_size=12), st.binary(max_size=4), st.integers(0, 9))
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
        max_leaves=30,
    )


def field_names(registry: dict[str, type[codec.Record]]) -> list[str]:
    return sorted({f.name for cls in registry.values() for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def frames(registry: dict[str, type[codec.Record]]) -> st.SearchStrategy[bytes]:
    """Raw bytes, msgpack documents, and envelopes of the right shape or nearly."""
    values = msgpack_values()
    body = st.dictionaries(st.sampled_from(field_names(registry)) | st.text(max_size=8), values)
    parts = {
        "v": st.sampled_from([1, 2]) | values,
        "op": st.sampled_from(sorted(registry)) | st.text(max_size=12),
        "rid": st.integers(0, 2**63 - 1) | values,
        "body": body | values,
    }
    envelopes = st.fixed_dictionaries(parts, optional={"extra": values}) | st.fixed_dictionaries(
        {}, optional=parts
    )
    return st.one_of(st.binary(max_size=512), values.map(codec.pack), envelopes.map(codec.pack))


def registry_of(target: Target) -> dict[str, type[codec.Record]]:
    return protocol.BROKER_REQUESTS if target.name == "broker" else protocol.PEER_REQUESTS


@pytest.mark.parametrize("name", ["broker", "holder"])
def test_hypothesis_frames_are_answered_or_dropped(
    setup: Setup, attacker: Attacker, name: str
) -> None:
    target = setup.target(name)
    sock = attacker.dealer(target)

    @settings(max_examples=300, deadline=None, database=None)
    @given(frame=frames(registry_of(target)))
    def one_frame(frame: bytes) -> None:
        sock.send(frame)
        if unanswered(target, frame):
            assert not sock.poll(50), "finish got an answer"
            return
        reply = check_reply(target, receive(sock, repr(frame[:80])), repr(frame[:80]))
        try:
            envelope = protocol.decode_envelope(frame)
            rid = envelope.rid if name == "broker" else 0  # holders answer with rid 0
        except protocol.VersionMismatch as mismatch:  # both answer `upgrade`, in its rid
            rid = mismatch.rid
        except SfsError:
            rid = 0
        assert reply.rid == rid

    with PeakMemory(target.process) as memory:
        one_frame()
    print(f"{name}, hypothesis frames: {memory}")
    assert memory.growth < target.memory_bound, str(memory)
    setup.assert_serving(target)


def seeds(setup: Setup, target: Target) -> list[bytes]:
    """Valid requests to mutate (none of them with a real session or connection key)."""
    if target.name == "broker":
        bundle = setup.bob.bundle
        return [
            protocol.encode("ping", protocol.Ping(), 1),
            protocol.encode("challenge", protocol.GetChallenge(), 2),
            protocol.encode("login", protocol.Login("mallory", "password"), 3),
            protocol.encode("search", protocol.Search("t" * 43, "report", "alice"), 4),
            protocol.encode("lookup", protocol.Lookup("t" * 43, setup.file_id), 5),
            protocol.encode("bundle", protocol.GetBundle("t" * 43, "alice"), 6),
            protocol.encode("heartbeat", protocol.Heartbeat("t" * 43, "tcp://127.0.0.1:9"), 7),
            protocol.encode(
                "register",
                protocol.Register("mallory", "pw", bundle, bytes(32), bytes(384)),
                8,
            ),
        ]
    unsigned = protocol.Hello(
        setup.file_id, "bob", setup.bob.bundle, os.urandom(32), setup.alice.fingerprint, b""
    )
    hello = dataclasses.replace(
        unsigned, signature=setup.bob.sign(protocol.hello_payload(unsigned))
    )
    return [
        protocol.encode("hello", hello),  # refused: this connection's key is not bob's
        protocol.encode("get", protocol.ChunkRequest(os.urandom(16), 0)),
        protocol.encode("finish", protocol.Finish(os.urandom(16))),
    ]


INTERESTING_BYTES = b"\x00\x7f\x80\x90\xc0\xc1\xc4\xc6\xc9\xd4\xdb\xdc\xdd\xde\xdf\xff"


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        step = rng.randrange(5)
        if step == 0 and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif step == 1 and at < len(data):
            data[at] = rng.choice(INTERESTING_BYTES)
        elif step == 2:
            del data[at : at + rng.randint(1, 8)]
        elif step == 3:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            start = rng.randrange(len(data) + 1)
            data[at:at] = data[start : start + rng.randint(1, 64)]
    return bytes(data)


@pytest.mark.parametrize("name", ["broker", "holder"])
def test_thousands_of_random_and_mutated_frames(
    setup: Setup, attacker: Attacker, name: str
) -> None:
    target = setup.target(name)
    sock = attacker.dealer(target)
    valid = seeds(setup, target)
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    with PeakMemory(target.process) as memory:
        for batch in range(40):  # 40 x 50 frames, sent together, then every reply awaited
            sent = [
                rng.randbytes(rng.randrange(300))
                if rng.random() < 0.5
                else mutate(rng, rng.choice(valid))
                for _ in range(50)
            ]
            for frame in sent:
                sock.send(frame)
            for number in range(sum(not unanswered(target, frame) for frame in sent)):
                what = f"seed {seed}, batch {batch}, reply {number}"
                check_reply(target, receive(sock, what), what)
        expect_silence(sock, f"seed {seed}: more replies than requests")
    print(f"{name}, 2000 random and mutated frames: {memory}")
    assert memory.growth < target.memory_bound, str(memory)
    setup.assert_serving(target)
