"""The relay with real processes on the loopback: a broker with a `relay:` section, the
relay in its own process (`sfs-broker relay`), and holders that cannot be reached at the
endpoint they advertise (a closed port), so only the relay carries their chunks.

The same across a real NAT lives in test_relay_nat.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from sfs.broker.relay import RelayServer
from sfs.broker.relay_keys import relay_curve_keys, ticket_public_key
from sfs.common import protocol
from sfs.common.config import RelayLimits, load_broker_config
from sfs.common.errors import RemoteError
from sfs.peer.client import BrokerClient
from tests.harness import (
    Cluster,
    Peer,
    command_for,
    free_port,
    one_line_error,
    tcp_endpoint,
    wait_for_partial,
)

pytestmark = pytest.mark.harness

SIZE = 3_000_000


def relay_section(host: str, port: int, **limits: int) -> str:
    """The broker config's `relay:` section, as text after `relay:`."""
    lines = ["", f"  bind: {tcp_endpoint(host, port)}"]
    if limits:
        lines.append("  limits:")
        lines += [f"    {key}: {value}" for key, value in limits.items()]
    return "\n".join(lines)


def online_text(cluster: Cluster, name: str) -> str:
    """How `status --json` lists `name`'s hints, joined (relays as `relay tcp://...`)."""
    online = {p["username"]: p["hints"] for p in cluster.broker_status()["online"]}
    return " ".join(online.get(name, []))


def wait_for_relay_hint(cluster: Cluster, name: str, present: bool = True) -> None:
    deadline = time.monotonic() + 30
    while ("relay " in online_text(cluster, name)) != present:
        if time.monotonic() > deadline:
            peer = cluster.peers[name]
            out = peer.server.output() if peer.server else ""
            raise AssertionError(
                f"{name}'s relay hint never {'came' if present else 'went'}:\n{out}"
            )
        time.sleep(0.2)


def share(
    peer: Peer, folder: Path, name: str = "relayed.bin", size: int = SIZE
) -> tuple[str, Path]:
    source = folder / name
    source.write_bytes(os.urandom(size))
    file_id = peer.run("share", str(source), "--json").check().json()["file_id"]
    return file_id, source


def get(peer: Peer, file_id: str, *args: str) -> dict[str, Any]:
    got: dict[str, Any] = peer.run("get", file_id, "--json", *args).check().json()
    return got


def unreachable_endpoint(cluster: Cluster) -> str:
    """An endpoint on this host where nothing listens."""
    return tcp_endpoint(cluster.host, free_port(cluster.host))


def test_an_unreachable_holder_serves_through_the_relay_in_auto_mode() -> None:
    with Cluster() as cluster:
        cluster.start_broker(relay=relay_section(cluster.host, free_port()))
        cluster.start_relay()
        # alice listens on one port but advertises another where nothing listens: the
        # relay's probe fails, so she is listed with a relay hint too.
        alice = cluster.add_peer("alice", advertise=unreachable_endpoint(cluster))
        alice.serve()
        bob = cluster.add_peer("bob")
        wait_for_relay_hint(cluster, "alice")
        assert "not reachable from outside" in alice.server.output()  # type: ignore[union-attr]
        file_id, source = share(alice, cluster.root)
        got = get(bob, file_id)
        assert (
            hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest()
            == hashlib.sha256(source.read_bytes()).hexdigest()
        )
        assert Path(got["path"]).read_bytes() == source.read_bytes()
        assert got["holders"] == ["alice"]
        assert got["paths"]["alice"].startswith("relay tcp://")


def test_gets_in_a_row_close_their_circuits_so_the_user_limit_is_not_hit() -> None:
    """Each get opens circuits (index, then chunks) and closes them when done: with
    `user_circuits: 2`, three gets in a row all pass through the relay."""
    with Cluster() as cluster:
        cluster.start_broker(relay=relay_section(cluster.host, free_port(), user_circuits=2))
        cluster.start_relay()
        alice = cluster.add_peer("alice", advertise=unreachable_endpoint(cluster))
        alice.serve()
        bob = cluster.add_peer("bob")
        wait_for_relay_hint(cluster, "alice")
        file_id, source = share(alice, cluster.root, size=100_000)
        for _ in range(3):
            got = get(bob, file_id, "--force")
            assert got["paths"]["alice"].startswith("relay tcp://")
            assert Path(got["path"]).read_bytes() == source.read_bytes()


