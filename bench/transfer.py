"""sfs against scp, side by side, on loopback: throughput and peak memory of both sides.

    .venv/bin/python -m bench --only transfer --size 1GiB --rounds 3   # the comparison
    .venv/bin/python -m bench.transfer --size 2GiB [--plain]           # one sfs download

The comparison makes one random file, then runs the rounds alternating between the
anchors, scp to a throwaway sshd (OpenSSH's default cipher, and aes128-gcm) and
magic-wormhole direct (bench/wormhole.py), and sfs with its default config and with peer
transport encryption off (each sfs variant a broker and two peers from tests/harness.py:
alice serves, bob runs `sfs-peer get`). Every received copy is checked against the source
and deleted. sfs fsyncs the file before it names it; for the methods that do not, the
bench fsyncs the received file and adds that time to the round. An anchor that cannot
run here (a tool that cannot be installed, no network namespace) is a "not run" row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
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
from bench.wormhole import NotRun, WormholeNet
from bench.wormhole import version as wormhole_version
from tests.harness import Cluster, Peer, command_for

SHARE_TIMEOUT = 3600.0  # hashing a large file on a busy machine takes a while
FAST_CIPHER = "aes128-gcm@openssh.com"  # scp's fastest here (DESIGN.md §6)
WORMHOLE_DIRECT = "magic-wormhole direct"
WORMHOLE_RELAYED = "magic-wormhole relayed"


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
    durable: float | None = None  # the fsync the bench added (in `seconds`), if it did


class Method(Protocol):
    label: str

    def transfer(self, payload: Payload) -> Round: ...


def fsync_file(path: Path) -> float:
    """Seconds to fsync a received file: the durability sfs has before it names the file."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


class Scp:
    """scp to the throwaway sshd, with `cipher` or OpenSSH's default; memory of both sides
    sampled from /proc (best effort). The round is scp's wall time plus an fsync."""

    def __init__(self, sshd: Sshd, folder: Path, cipher: str | None = None) -> None:
        self.sshd, self.folder, self.requested = sshd, folder, cipher
        self.cipher = sshd.negotiated_cipher(cipher)
        self.label = f"scp ({self.cipher})"
        folder.mkdir()

    def transfer(self, payload: Payload) -> Round:
        target = self.folder / payload.path.name
        argv = self.sshd.scp_argv(payload.path, target, self.requested)
        with TreeWatcher(self.sshd.pid, include_root=False) as server:
            timed = run_timed(argv, self.folder / "scp")
        if timed.returncode != 0:
            raise BenchError(f"scp failed: {timed.last_error_line()}")
        durable = fsync_file(target)
        check_and_remove(target, payload.size, payload.sha256)
        seconds = timed.seconds + durable
        return Round(seconds, timed.total_kib, server.total_kib(), durable=durable)


class Wormhole:
    """magic-wormhole, sender and receiver in one private network namespace with their own
    mailbox and relay; the round is the receive command's wall time plus an fsync."""

    def __init__(self, net: WormholeNet, folder: Path, *, relayed: bool = False) -> None:
        self.net, self.folder, self.relayed = net, folder, relayed
        self.label = WORMHOLE_RELAYED if relayed else WORMHOLE_DIRECT
        self.paths: set[str] = set()
        folder.mkdir()

    def transfer(self, payload: Payload) -> Round:
        target = self.folder / payload.path.name
        done = self.net.transfer(payload.path, target, relayed=self.relayed)
        self.paths.add(re.sub(r":\d+$", "", done.path))  # the port differs each round
        durable = fsync_file(target)
        check_and_remove(target, payload.size, payload.sha256)
        seconds = done.seconds + durable
        return Round(seconds, done.sender_kib, done.receiver_kib, durable=durable)


