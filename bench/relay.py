"""Relayed against direct sfs downloads, side by side on loopback, and the relay's CPU.

    .venv/bin/python -m bench --only relay --size 256MiB --rounds 3
    .venv/bin/python -m bench.relay --size 256MiB --rounds 3

One cluster: a broker with a `relay:` section, `sfs-broker relay` in its own process,
alice serving where bob can reach her (fetched direct), and dora advertising an endpoint
where nothing listens (so the relay's probe finds her unreachable and bob fetches through
the relay). Both share the same random file; each round runs the two and magic-wormhole
through its own transit relay (bench/wormhole.py, `--no-listen` on both sides) in a
shuffled order, each after the rest `make bench`'s transfers take (`SETTLE`), so that
none starts warm from the one before. Each received copy is checked against the source and
deleted. The relay's CPU (user + system, from /proc) is read around the relayed rounds,
per GiB carried. The issue's targets: relayed >= 60% of direct, and >= 2x
magic-wormhole relayed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import BenchError, check_and_remove, format_size, parse_size, progress
from bench.procs import run_timed
from bench.transfer import SETTLE, Payload, make_payload
from bench.wormhole import NotRun, WormholeNet
from tests.harness import Cluster, Peer, command_for, free_port, tcp_endpoint

GiB = 1 << 30
WORMHOLE = "magic-wormhole relayed"
UNCAPPED = 10**12  # the relay's user_rate in the bench, bytes/s


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch(bob: Peer, file_id: str, payload: Payload, folder: Path) -> tuple[float, str]:
    argv = [*command_for("sfs-peer"), "get", file_id, "--json", "--config", str(bob.config)]
    timed = run_timed(argv, folder / "get")
    if timed.returncode != 0:
        raise BenchError(f"sfs-peer get failed: {timed.last_error_line()}")
    result = json.loads(timed.stdout)
    check_and_remove(Path(result["path"]), payload.size, payload.sha256)
    return timed.seconds, str(result["paths"].get(result["holders"][0], "?"))


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="sfs-bench-relay-") as tmp:
        root = Path(tmp)
        payload = make_payload(root, args.size)
        (root / "cluster").mkdir()
        cluster = Cluster(root / "cluster")
        with cluster, contextlib.ExitStack() as stack:
            relay_port = free_port()
            # The default per-requester cap (50 MiB/s) would be measured, not the relay.
            section = f"\n  bind: {tcp_endpoint(cluster.host, relay_port)}"
            cluster.start_broker(relay=section + f"\n  limits:\n    user_rate: {UNCAPPED}")
            relay = cluster.start_relay()
            alice = cluster.add_peer("alice", serve=True)
            nowhere = tcp_endpoint(cluster.host, free_port())
            dora = cluster.add_peer("dora", advertise=nowhere)
            dora.serve()
            bob = cluster.add_peer("bob", seed="false", timeout=30)
            ids = {}
            for name, peer in (("direct", alice), ("relayed", dora)):
                shared = peer.run("share", str(payload.path), "--json", timeout=3600)
                ids[name] = shared.check().json()["file_id"]
            deadline = time.monotonic() + 60
            while "relay " not in _online(cluster, "dora"):
                if time.monotonic() > deadline:
                    raise BenchError("dora was never listed with a relay hint")
                time.sleep(0.2)
            seconds: dict[str, list[float]] = {"direct": [], "relayed": []}
            net = _wormhole(root, seconds, getattr(args, "wormhole", True))
            if net is not None:
                stack.callback(net.stop)
            relay_cpu = 0.0

            def wormhole() -> None:
                assert net is not None
                target = root / "wormhole-received"
                seconds[WORMHOLE].append(net.transfer(payload.path, target, relayed=True).seconds)
                check_and_remove(target, payload.size, payload.sha256)

            def sfs(name: str) -> None:
                nonlocal relay_cpu
                before = cpu_seconds(relay.popen.pid)
                took, path = fetch(bob, ids[name], payload, root)
                if name == "relayed":
                    relay_cpu += cpu_seconds(relay.popen.pid) - before
                    if not path.startswith("relay "):
                        raise BenchError(f"the relayed round went {path}")
                elif path.startswith("relay "):
                    raise BenchError("the direct round went through the relay")
                seconds[name].append(took)

            methods: dict[str, Callable[[], None]] = {
                "direct": lambda: sfs("direct"),
                "relayed": lambda: sfs("relayed"),
            }
            if net is not None:
                methods[WORMHOLE] = wormhole
            # As `make bench`'s transfers: a shuffled order each round and a rest before
            # each, so that none starts warm from the one before (bench.transfer.SETTLE).
            shuffle = random.Random()  # noqa: S311 (an order of runs, not secrets)
            for number in range(args.rounds):
                order = list(methods)
                shuffle.shuffle(order)
                for name in order:
                    time.sleep(SETTLE)
                    progress(f"relay bench: round {number + 1}, {name}")
                    methods[name]()
    return render(args, payload, seconds, relay_cpu)


def _wormhole(root: Path, seconds: dict[str, list[float]], wanted: bool) -> WormholeNet | None:
    """The anchor's network, started, or None (with a note why) if it cannot run here."""
    if not wanted:
        return None
    net = WormholeNet(root / "wormhole")
    try:
        net.__enter__()
    except (NotRun, BenchError, OSError) as exc:
        progress(f"magic-wormhole not run: {exc}")
        return None
    seconds[WORMHOLE] = []
    return net


def _online(cluster: Cluster, name: str) -> str:
    online = {p["username"]: p["hints"] for p in cluster.broker_status()["online"]}
    return " ".join(online.get(name, []))


def render(
    args: argparse.Namespace, payload: Payload, seconds: dict[str, list[float]], cpu: float
) -> str:
    mib = payload.size / (1 << 20)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rates = {name: mib / value for name, value in medians.items()}
    carried = payload.size * len(seconds["relayed"]) / GiB
    lines = [
        "## Relayed and direct downloads",
        "",
        f"`python -m bench --only relay --size {args.size} --rounds {args.rounds}`:"
        f" one {format_size(payload.size)} file, loopback, rounds alternating; wall time of"
        " `sfs-peer get` (connecting included), median of the rounds; the relay's"
        " per-requester rate cap lifted.",
        "",
        "| path | median s | MiB/s | of direct |",
        "|---|---|---|---|",
    ]
    for name in seconds:
        share = rates[name] / rates["direct"]
        lines.append(f"| {name} | {medians[name]:.2f} | {rates[name]:.0f} | {share:.0%} |")
    lines += [
        "",
        f"Relay CPU (user + system): {cpu / carried:.2f} s per GiB carried. Target: relayed"
        " at least 60% of direct.",
    ]
    if WORMHOLE in rates:
        lines.append(
            f"sfs relayed / {WORMHOLE} = {rates['relayed'] / rates[WORMHOLE]:.2f}x (target: >= 2x)."
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default="256MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-wormhole", dest="wormhole", action="store_false", help="skip the anchor"
    )
    args = parser.parse_args()
    try:
        print(run(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
