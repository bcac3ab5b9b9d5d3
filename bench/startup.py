"""`python -m bench.startup [--runs 20] [--baseline DIR]`: how long `sfs-peer` takes to
start, as markdown.

Each command runs `--runs` times, all commands in turn (so load from other processes falls
on all of them alike), against a real broker and holder on loopback (tests/harness.py):
bare Python as the floor, `--help`, `whoami` (config and public keys, no network), and a
`get` of a 1 kB file (start-up, keys, a few round trips). With `--baseline DIR`, a folder
holding another version's `sfs/` package (e.g. `git archive` of main's `common`, `broker`
and `peer` into `DIR/sfs/...`), each command also runs from it, in the same rounds, and
the table gives the ratio. Median and spread (min-max), in ms.
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
from tests.harness import Cluster


def _timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)
    return time.perf_counter() - started


def _row(name: str, seconds: list[float]) -> tuple[str, float, str]:
    ms = sorted(s * 1000 for s in seconds)
    return name, statistics.median(ms), f"{ms[0]:.0f}-{ms[-1]:.0f}"


def run(runs: int, baseline: Path | None) -> str:
    versions = {"this": dict(os.environ)}
    if baseline is not None:
        versions["baseline"] = {**os.environ, "PYTHONPATH": str(baseline.resolve())}
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        small = cluster.root / "small.txt"
        small.write_bytes(os.urandom(1000))
        file_id = alice.share(small)
        peer = [sys.executable, "-m", "sfs.peer"]
        config = ["--config", str(bob.config)]
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "sfs-peer --help": [*peer, "--help"],
            "sfs-peer whoami": [*peer, "whoami", *config],
            "sfs-peer get (1 kB)": [*peer, "get", file_id, *config, "--out"],
        }
        times: dict[tuple[str, str], list[float]] = {}
        for index in range(runs):
            progress(f"round {index + 1}/{runs}")
            for version, env in versions.items():
                for name, argv in commands.items():
                    if name.startswith("python") and version != "this":
                        continue
                    if argv[-1] == "--out":  # a new folder each time: a real download
                        argv = [*argv, str(cluster.root / f"out-{version}-{index}")]
                    times.setdefault((name, version), []).append(_timed(argv, cluster.root, env))
    lines = [
        f"{runs} runs each, interleaved; load average at the end {fmt_load(os.getloadavg())}",
        "",
    ]
    if baseline is None:
        lines += ["| command | median ms | min-max ms |", "|---|---:|---:|"]
        for (name, _), seconds in times.items():
            row = _row(name, seconds)
            lines.append(f"| `{row[0]}` | {row[1]:.0f} | {row[2]} |")
        return "\n".join(lines)
    lines += [
        "| command | baseline median ms (min-max) | this median ms (min-max) | this / baseline |",
        "|---|---:|---:|---:|",
    ]
    for name in commands:
        now = _row(name, times[(name, "this")])
        if (name, "baseline") not in times:  # the floor: the same interpreter for both
            lines.append(f"| `{name}` | | {now[1]:.0f} ({now[2]}) | |")
            continue
        before = _row(name, times[(name, "baseline")])
        lines.append(
            f"| `{name}` | {before[1]:.0f} ({before[2]}) | {now[1]:.0f} ({now[2]}) |"
            f" {now[1] / before[1]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--baseline", type=Path, help="a folder holding another sfs/ package")
    args = parser.parse_args()
    print(run(args.runs, args.baseline))


if __name__ == "__main__":
    main()
