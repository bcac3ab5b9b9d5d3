"""Holders behind a real NAT, with real processes: Linux network namespaces and nftables.

    home (10.201.0.2) -- nat (masquerade; forward: drop, except established and outbound)
                             -- internet (10.200.0.2: broker, relay, bob)
    office (10.202.0.2) -- nat2 (the same) --'

alice serves from `home`. The internet routes `home`'s prefix to its NAT, whose firewall
drops every connection that does not come from inside, as a home router does: the tests
first show that a connection to alice from the internet fails, then that `get` succeeds
through the relay with the right hash, for a requester on the internet and for one
behind a second NAT (carol, in `office`).

Needs root, `ip` and `nft`. Without them the tests skip with the reason, unless
SFS_REQUIRE_NETNS=1 (set by .ci/run, which installs nftables) makes that a failure. The
namespaces get unique names and are deleted at the end, whatever happens.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sfs.common.config import load_peer_config
from tests.harness import Cluster, free_port, in_netns, tcp_endpoint
from tests.harness_tests.test_ipv6 import skip_or_fail
from tests.harness_tests.test_relay import get, relay_section, share, wait_for_relay_hint

pytestmark = pytest.mark.harness

INET, NAT_OUT, HOME, NAT_IN = "10.200.0.2", "10.200.0.1", "10.201.0.2", "10.201.0.1"
INET2, NAT2_OUT, OFFICE, NAT2_IN = "10.200.1.2", "10.200.1.1", "10.202.0.2", "10.202.0.1"

FIREWALL = """
table ip nat {{
  chain post {{
    type nat hook postrouting priority 100;
    oifname "{outside}" masquerade
  }}
}}
table ip filter {{
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{inside}" accept
  }}
}}
"""


@dataclass(frozen=True)
class World:
    inet: str
    home: str
    office: str


def run(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _router(netns: str, inside: str, outside: str) -> None:
    run("ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    rules = FIREWALL.format(inside=inside, outside=outside)
    run("ip", "netns", "exec", netns, "nft", "-f", "-", stdin=rules)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            skip_or_fail(f"the `{tool}` command is not installed (apt-get install nftables)")
    tag = secrets.token_hex(3)
    names = {part: f"sfsn-{tag}-{part}" for part in ("inet", "nat", "home", "nat2", "office")}
    made: list[str] = []
    try:
        for name in names.values():
            try:
                run("ip", "netns", "add", name)
            except RuntimeError as exc:
                skip_or_fail(f"cannot create a network namespace: {exc}")
            made.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        n = names
        links = [  # (namespace, device, address) at both ends of each veth pair
            ((n["home"], "h0", HOME), (n["nat"], "n0", NAT_IN)),
            ((n["nat"], "n1", NAT_OUT), (n["inet"], "i0", INET)),
            ((n["office"], "o0", OFFICE), (n["nat2"], "m0", NAT2_IN)),
            ((n["nat2"], "m1", NAT2_OUT), (n["inet"], "i1", INET2)),
        ]
        for (ns_a, dev_a, _), (ns_b, dev_b, _) in links:
            run("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth",
                "peer", "name", dev_b, "netns", ns_b)  # fmt: skip
        for pair in links:
            for netns, dev, address in pair:
                run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", dev)
                run("ip", "-n", netns, "link", "set", dev, "up")
        run("ip", "-n", n["home"], "route", "add", "default", "via", NAT_IN)
        run("ip", "-n", n["office"], "route", "add", "default", "via", NAT2_IN)
        run("ip", "-n", n["nat"], "route", "add", "default", "via", INET)
        run("ip", "-n", n["nat2"], "route", "add", "default", "via", INET2)
        # The internet knows where the homes are: a connection to one reaches its NAT,
        # whose firewall then drops it (not a missing route that fails at once).
        run("ip", "-n", n["inet"], "route", "add", "10.201.0.0/24", "via", NAT_OUT)
        run("ip", "-n", n["inet"], "route", "add", "10.202.0.0/24", "via", NAT2_OUT)
        _router(n["nat"], "n0", "n1")
        _router(n["nat2"], "m0", "m1")
        yield World(n["inet"], n["home"], n["office"])
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def connects(netns: str, endpoint: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from `netns` to `endpoint` opens within `timeout`."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    code = (
        "import socket,sys\n"
        f"s=socket.socket(); s.settimeout({timeout})\n"
        f"sys.exit(0 if s.connect_ex(({host!r}, {port})) == 0 else 1)\n"
    )
    done = subprocess.run(in_netns(netns, [sys.executable, "-c", code]), check=False)
    return done.returncode == 0


def nat_cluster(world: World) -> tuple[Cluster, str]:
    """A cluster whose broker and relay run in the internet namespace."""
    cluster = Cluster(host=INET)
    relay_port = free_port()
    cluster.start_broker(netns=world.inet, relay=relay_section(INET, relay_port))
    cluster.start_relay(netns=world.inet)
    return cluster, tcp_endpoint(INET, relay_port)


def test_nat_blocks_inbound_and_get_goes_through_the_relay(world: World) -> None:
    cluster, _ = nat_cluster(world)
    with cluster:
        alice = cluster.add_peer("alice", host=HOME, netns=world.home, serve=True)
        bob = cluster.add_peer("bob", netns=world.inet)
        carol = cluster.add_peer("carol", host=OFFICE, netns=world.office)
        endpoint = load_peer_config(alice.config).advertise
        # alice listens (her own namespace reaches her), the internet cannot reach her,
        # and she reaches the internet (she registered and serves through the NAT).
        assert connects(world.home, endpoint)
        assert not connects(world.inet, endpoint)
        assert not connects(world.office, endpoint)
        wait_for_relay_hint(cluster, "alice")
        assert "not reachable from outside" in alice.server.output()  # type: ignore[union-attr]

        file_id, source = share(alice, cluster.root)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        for requester in (bob, carol):  # on the internet, then behind a second NAT
            got = get(requester, file_id)
            assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == digest
            assert Path(got["path"]).read_bytes() == source.read_bytes()
            assert got["paths"]["alice"].startswith("relay tcp://10.200.0.2:")


def test_a_holder_that_loses_its_relay_reconnects_and_heartbeats_say_so(world: World) -> None:
    cluster, _ = nat_cluster(world)
    with cluster:
        alice = cluster.add_peer("alice", host=HOME, netns=world.home, serve=True)
        bob = cluster.add_peer("bob", netns=world.inet)
        wait_for_relay_hint(cluster, "alice")
        relay = next(p for p in cluster.processes if p.name == "relay")
        relay.stop()
        wait_for_relay_hint(cluster, "alice", present=False)  # the relay went silent
        cluster.start_relay(name="relay-again", netns=world.inet)  # same port, same keys
        wait_for_relay_hint(cluster, "alice")
        file_id, source = share(alice, cluster.root, size=500_000)
        got = get(bob, file_id)
        assert (
            hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest()
            == hashlib.sha256(source.read_bytes()).hexdigest()
        )
        assert got["paths"]["alice"].startswith("relay ")
        assert "lost the relay" in alice.server.output()  # type: ignore[union-attr]
