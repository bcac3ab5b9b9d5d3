"""Work a request costs before it has shown a valid session, and text no store can hold.

- One heartbeat whose endpoint is 16 MiB of `a.a.a…` once made the broker run its
  endpoint pattern over all of it: about 1.4 s of CPU each under the GIL, before any
  session check, while every other client waited. The codec now checks every size
  before any pattern (`codec._check_limits`) and refuses records with an unbounded
  field (`codec._require_bounds`), so such a frame costs its decoding and no more.
- A NUL in a search term reached the FTS5 query and failed there: `internal` for the
  user and an ERROR in the broker's log each time. The codec refuses NUL in every text
  field, as bad input.
"""

from __future__ import annotations

import threading
import time

import pytest

from sfs.common import codec, protocol
from sfs.common.errors import RemoteError
from sfs.peer.client import BrokerClient
from sfs.peer.keys import load_identity
from sfs.peer.session import load_session
from tests.adversarial.test_fuzz import Attacker, Setup, receive

ATTACK_FRAMES = 6
# What an honest ping may wait while the attack runs. Generous for a loaded 2-core
# machine; before the fix the wait was several seconds (each frame ~1.4 s of CPU).
HONEST_WAIT_BOUND = 2.5


def huge_heartbeat(rid: int) -> bytes:
    endpoint = "tcp://" + "a." * ((protocol.MAX_BROKER_FRAME - 4096) // 2)
    body = {"token": "not-a-token", "endpoint": endpoint}
    return codec.pack({"v": protocol.VERSION, "op": "heartbeat", "rid": rid, "body": body})


def test_a_huge_endpoint_does_not_stall_the_broker(setup: Setup, attacker: Attacker) -> None:
    """Stopped by: sizes checked before patterns in the codec."""
    waits: list[float] = []
    attacking = threading.Event()
    done = threading.Event()

    def honest_client() -> None:
        key = setup.cluster.broker_public_key()
        with BrokerClient(setup.cluster.broker_endpoint, key, timeout=30) as client:
            attacking.wait(10)
            while not done.is_set():
                started = time.monotonic()
                client.ping()
                waits.append(time.monotonic() - started)
                time.sleep(0.02)

    pinger = threading.Thread(target=honest_client)
    pinger.start()
    try:
        sock = attacker.dealer(setup.broker)
        frames = [huge_heartbeat(rid) for rid in range(1, ATTACK_FRAMES + 1)]
        attacking.set()
        for frame in frames:
            sock.send(frame)
        for number in range(ATTACK_FRAMES):
            envelope = protocol.decode_envelope(receive(sock, f"attack frame {number}")[0])
            error = codec.from_wire(protocol.ErrorBody, envelope.body, "error")
            assert (error.code, error.message) == ("bad_request", "endpoint: longer than 300")
    finally:
        done.set()
        pinger.join(60)
    assert waits, "the honest client was never answered"
    print(f"longest honest wait during the attack: {max(waits) * 1000:.0f} ms")
    assert max(waits) < HONEST_WAIT_BOUND
    setup.assert_serving(setup.broker)


def test_a_nul_in_a_search_term_is_bad_input_not_an_internal_error(setup: Setup) -> None:
    """Stopped by: the codec refuses NUL in every text field."""
    bob = setup.cluster.peers["bob"]
    token = load_session(bob.data_dir, "bob").token
    identity = load_identity(bob.data_dir, "bob")
    key = setup.cluster.broker_public_key()
    with BrokerClient(setup.cluster.broker_endpoint, key, identity.transport_key) as client:
        for query in ("a\0b", "\0", "report \0"):
            with pytest.raises(RemoteError) as refused:
                client.search(token, query)
            assert refused.value.code == "bad_request"
            assert str(refused.value).endswith("query: contains a NUL character")
    setup.assert_serving(setup.broker)  # and no ERROR in the broker's log
