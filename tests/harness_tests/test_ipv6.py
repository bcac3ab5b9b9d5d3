"""IPv6 end to end, with real processes: a broker and two peers on the IPv6 loopback (`::1`),
and the same across two network namespaces joined by a veth pair that has IPv6 addresses
only, so there is no IPv4 path between them.

The namespace test needs root (`ip netns add`). Without it, or where `ip netns` fails, both
tests skip with the reason, unless SFS_REQUIRE_NETNS=1 (set by .ci/run) makes that a
failure. The `::1` test skips only where this machine has no IPv6 loopback, with the same
variable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from sfs.common import protocol
from sfs.common.errors import RemoteError
from sfs.common.protocol import ErrorCode
from sfs.peer.client import BrokerClient
from tests.harness import Cluster, Peer

pytestmark = pytest.mark.harness

REQUIRE = "SFS_REQUIRE_NETNS"
A_ADDRESS, B_ADDRESS = "fd00:5f5::1", "fd00:5f5::2"  # a unique local prefix, inside our pair
SIZE = 3_000_000
HOSTILE_ENDPOINTS = [
    "tcp://[::1",
    "tcp://[zz::1]:1",
    "tcp://[::1]:99999",
    "tcp://[127.0.0.1]:1",
    "tcp://[fe80::1%eth0]:1",
]


def skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason}, and {REQUIRE}=1 requires this test", pytrace=False)
    pytest.skip(reason)


def share_search_get(alice: Peer, bob: Peer, folder: Path) -> dict[str, object]:
    """alice shares a file, bob finds it and downloads it; `get`'s JSON."""
    source = folder / "v6.bin"
    source.write_bytes(os.urandom(SIZE))
    file_id = alice.run("share", str(source), "-k", "sixes", "--json").check().json()["file_id"]
    hits = bob.run("search", "sixes", "--json").check().json()["hits"]
    assert [hit["file_id"] for hit in hits] == [file_id]
    got: dict[str, object] = bob.run("get", file_id, "--json").check().json()
    saved = Path(str(got["path"]))
    assert saved.read_bytes() == source.read_bytes()
    assert got["holders"] == ["alice"]
    return got


# --- the IPv6 loopback ----------------------------------------------------------------------


def test_broker_and_peers_on_the_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        skip_or_fail(f"no IPv6 loopback here ({exc})")
    with Cluster(host="::1") as cluster:
        cluster.start_broker()
        assert cluster.broker_endpoint.startswith("tcp://[::1]:")
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        for peer in (alice, bob):  # nothing in either config is IPv4
            text = peer.config.read_text()
            assert "tcp://[::1]:" in text and "127.0.0.1" not in text
        share_search_get(alice, bob, cluster.root)
        online = {p["username"]: p["endpoint"] for p in cluster.broker_status()["online"]}
        assert online["alice"].startswith("tcp://[::1]:")

        # A heartbeat advertising a hostile IPv6 endpoint is refused as bad input, in a
        # line, before the broker looks at anything else (here, the made-up token).
        key = cluster.broker_public_key()
        with BrokerClient(cluster.broker_endpoint, key, timeout=5) as client:
            for endpoint in HOSTILE_ENDPOINTS:
                request = protocol.Heartbeat("not-a-token", endpoint)
                with pytest.raises(RemoteError) as refused:
                    client.call("heartbeat", request, protocol.HeartbeatResult)
                assert refused.value.code == ErrorCode.BAD_REQUEST
                assert str(refused.value) == "broker: endpoint: not a valid value"


# --- two namespaces, IPv6 only --------------------------------------------------------------


def ip(*args: str) -> str:
    """Run `ip ARGS` and return its output; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def ipv6_only_pair() -> Iterator[tuple[str, str]]:
    """Two fresh namespaces, `a` (A_ADDRESS) and `b` (B_ADDRESS), joined by a veth pair
    with IPv6 addresses only (`nodad`: usable at once, no duplicate address detection);
    both removed afterwards, whatever happens."""
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")
    if shutil.which("ip") is None:
        skip_or_fail("the `ip` command (iproute2) is not installed")
    tag = secrets.token_hex(3)
    a, b = f"sfs6-{tag}-a", f"sfs6-{tag}-b"
    made: list[str] = []
    try:
        for name in (a, b):
            try:
                ip("netns", "add", name)
            except RuntimeError as exc:
                skip_or_fail(f"cannot create a network namespace: {exc}")
            made.append(name)
        # Created straight inside the namespaces: nothing appears in this one.
        ip("link", "add", "v6a", "netns", a, "type", "veth", "peer", "name", "v6b", "netns", b)
        for name, dev, address in ((a, "v6a", A_ADDRESS), (b, "v6b", B_ADDRESS)):
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "addr", "add", f"{address}/64", "dev", dev, "nodad")
            ip("-n", name, "link", "set", dev, "up")
        yield a, b
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth, then the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def received_bytes(netns: str, dev: str) -> int:
    (link,) = json.loads(ip("-n", netns, "-j", "-s", "link", "show", dev))
    return int(link["stats64"]["rx"]["bytes"])


def test_get_across_an_ipv6_only_link() -> None:
    with ipv6_only_pair() as (a, b), Cluster(host=A_ADDRESS) as cluster:
        # No IPv4 path: neither end of the link has an IPv4 address, and neither namespace
        # has an IPv4 route (loopback's live in the local table, not the main one).
        for name, dev in ((a, "v6a"), (b, "v6b")):
            assert ip("-n", name, "-4", "addr", "show", "dev", dev).strip() == ""
            assert ip("-n", name, "-6", "addr", "show", "dev", dev).count("inet6 fd00:5f5::") == 1
            assert ip("-n", name, "-4", "route", "show").strip() == ""

        cluster.start_broker(netns=a)
        alice = cluster.add_peer("alice", serve=True, netns=a)  # listens on A_ADDRESS
        bob = cluster.add_peer("bob", host=B_ADDRESS, netns=b)
        assert cluster.broker_endpoint.startswith(f"tcp://[{A_ADDRESS}]:")
        before = received_bytes(b, "v6b")
        share_search_get(alice, bob, cluster.root)
        # The file came over the veth: bob's end received at least its size.
        assert received_bytes(b, "v6b") - before >= SIZE
        online = {p["username"]: p["endpoint"] for p in cluster.broker_status()["online"]}
        assert online["alice"].startswith(f"tcp://[{A_ADDRESS}]:")