class Sfs:
    """`with Sfs(folder, payload, encrypted=...)`: a broker, alice serving the payload,
    and bob, who downloads it with the real `sfs-peer get` in each round."""

    def __init__(
        self, folder: Path, payload: Payload, *, encrypted: bool, seeded: bool = False
    ) -> None:
        """`seeded`: a second holder, carol, who downloaded the file and seeds it, serves
        beside alice (the issue: two holders on one machine must not be slower than one)."""
        self.label = "sfs" if encrypted else "sfs, peer encryption off"
        if seeded:
            self.label = TWO_HOLDERS
        self.folder, self.payload, self.encrypted = folder, payload, encrypted
        self.holders = ["alice", "carol"] if seeded else ["alice"]
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
            if "carol" in self.holders:
                carol = self.cluster.add_peer("carol", serve=True)
                got = carol.run("get", self.file_id, "--json", timeout=SHARE_TIMEOUT).check()
                # Her copy went to the disk past the page cache (O_DIRECT); read it once
                # so that both holders serve from memory, as alice's fresh payload does.
                with Path(got.json()["path"]).open("rb") as copy:
                    while copy.read(16 << 20):
                        pass
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
        if sorted(result["holders"]) != self.holders:
            raise BenchError(f"{self.label}: chunks came from {result['holders']}")
        untimed = timed.seconds - result["seconds"]
        return Round(timed.seconds, serve_peak_kib(self.alice), timed.peak_kib, untimed)


TWO_HOLDERS = "sfs, two holders"


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
        progress("starting sshd, the wormhole mailbox and relay, two sfs clusters")
        anchors, not_run = start_anchors(stack, root, getattr(args, "scp_cipher", None))
        sfs = stack.enter_context(Sfs(root / "sfs", payload, encrypted=True))
        plain = stack.enter_context(Sfs(root / "sfs-plain", payload, encrypted=False))
        two = stack.enter_context(Sfs(root / "sfs-two", payload, encrypted=True, seeded=True))
        methods: list[Method] = [*anchors, sfs, plain, two]
        rounds = run_rounds(methods, payload, args.rounds, not_run, anchors)
        return render(payload, rounds, not_run, anchors, [sfs, plain, two])


def start_anchors(
    stack: ExitStack, root: Path, cipher: str | None
) -> tuple[list[Method], dict[str, str]]:
    """The methods sfs is measured against, and the reason for each one that cannot run."""
    anchors: list[Method] = []
    not_run: dict[str, str] = {}
    try:
        sshd = stack.enter_context(Sshd(root / "sshd"))
        default = Scp(sshd, root / "scp")
        anchors.append(default)
        fast = cipher or FAST_CIPHER
        if fast != default.cipher:
            try:
                anchors.append(Scp(sshd, root / "scp-fast", fast))
            except BenchError as exc:
                not_run[f"scp ({fast})"] = str(exc)
    except (BenchError, subprocess.CalledProcessError, OSError) as exc:
        not_run["scp"] = str(exc)
    try:
        net = stack.enter_context(WormholeNet(root / "wormhole"))
        anchors.append(Wormhole(net, root / "wormhole-direct"))
        anchors.append(Wormhole(net, root / "wormhole-relayed", relayed=True))
    except (NotRun, BenchError, OSError) as exc:
        not_run[WORMHOLE_DIRECT] = not_run[WORMHOLE_RELAYED] = str(exc)
    return anchors, not_run


def make_payload(root: Path, size: int) -> Payload:
    progress(f"writing {format_size(size)} of random data")
    path = root / "payload.bin"
    return Payload(path, size, write_random_file(path, size))


# Seconds of rest before each transfer, so every method starts from the same state: this
# VM reports freed memory to its host (virtio-balloon free page reporting), and a
# transfer started sooner reuses the previous one's pages, still backed, at less than
# half the CPU time. 5 s was not enough, 10 s was (PERFORMANCE.md, "Engine v2, part 4").
SETTLE = 12.0


