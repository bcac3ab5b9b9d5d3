"""Real `sfs-peer` processes meet a broker of another protocol version: `register`, `login`
and `serve` ask its version with `ping` first and stop there, with the one `upgrade sfs`
line, before they send a password or a key (docs/PROTOCOL-v2.md §1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from sfs.common import codec, protocol
from tests.harness import Cluster, one_line_error

pytestmark = pytest.mark.harness

OTHER = protocol.VERSION + 1


class OtherVersionBroker:
    """A CurveZMQ ROUTER on the cluster's broker endpoint that answers every request as a
    broker of version `OTHER` would answer `ping` (a result that carries its version, in
    the request's envelope) and records the ops it was sent."""

    def __init__(self, cluster: Cluster) -> None:
        public, secret = zmq.curve_keypair()
        key_file = cluster.root / "broker" / "broker.pub"
        key_file.parent.mkdir()
        key_file.write_bytes(public + b"\n")
        self.ops: list[str] = []
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self._socket.curve_server = True
        self._socket.curve_secretkey = secret
        self._socket.bind(cluster.broker_endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(50):
                continue
            caller, frame = self._socket.recv_multipart()
            request = codec.unpack(frame)
            self.ops.append(request["op"])
            body = {"version": OTHER, "time": int(time.time())}
            reply = {"v": request["v"], "op": "result", "rid": request["rid"], "body": body}
            self._socket.send_multipart([caller, codec.pack(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()
        self._context.term()


@pytest.fixture
def other_broker() -> Iterator[tuple[Cluster, OtherVersionBroker]]:
    with Cluster() as cluster:
        broker = OtherVersionBroker(cluster)
        try:
            yield cluster, broker
        finally:
            broker.close()


@pytest.mark.parametrize(
    "args",
    [
        ["register", "--password-stdin"],
        ["register"],  # no terminal to ask on: the version is checked before the prompt
        ["login", "--password-stdin"],
        ["login"],
        ["serve"],
    ],
)
def test_a_broker_of_another_version_is_refused_before_anything_is_sent(
    other_broker: tuple[Cluster, OtherVersionBroker], args: list[str]
) -> None:
    cluster, broker = other_broker
    peer = cluster.add_peer("alice", register=False)
    stdin = "--password-stdin" in args
    result = peer.run(*args, input=peer.password + "\n" if stdin else "", timeout=30)
    line = one_line_error(result)
    assert line == (
        f"error: upgrade sfs: the broker at {cluster.broker_endpoint} speaks protocol"
        f" version {OTHER}, this peer speaks {protocol.VERSION}"
    )
    assert broker.ops == ["ping"]  # no challenge, password or device login went out
    assert not (peer.data_dir / "session.json").exists()