def test_a_reachable_holder_is_listed_direct_only_and_fetched_directly() -> None:
    with Cluster() as cluster:
        cluster.start_broker(relay=relay_section(cluster.host, free_port()))
        cluster.start_relay()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        deadline = time.monotonic() + 20
        while "reachable" not in alice.server.output():  # type: ignore[union-attr]
            assert time.monotonic() < deadline, alice.server.output()  # type: ignore[union-attr]
            time.sleep(0.2)
        assert "not reachable" not in alice.server.output()  # type: ignore[union-attr]
        assert "relay " not in online_text(cluster, "alice")
        file_id, _ = share(alice, cluster.root)
        got = get(bob, file_id)
        assert got["paths"]["alice"].startswith("tcp://")
        # `relay: always` lists the relay too, yet a requester that can go direct does.
        carol = cluster.add_peer("carol", relay="always")
        carol.serve()
        wait_for_relay_hint(cluster, "carol")
        file_id, _ = share(carol, cluster.root, name="carols.bin")
        assert get(bob, file_id)["paths"]["carol"].startswith("tcp://")


def test_relay_never_and_no_ticket_without_a_session() -> None:
    with Cluster() as cluster:
        cluster.start_broker(relay=relay_section(cluster.host, free_port()))
        cluster.start_relay()
        alice = cluster.add_peer("alice", advertise=unreachable_endpoint(cluster), relay="never")
        alice.serve()
        bob = cluster.add_peer("bob", timeout=3)
        file_id, _ = share(alice, cluster.root)
        time.sleep(2)
        assert "relay " not in online_text(cluster, "alice")
        failed = bob.run("get", file_id)
        assert failed.returncode != 0
        # The broker hands tickets only to a session.
        with BrokerClient(cluster.broker_endpoint, cluster.broker_public_key(), timeout=5) as c:
            with pytest.raises(RemoteError) as refused:
                c.call(
                    "ticket", protocol.GetTicket("made-up", file_id, "alice"), protocol.TicketResult
                )
            assert refused.value.code == "unauthorized"


# --- hostile and failing relays -------------------------------------------------------------


