"""`python -m bench.startup [--runs 20]`: how long `sfs-peer` takes to start, as markdown.

Each command is run `--runs` times in turn (so load from other processes falls on all of
them alike) against a real broker and holder on loopback (tests/harness.py): bare Python
as the floor, `--help`, `whoami` (config and keys, no network), and a `get` of a small
file, which is start-up plus a few round trips. Median and spread (min-max), in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import fmt_load, progress
from tests.harness import Cluster, command_for


def _timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, capture_output=True, check=True)
    return time.perf_counter() - started


def run(runs: int) -> str:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        small = cluster.root / "small.txt"
        small.write_bytes(os.urandom(1000))
        file_id = alice.share(small)
        peer = [*command_for("sfs-peer"), "--config", str(bob.config)]
        # `--config` after the command: typer wants options after it.
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "sfs-peer --help": [*command_for("sfs-peer"), "--help"],
            "sfs-peer whoami": [*peer[:1], "whoami", *peer[1:]],
        }
        times: dict[str, list[float]] = {name: [] for name in [*commands, "sfs-peer get (1 kB)"]}
        for index in range(runs):
            progress(f"round {index + 1}/{runs}")
            for name, argv in commands.items():
                times[name].append(_timed(argv, cluster.root))
            out = cluster.root / f"out{index}"
            get = [*peer[:1], "get", file_id, "--out", str(out), *peer[1:]]
            times["sfs-peer get (1 kB)"].append(_timed(get, cluster.root))
    lines = [
        f"{runs} runs each, interleaved; load average at the end {fmt_load(os.getloadavg())}",
        "",
        "| command | median ms | min-max ms |",
        "|---|---:|---:|",
    ]
    for name, seconds in times.items():
        ms = sorted(s * 1000 for s in seconds)
        lines.append(f"| `{name}` | {statistics.median(ms):.0f} | {ms[0]:.0f}-{ms[-1]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    print(run(parser.parse_args().runs))


if __name__ == "__main__":
    main()