def run_rounds(
    methods: Sequence[Method],
    payload: Payload,
    count: int,
    not_run: dict[str, str] | None = None,
    optional: Sequence[Method] = (),
    shuffle: random.Random | None = None,
) -> dict[str, list[Round]]:
    """Alternating, so that a slow patch of a busy machine spreads over every method, in
    an order shuffled each round (`shuffle`, by default seeded afresh; the progress lines
    show the order), so that no method always runs right after the same one (the one
    right after magic-wormhole relayed was the slow one in these runs; sfs with peer
    encryption off, always run after the default, looked 1.6x faster: PERFORMANCE.md,
    "Engine v2, part 4"). An `optional` method that fails is dropped, its reason in
    `not_run`; sfs failures raise."""
    shuffle = shuffle or random.Random()  # noqa: S311 (an order of runs, not secrets)
    rounds: dict[str, list[Round]] = {method.label: [] for method in methods}
    width = max(len(label) for label in rounds)
    failed: set[str] = set()
    for number in range(1, count + 1):
        order = list(methods)
        shuffle.shuffle(order)
        for method in order:
            time.sleep(SETTLE)
            if method.label in failed:
                continue
            try:
                done = method.transfer(payload)
            except BenchError as exc:
                if method not in optional or not_run is None:
                    raise
                failed.add(method.label)
                not_run[method.label] = f"failed in round {number}: {exc}"
                progress(f"round {number}/{count}  {method.label:<{width}}  failed: {exc}")
                continue
            rounds[method.label].append(done)
            speed = rate(payload, done)
            progress(f"round {number}/{count}  {method.label:<{width}}  {speed:6.0f} MB/s")
    return {label: done for label, done in rounds.items() if label not in failed}


def rate(payload: Payload, done: Round) -> float:
    return payload.size / done.seconds / 1e6


# --- the report ------------------------------------------------------------------------------