def flipped(frames: list[zmq.Frame]) -> list[zmq.Frame]:
    """[circuit id, reply, chunk] with one bit of the chunk flipped."""
    if len(frames) == 3 and len(frames[2]) > 1000:
        data = bytearray(frames[2].bytes)
        data[len(data) // 2] ^= 0x10
        return [frames[0], frames[1], zmq.Frame(bytes(data))]
    return frames


class BitFlippingRelay(RelayServer):
    """A relay that flips one bit in every chunk it carries to the requester, on
    circuits and data legs alike."""

    def _from_holder(self, sock: zmq.Socket[bytes], holder: Any, frames: list[zmq.Frame]) -> None:
        super()._from_holder(sock, holder, flipped(frames))

    def _from_holder_data(
        self, sock: zmq.Socket[bytes], holder: Any, frames: list[zmq.Frame]
    ) -> None:
        super()._from_holder_data(sock, holder, flipped(frames))


class CountingRelay(RelayServer):
    """A relay that counts the bytes holders send back, on circuits and on data legs."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.circuit_bytes = self.data_bytes = 0

    def _from_holder(self, sock: zmq.Socket[bytes], holder: Any, frames: list[zmq.Frame]) -> None:
        self.circuit_bytes += sum(len(f) for f in frames[1:])
        super()._from_holder(sock, holder, frames)

    def _from_holder_data(
        self, sock: zmq.Socket[bytes], holder: Any, frames: list[zmq.Frame]
    ) -> None:
        self.data_bytes += sum(len(f) for f in frames[1:])
        super()._from_holder_data(sock, holder, frames)


@contextmanager
def in_process_relay(server: RelayServer) -> Iterator[RelayServer]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(context, lambda _: ready.set()))
    thread.start()
    try:
        assert ready.wait(10)
        yield server
    finally:
        server.stop()
        thread.join()
        context.term()


Relay = TypeVar("Relay", bound=RelayServer)


@contextmanager
def through_relay(kind: type[Relay]) -> Iterator[tuple[Relay, Cluster, Peer, Peer]]:
    """A broker whose relay is a `kind` run in this process; alice, unreachable, serves
    through it (her relay hint listed), and bob is ready to get."""
    with Cluster() as cluster:
        port = free_port()
        cluster.start_broker(relay=relay_section(cluster.host, port))
        config = load_broker_config(cluster.broker_config)
        relay = kind(
            tcp_endpoint(cluster.host, port),
            relay_curve_keys(config),
            ticket_public_key(config),
            RelayLimits(),
        )
        with in_process_relay(relay):
            alice = cluster.add_peer("alice", advertise=unreachable_endpoint(cluster))
            alice.serve()
            bob = cluster.add_peer("bob")
            wait_for_relay_hint(cluster, "alice")
            yield relay, cluster, alice, bob


def test_a_relay_that_flips_bits_is_caught_by_the_chunk_checks() -> None:
    with through_relay(BitFlippingRelay) as (_, cluster, alice, bob):
        file_id, _ = share(alice, cluster.root)
        error = one_line_error(bob.run("get", file_id))
        assert "alice" in error
        assert not list(bob.download_dir.glob("relayed.bin*"))  # nothing unverified kept


def test_a_relayed_get_moves_its_chunks_on_the_data_leg_not_the_circuit() -> None:
    with through_relay(CountingRelay) as (counting, cluster, alice, bob):
        file_id, source = share(alice, cluster.root)
        got = get(bob, file_id)
        assert Path(got["path"]).read_bytes() == source.read_bytes()
        assert got["paths"]["alice"].startswith("relay tcp://")
    assert counting.data_bytes >= SIZE  # every chunk on the data leg (NULL mechanism)
    assert counting.circuit_bytes < 64 * 1024  # the circuit: hello, offer, finish


def test_a_relay_that_dies_mid_transfer_the_same_get_carries_on_through_another() -> None:
    with Cluster() as cluster:
        config_port, spare_port = free_port(), free_port()
        spare_public, spare_secret = zmq.curve_keypair()
        spare = tcp_endpoint(cluster.host, spare_port)
        section = relay_section(cluster.host, config_port) + (
            f"\n  relays: [{{endpoint: '{spare}', key: '{spare_public.decode()}'}}]"
        )
        cluster.start_broker(relay=section)
        first = cluster.start_relay()
        config = load_broker_config(cluster.broker_config)
        other = RelayServer(
            spare, (spare_public, spare_secret), ticket_public_key(config), RelayLimits()
        )
        with in_process_relay(other):
            alice = cluster.add_peer(
                "alice", advertise=unreachable_endpoint(cluster), upload_rate=1024 * 1024
            )
            alice.serve()
            bob = cluster.add_peer("bob", timeout=3)
            wait_for_relay_hint(cluster, "alice")
            file_id, source = share(alice, cluster.root, size=8_000_000)
            getting = subprocess.Popen(
                [*command_for("sfs-peer"), "get", file_id, "--json", "--config", str(bob.config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for_partial(bob.download_dir, 1_000_000)
                first.kill()  # mid-transfer
                # alice notices (15 s) and moves to the other relay; the same get waits
                # for her new hint and carries on from the chunks it kept
                stdout, stderr = getting.communicate(timeout=90)
            finally:
                if getting.poll() is None:
                    getting.kill()
                    getting.wait()
            assert getting.returncode == 0, stderr
            assert "carrying on" in stderr
            got = json.loads(stdout)
            assert (
                hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest()
                == hashlib.sha256(source.read_bytes()).hexdigest()
            )
            assert got["chunks_resumed"] > 0
            assert got["paths"]["alice"] == f"relay {spare}"


def test_a_relay_restarted_at_once_gets_its_holders_back() -> None:
    """A relay that comes back before its holders notice it was gone (systemd restarts it
    in 2 s) knows none of them: their next keepalive is refused, and they attach again."""
    with Cluster() as cluster:
        cluster.start_broker(relay=relay_section(cluster.host, free_port()))
        first = cluster.start_relay()
        alice = cluster.add_peer("alice", advertise=unreachable_endpoint(cluster))
        alice.serve()
        bob = cluster.add_peer("bob")
        wait_for_relay_hint(cluster, "alice")
        file_id, source = share(alice, cluster.root, size=500_000)
        first.kill()
        again = cluster.start_relay(name="relay-again")
        deadline = time.monotonic() + 30
        while "alice attached" not in again.output():
            assert time.monotonic() < deadline, alice.server.output()  # type: ignore[union-attr]
            time.sleep(0.2)
        got = get(bob, file_id)
        assert (
            hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest()
            == hashlib.sha256(source.read_bytes()).hexdigest()
        )
        assert got["paths"]["alice"].startswith("relay ")
