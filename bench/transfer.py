"""One transfer through real processes: throughput and peak memory of both sides.

    .venv/bin/python -m bench.transfer --size 2GiB [--plain]

Starts a broker and two peers with tests/harness.py, shares a file of random-looking
bytes from alice, downloads it as bob with `sfs-peer get`, and reports MB/s plus the
peak RSS of the receiving process (`get`) and of the serving process (`serve`).
The full side-by-side benchmark against scp comes with `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from tests.harness import Cluster, command_for

UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if unit and text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_file(path: Path, size: int) -> None:
    """Incompressible-looking data, written in 1 MiB blocks (constant memory)."""
    block = os.urandom(1 << 20)
    with path.open("wb") as handle:
        left, counter = size, 0
        while left > 0:
            data = (block[:-8] + counter.to_bytes(8, "big"))[:left]
            handle.write(data)
            left -= len(data)
            counter += 1


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="file size, e.g. 512MiB or 2GiB")
    parser.add_argument("--plain", action="store_true", help="peer transport encryption off")
    args = parser.parse_args()
    size = parse_size(args.size)

    with Cluster(transport_encryption=not args.plain) as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        source = cluster.root / "payload.bin"
        write_file(source, size)
        started = time.monotonic()
        file_id = alice.run("share", str(source), "--json").check().json()["file_id"]
        hashed = time.monotonic() - started

        argv = [*command_for("sfs-peer"), "get", file_id, "--json", "--config", str(bob.config)]
        getter = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(getter.pid, 0)
        assert getter.stdout is not None and getter.stderr is not None
        output, errors = getter.stdout.read(), getter.stderr.read()
        if status != 0:
            raise SystemExit(f"get failed: {errors.decode()}")
        result = json.loads(output)
        assert alice.server is not None
        holder_peak = peak_rss_mib(alice.server.popen.pid)
        Path(result["path"]).unlink()

    mode = "plain" if args.plain else "CurveZMQ"
    print(f"size                 {size / 1e6:,.0f} MB ({mode} peer channel)")
    print(f"share (hash + sign)  {hashed:.2f} s")
    rate = size / result["seconds"] / 1e6
    print(f"get                  {result['seconds']:.2f} s = {rate:.0f} MB/s")
    print(f"peak RSS receiver    {usage.ru_maxrss / 1024:.0f} MiB (sfs-peer get)")
    print(f"peak RSS sender      {holder_peak:.0f} MiB (sfs-peer serve)")


if __name__ == "__main__":
    main()