def render(
    payload: Payload,
    rounds: dict[str, list[Round]],
    not_run: dict[str, str],
    anchors: Sequence[Method],
    sfs: list[Sfs],
) -> str:
    medians = {
        label: statistics.median(rate(payload, r) for r in done) for label, done in rounds.items()
    }
    ran_scp = [a.label for a in anchors if isinstance(a, Scp) and a.label in medians]
    fastest_scp = max(ran_scp, key=medians.__getitem__, default=None)
    wormhole = WORMHOLE_DIRECT if WORMHOLE_DIRECT in medians else None
    count = max((len(done) for done in rounds.values()), default=0)
    lines = [
        "## Transfer: sfs against scp and magic-wormhole",
        "",
        f"One file of {format_size(payload.size)} ({payload.size:,} random bytes) over"
        f" 127.0.0.1, {count} round(s) of each method, alternating. MB/s is 10^6 bytes per"
        " second of wall time of the receiving command (`scp`, `wormhole receive`,"
        " `sfs-peer get`), from its start to its exit, plus, for the methods that do not"
        " fsync the file themselves (all but sfs), an fsync of the received file.",
        "",
        f"| method | MB/s median | spread (min-max) | vs fastest scp | vs {WORMHOLE_DIRECT}"
        " | peak RSS sender | peak RSS receiver |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, done in rounds.items():
        rates = [rate(payload, r) for r in done]
        median = medians[label]
        sender = mib(max(r.sender_kib for r in done))
        receiver = mib(max(r.receiver_kib for r in done))
        if label in ran_scp:
            sender, receiver = f"{sender} (scp + ssh)*", f"{receiver} (sshd)*"
        lines.append(
            f"| {label} | {median:.0f} | {min(rates):.0f}-{max(rates):.0f}"
            f" | {ratio(median, medians, fastest_scp)} | {ratio(median, medians, wormhole)}"
            f" | {sender} | {receiver} |"
        )
    for label, reason in not_run.items():
        lines.append(f"| {label} | not run: {reason.replace('|', '/')} | | | | | |")
    lines += ["", *notes(payload, rounds, medians, fastest_scp, wormhole, anchors, sfs)]
    return "\n".join(lines) + "\n"


def ratio(median: float, medians: dict[str, float], anchor: str | None) -> str:
    return f"{median / medians[anchor]:.2f}x" if anchor else "n/a"


def notes(
    payload: Payload,
    rounds: dict[str, list[Round]],
    medians: dict[str, float],
    fastest_scp: str | None,
    wormhole: str | None,
    anchors: Sequence[Method],
    sfs: list[Sfs],
) -> list[str]:
    per_round = "; ".join(
        f"{label}: " + ", ".join(f"{rate(payload, r):.0f}" for r in done)
        for label, done in rounds.items()
    )
    shares = ", ".join(
        f"{s.share_seconds:.2f} s = {payload.size / s.share_seconds / 1e6:.0f} MB/s ({s.label})"
        for s in sfs
    )
    untimed = statistics.median(
        r.untimed for s in sfs for r in rounds.get(s.label, []) if r.untimed is not None
    )
    durable = "; ".join(
        f"{label}: {statistics.median(r.durable for r in done if r.durable is not None):.2f} s"
        for label, done in rounds.items()
        if any(r.durable is not None for r in done)
    )
    sfs_label = sfs[0].label
    targets = []
    if sfs_label in medians and fastest_scp:
        against = medians[sfs_label] / medians[fastest_scp]
        targets.append(f"sfs / {fastest_scp}, the fastest scp, = {against:.2f}x (target: >= 1.5x)")
    if sfs_label in medians and wormhole:
        targets.append(
            f"sfs / {wormhole} = {medians[sfs_label] / medians[wormhole]:.2f}x (target: >= 2.5x)"
        )
    if sfs_label in medians and TWO_HOLDERS in medians:
        two = medians[TWO_HOLDERS] / medians[sfs_label]
        targets.append(f"{TWO_HOLDERS} / sfs = {two:.2f}x (target: not slower, >= 1x)")
    lines = [f"- Targets, medians of this run: {'; '.join(targets) or 'n/a'}."] if targets else []
    lines += [
        f"- MB/s per round, in order: {per_round}.",
        f"- fsync of the received file, added by the bench (median): {durable or 'n/a'}."
        " `sfs-peer get` fsyncs the file itself before renaming it into place.",
        f"- Of each `sfs-peer get`, {untimed:.2f} s (median) is outside its own download"
        " timer: interpreter start-up, imports, the broker lookup, exit.",
        f"- `sfs-peer share` before the rounds (hash, sign, publish; not in the figures above):"
        f" {shares}.",
    ]
    scps = [a for a in anchors if isinstance(a, Scp)]
    worms = [a for a in anchors if isinstance(a, Wormhole) and a.label in medians]
    if scps:
        ciphers = ", ".join(f"`{s.cipher}`" for s in scps)
        lines.append(
            f"- scp ciphers: {ciphers}, as negotiated (`ssh -v`) with the throwaway sshd"
            " (generated config, `-F none` on the client; the first is OpenSSH's default,"
            " the other `scp -c`); scp speaks SFTP, `internal-sftp` on the server."
        )
    if worms:
        reported = "; ".join(
            f"{w.label}, {', '.join(f'`{p}`' for p in sorted(w.paths))}" for w in worms
        )
        lines.append(
            "- magic-wormhole: `wormhole send` and `wormhole receive --accept-file -o`"
            f" ({wormhole_version()}), with their own mailbox server and transit relay, all"
            " in one private network namespace (`unshare -n`) whose only interface is"
            " loopback. The receiver starts once the sender is connected to the mailbox"
            " (a socket of the namespace, read from /proc). Relayed: `--no-listen` on both"
            " sides, so neither offers a direct hint. The transit path each receiver"
            f" reported (checked every round): {reported}."
        )
    lines += [
        "- Peak RSS is the largest over the rounds. sfs receiver: `sfs-peer get`, exact"
        " (GNU time's %M, the kernel's high-water mark). sfs sender: VmHWM of"
        " `sfs-peer serve` from /proc, which is cumulative since it started."
        " magic-wormhole: `wormhole send` and `wormhole receive`, exact (GNU time's %M);"
        " the mailbox and relay are not counted.",
        "- \\* scp, best effort: the peaks of the processes on each side, summed (an upper"
        " bound, as they do not all peak at once), VmHWM sampled from /proc every 50 ms."
        " Sender: scp and its ssh child. Receiver: the sshd processes forked for the"
        " connection (monitor, pre-auth child, session), not the listener.",
    ]
    return lines


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
