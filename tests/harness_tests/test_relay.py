"""The relay with real processes on the loopback: a broker with a `relay:` section, the
relay in its own process (`sfs-broker relay`), and holders that cannot be reached at the
endpoint they advertise (a closed port), so only the relay carries their chunks.

The same across a real NAT lives in test_relay_nat.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sfs.common import protocol
from sfs.common.errors import RemoteError
from sfs.peer.client import BrokerClient
from tests.harness import Cluster, Peer, free_port, tcp_endpoint

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
    online = {p["username"]: p["endpoint"] for p in cluster.broker_status()["online"]}
    return str(online.get(name, ""))


def wait_for_relay_hint(cluster: Cluster, name: str, present: bool = True) -> None:
    deadline = time.monotonic() + 30
    while ("relay+" in online_text(cluster, name)) != present:
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
        assert got["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert Path(got["path"]).read_bytes() == source.read_bytes()
        assert got["holders"] == ["alice"]
        assert got["paths"]["alice"].startswith("relay tcp://")


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
        assert "relay+" not in online_text(cluster, "alice")
        file_id, _ = share(alice, cluster.root)
        got = get(bob, file_id)
        assert got["paths"]["alice"].startswith("tcp://")


def test_relay_never_and_no_ticket_without_a_session() -> None:
    with Cluster() as cluster:
        cluster.start_broker(relay=relay_section(cluster.host, free_port()))
        cluster.start_relay()
        alice = cluster.add_peer("alice", advertise=unreachable_endpoint(cluster), relay="never")
        alice.serve()
        bob = cluster.add_peer("bob", timeout=3)
        file_id, _ = share(alice, cluster.root)
        time.sleep(2)
        assert "relay+" not in online_text(cluster, "alice")
        failed = bob.run("get", file_id)
        assert failed.returncode != 0
        # The broker hands tickets only to a session.
        with BrokerClient(cluster.broker_endpoint, cluster.broker_public_key(), timeout=5) as c:
            with pytest.raises(RemoteError) as refused:
                c.call(
                    "ticket", protocol.GetTicket("made-up", file_id, "alice"), protocol.TicketResult
                )
            assert refused.value.code == "unauthorized"
