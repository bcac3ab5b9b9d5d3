"""sfs against scp, side by side, on loopback: throughput and peak memory of both sides.

    .venv/bin/python -m bench --only transfer --size 1GiB --rounds 3   # the comparison
    .venv/bin/python -m bench.transfer --size 2GiB [--plain]           # one sfs download

The comparison makes one random file, then runs the rounds alternating between scp to a
throwaway sshd, sfs with its default config, and sfs with peer transport encryption
off (each sfs variant a broker and two peers from tests/harness.py: alice serves, bob
runs `sfs-peer get`). Every received copy is checked against the source and deleted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.common import (
    BenchError,
    check_and_remove,
    format_size,
    parse_size,
    progress,
    write_random_file,
)
from bench.procs import TreeWatcher, run_timed, vm_hwm_kib
from bench.sshd import Sshd
from tests.harness import Cluster, Peer, command_for

SHARE_TIMEOUT = 3600.0  # hashing a large file on a busy machine takes a while


@dataclass(frozen=True)
class Payload:
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Round:
    seconds: float
    sender_kib: int
    receiver_kib: int
    untimed: float | None = None  # sfs: wall time outside get's own download timer


class Method(Protocol):
    label: str

    def transfer(self, payload: Payload) -> Round: ...


class Scp:
    """scp to the throwaway sshd; memory of both sides sampled from /proc (best effort)."""

    def __init__(self, sshd: Sshd, folder: Path) -> None:
        self.sshd, self.folder = sshd, folder
        self.cipher = sshd.negotiated_cipher()
        self.label = f"scp ({self.cipher})"
        folder.mkdir()

    def transfer(self, payload: Payload) -> Round:
        target = self.folder / payload.path.name
        with TreeWatcher(self.sshd.pid, include_root=False) as server:
            timed = run_timed(self.sshd.scp_argv(payload.path, target), self.folder / "scp")
        if timed.returncode != 0:
            raise BenchError(f"scp failed: {timed.last_error_line()}")
        check_and_remove(target, payload.size, payload.sha256)
        return Round(timed.seconds, timed.total_kib, server.total_kib())


class Sfs:
    """`with Sfs(folder, payload, encrypted=...)`: a broker, alice serving the payload,
    and bob, who downloads it with the real `sfs-peer get` in each round."""

    def __init__(self, folder: Path, payload: Payload, *, encrypted: bool) -> None:
        self.label = "sfs" if encrypted else "sfs, peer encryption off"
        self.folder, self.payload, self.encrypted = folder, payload, encrypted
        self.share_seconds = 0.0
        self.file_id = ""

    def __enter__(self) -> Sfs:
        self.folder.mkdir()
        self.cluster = Cluster(self.folder, transport_encryption=self.encrypted)
        try:
            self.cluster.start_broker()
            self.alice = self.cluster.add_peer("alice", serve=True)
            self.bob = self.cluster.add_peer("bob")
            self.share()
        except BaseException:
            self.cluster.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.close()

    def share(self) -> None:
        started = time.perf_counter()
        shared = self.alice.run("share", str(self.payload.path), "--json", timeout=SHARE_TIMEOUT)
        self.share_seconds = time.perf_counter() - started
        self.file_id = shared.check().json()["file_id"]

    def transfer(self, payload: Payload) -> Round:
        argv = [*command_for("sfs-peer"), "get", self.file_id, "--json"]
        timed = run_timed([*argv, "--config", str(self.bob.config)], self.folder / "get")
        if timed.returncode != 0:
            raise BenchError(f"sfs-peer get failed: {timed.last_error_line()}")
        result = json.loads(timed.stdout)
        check_and_remove(Path(result["path"]), payload.size, payload.sha256)
        untimed = timed.seconds - result["seconds"]
        return Round(timed.seconds, serve_peak_kib(self.alice), timed.peak_kib, untimed)


def serve_peak_kib(peer: Peer) -> int:
    """VmHWM of `sfs-peer serve`: cumulative since it started, so over all rounds so far."""
    assert peer.server is not None
    peak = vm_hwm_kib(peer.server.popen.pid)
    if peak is None:
        raise BenchError(f"{peer.name}'s sfs-peer serve has exited: {peer.server.output()}")
    return peak


# --- the comparison -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    """The markdown section for results.md; `args.size`, `args.rounds`, `args.scp_cipher`."""
    with tempfile.TemporaryDirectory(prefix="sfs-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        payload = make_payload(root, args.size)
        progress("starting sshd and two sfs clusters (sharing hashes the file twice)")
        sshd = stack.enter_context(Sshd(root / "sshd", args.scp_cipher))
        scp = Scp(sshd, root / "scp")
        sfs = stack.enter_context(Sfs(root / "sfs", payload, encrypted=True))
        plain = stack.enter_context(Sfs(root / "sfs-plain", payload, encrypted=False))
        rounds = run_rounds([scp, sfs, plain], payload, args.rounds)
        return render(payload, rounds, scp, [sfs, plain])


def make_payload(root: Path, size: int) -> Payload:
    progress(f"writing {format_size(size)} of random data")
    path = root / "payload.bin"
    return Payload(path, size, write_random_file(path, size))


def run_rounds(methods: Sequence[Method], payload: Payload, count: int) -> dict[str, list[Round]]:
    """Alternating, so that a slow patch of a busy machine spreads over every method."""
    rounds: dict[str, list[Round]] = {method.label: [] for method in methods}
    width = max(len(label) for label in rounds)
    for number in range(1, count + 1):
        for method in methods:
            done = method.transfer(payload)
            rounds[method.label].append(done)
            speed = rate(payload, done)
            progress(f"round {number}/{count}  {method.label:<{width}}  {speed:6.0f} MB/s")
    return rounds


def rate(payload: Payload, done: Round) -> float:
    return payload.size / done.seconds / 1e6


# --- the report ------------------------------------------------------------------------------


def render(payload: Payload, rounds: dict[str, list[Round]], scp: Scp, sfs: list[Sfs]) -> str:
    scp_median = statistics.median(rate(payload, r) for r in rounds[scp.label])
    count = len(rounds[scp.label])
    lines = [
        "## Transfer: sfs against scp",
        "",
        f"One file of {format_size(payload.size)} ({payload.size:,} random bytes) over"
        f" 127.0.0.1, {count} round(s) of each method, alternating. MB/s is 10^6 bytes per"
        " second of wall time of the transfer command alone (`scp`, `sfs-peer get`), from"
        " its start to its exit.",
        "",
        "| method | MB/s median | spread (min-max) | vs scp | peak RSS sender"
        " | peak RSS receiver |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, done in rounds.items():
        rates = [rate(payload, r) for r in done]
        median = statistics.median(rates)
        sender = mib(max(r.sender_kib for r in done))
        receiver = mib(max(r.receiver_kib for r in done))
        if label == scp.label:
            sender, receiver = f"{sender} (scp + ssh)*", f"{receiver} (sshd)*"
        lines.append(
            f"| {label} | {median:.0f} | {min(rates):.0f}-{max(rates):.0f}"
            f" | {median / scp_median:.2f}x | {sender} | {receiver} |"
        )
    lines += ["", *notes(payload, rounds, scp, sfs)]
    return "\n".join(lines) + "\n"


def notes(payload: Payload, rounds: dict[str, list[Round]], scp: Scp, sfs: list[Sfs]) -> list[str]:
    per_round = "; ".join(
        f"{label}: " + ", ".join(f"{rate(payload, r):.0f}" for r in done)
        for label, done in rounds.items()
    )
    shares = ", ".join(
        f"{s.share_seconds:.2f} s = {payload.size / s.share_seconds / 1e6:.0f} MB/s ({s.label})"
        for s in sfs
    )
    untimed = statistics.median(
        r.untimed for s in sfs for r in rounds[s.label] if r.untimed is not None
    )
    return [
        f"- MB/s per round, in order: {per_round}.",
        f"- Of each `sfs-peer get`, {untimed:.2f} s (median) is outside its own download"
        " timer: interpreter start-up, imports, the broker lookup, exit.",
        f"- `sfs-peer share` before the rounds (hash, sign, publish; not in the figures above):"
        f" {shares}.",
        f"- scp cipher: `{scp.cipher}`, as negotiated (`ssh -v`) with the throwaway sshd"
        " (generated config, `-F none` on the client); scp speaks SFTP, `internal-sftp`"
        " on the server.",
        "- Peak RSS is the largest over the rounds. sfs receiver: `sfs-peer get`, exact"
        " (GNU time's %M, the kernel's high-water mark). sfs sender: VmHWM of"
        " `sfs-peer serve` from /proc, which is cumulative since it started.",
        "- \\* scp, best effort: the peaks of the processes on each side, summed (an upper"
        " bound, as they do not all peak at once), VmHWM sampled from /proc every 50 ms."
        " Sender: scp and its ssh child. Receiver: the sshd processes forked for the"
        " connection (monitor, pre-auth child, session), not the listener.",
        "- `sfs-peer get` fsyncs the file before renaming it into place; scp does not, so"
        " its last bytes may still be in the page cache when it exits.",
    ]


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB" if kib else "n/a"


# --- one sfs download, as before `make bench` existed ---------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="One sfs download: throughput and peak RSS.")
    parser.add_argument("--size", type=parse_size, default="1GiB", help="e.g. 512MiB or 2GiB")
    parser.add_argument("--plain", action="store_true", help="peer transport encryption off")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sfs-bench-") as tmp:
        payload = make_payload(Path(tmp), args.size)
        with Sfs(Path(tmp) / "sfs", payload, encrypted=not args.plain) as sfs:
            done = sfs.transfer(payload)
    print(f"size                 {payload.size / 1e6:,.0f} MB ({sfs.label})")
    print(f"share (hash + sign)  {sfs.share_seconds:.2f} s")
    print(f"get                  {done.seconds:.2f} s = {rate(payload, done):.0f} MB/s")
    print(f"peak RSS receiver    {mib(done.receiver_kib)} (sfs-peer get)")
    print(f"peak RSS sender      {mib(done.sender_kib)} (sfs-peer serve)")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
