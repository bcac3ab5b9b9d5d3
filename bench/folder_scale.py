"""A folder share of many small files through the real CLIs: share time, get time and
the peak RSS of the `get` process (issue 9: 100,000 files under 150 MB).

    .venv/bin/python -m bench.folder_scale --files 100000

The tree: FILES files of SIZE random bytes in folders of 1,000. A throwaway broker and
two peers (tests.harness.Cluster); alice shares and serves, bob gets. The received tree
is compared with the source by relative name and size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from tests.harness import Cluster, command_for


def make_tree(root: Path, files: int, size: int) -> None:
    for number in range(files):
        folder = root / f"d{number // 1000:04d}"
        if number % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{number:06d}.bin").write_bytes(os.urandom(size))


def timed(command: list[str]) -> tuple[float, int, str]:
    """Seconds, peak RSS (KiB) of the process itself, and its stdout."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    out = process.stdout.read() if process.stdout else ""
    err = process.stderr.read() if process.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {err}")
    return seconds, usage.ru_maxrss, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice")
        bob = cluster.add_peer("bob")
        source = cluster.root / "many"
        make_tree(source, args.files, args.size)
        peer = command_for("sfs-peer")
        share_s, share_rss, out = timed(
            [*peer, "share", str(source), "--json", "--config", str(alice.config)]
        )
        file_id = out.split('"file_id": "')[1].split('"')[0]
        alice.serve()
        get_s, get_rss, _ = timed([*peer, "get", file_id, "--json", "--config", str(bob.config)])
        got = bob.download_dir / "many"
        sizes = sorted((str(p.relative_to(got)), p.stat().st_size) for p in got.rglob("*.bin"))
        want = sorted((str(p.relative_to(source)), p.stat().st_size) for p in source.rglob("*.bin"))
        assert sizes == want, "the received tree differs"
        print(
            f"{args.files:,} files of {args.size} B: share {share_s:.1f} s "
            f"(peak RSS {share_rss / 1024:.0f} MiB), get {get_s:.1f} s "
            f"(peak RSS {get_rss / 1024:.0f} MiB); tree checked"
        )


if __name__ == "__main__":
    main()
