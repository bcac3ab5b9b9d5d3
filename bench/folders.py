"""Folders over loopback: sfs against `scp -r`, `tar -cf - | ssh tar -xf -` and
magic-wormhole's directory mode, on two trees.

    .venv/bin/python -m bench --only folders --rounds 3

The trees: this machine's Python standard library without site-packages (copied into the
bench's temporary folder first), and 20,000 files of 4 KiB of random bytes, in 100
folders of 200. Rounds alternate between the methods, as in the file transfer. Each
method's time is its command, from start to exit, plus a `sync` for the methods that do not
make the received tree durable (all but sfs: `sfs-peer get` syncs the tree before it
renames it into place). sfs: a throwaway broker, alice shares each tree once (untimed)
and serves it, bob runs `sfs-peer get` each round. For magic-wormhole it runs from the
sender's start, as the sender zips the folder before it offers it. Every received tree
is compared with the source (relative names, sizes, SHA-256) and deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench import transfer
from bench.common import BenchError, progress
from bench.procs import run_timed
from bench.sshd import Sshd
from bench.wormhole import NotRun, WormholeNet
from tests.harness import Cluster, command_for

CIPHER = "aes128-gcm@openssh.com"  # the fastest scp cipher here, for both ssh methods
SMALL_FILES, SMALL_FOLDERS, SMALL_SIZE = 20_000, 100, 4096
SHARE_TIMEOUT = 600.0  # seconds for `sfs-peer share` of one tree (scan, hash, sign, publish)


@dataclass(frozen=True)
class Tree:
    name: str
    path: Path
    files: int
    size: int
    manifest: dict[str, tuple[int, str]]  # relative path: (size, SHA-256)


class FolderMethod(Protocol):
    label: str
    durable: bool  # it makes the received tree durable itself: the bench adds no `sync`

    def transfer(self, tree: Tree, target: Path) -> float: ...


def manifest(root: Path) -> dict[str, tuple[int, str]]:
    found: dict[str, tuple[int, str]] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_symlink() or not path.is_file():
                continue
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            found[str(path.relative_to(root))] = (path.stat().st_size, digest)
    return found


def make_tree(name: str, path: Path) -> Tree:
    files = manifest(path)
    return Tree(name, path, len(files), sum(size for size, _ in files.values()), files)


def stdlib_tree(root: Path) -> Tree:
    source = Path(sysconfig.get_paths()["stdlib"])
    target = root / "stdlib"
    progress(f"copying {source} without site-packages")

    def skip(folder: str, names: list[str]) -> list[str]:
        return ["site-packages"] if Path(folder) == source else []

    shutil.copytree(source, target, symlinks=True, ignore=skip)
    return make_tree(f"Python {'.'.join(map(str, sys.version_info[:2]))} stdlib", target)


def small_files_tree(root: Path) -> Tree:
    target = root / "small"
    progress(f"writing {SMALL_FILES:,} files of {SMALL_SIZE // 1024} KiB")
    per_folder = SMALL_FILES // SMALL_FOLDERS
    for number in range(SMALL_FOLDERS):
        folder = target / f"d{number:03}"
        folder.mkdir(parents=True)
        for index in range(per_folder):
            (folder / f"f{index:04}.bin").write_bytes(os.urandom(SMALL_SIZE))
    os.sync()
    return make_tree(f"{SMALL_FILES:,} files of {SMALL_SIZE // 1024} KiB", target)


def durable() -> float:
    """`sync`, timed: what the bench adds for methods that leave the tree in the cache."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


class ScpR:
    durable = False

    def __init__(self, sshd: Sshd, logs: Path) -> None:
        self.sshd, self.logs = sshd, logs
        self.label = f"scp -r ({sshd.negotiated_cipher(CIPHER)})"

    def transfer(self, tree: Tree, target: Path) -> float:
        argv = self.sshd.scp_argv(tree.path, target, CIPHER, recursive=True)
        timed = run_timed(argv, self.logs / "scp-r")
        if timed.returncode != 0:
            raise BenchError(f"scp -r failed: {timed.last_error_line()}")
        return timed.seconds


class TarSsh:
    durable = False

    def __init__(self, sshd: Sshd, logs: Path) -> None:
        self.sshd, self.logs = sshd, logs
        self.label = f"tar -cf - | ssh tar -xf - ({sshd.negotiated_cipher(CIPHER)})"

    def transfer(self, tree: Tree, target: Path) -> float:
        remote = f"mkdir -p {shlex.quote(str(target))} && tar -C {shlex.quote(str(target))} -xf -"
        pack = shlex.join(["tar", "-C", str(tree.path), "-cf", "-", "."])
        line = f"set -o pipefail; {pack} | {shlex.join(self.sshd.ssh_argv(remote, CIPHER))}"
        timed = run_timed(["bash", "-c", line], self.logs / "tar-ssh")
        if timed.returncode != 0:
            raise BenchError(f"tar over ssh failed: {timed.last_error_line()}")
        return timed.seconds


class WormholeDir:
    label = "magic-wormhole direct, directory mode"
    durable = False

    def __init__(self, net: WormholeNet) -> None:
        self.net = net

    def transfer(self, tree: Tree, target: Path) -> float:
        return self.net.transfer(tree.path, target).total_seconds


class SfsFolders:
    """`with SfsFolders(folder, trees)`: a broker, alice sharing every tree (untimed) and
    serving them, and bob, who fetches a tree with the real `sfs-peer get` each round."""

    label = "sfs"
    durable = True

    def __init__(self, folder: Path, trees: Sequence[Tree]) -> None:
        self.folder, self.trees = folder, trees
        self.ids: dict[str, str] = {}
        self.share_seconds: dict[str, float] = {}

    def __enter__(self) -> SfsFolders:
        self.folder.mkdir()
        self.cluster = Cluster(self.folder)
        try:
            self.cluster.start_broker()
            self.alice = self.cluster.add_peer("alice")
            self.bob = self.cluster.add_peer("bob")
            for tree in self.trees:
                started = time.perf_counter()
                shared = self.alice.run("share", str(tree.path), "--json", timeout=SHARE_TIMEOUT)
                self.share_seconds[tree.name] = time.perf_counter() - started
                self.ids[tree.name] = shared.check().json()["file_id"]
            self.alice.serve()
        except BaseException:
            self.cluster.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.close()

    def transfer(self, tree: Tree, target: Path) -> float:
        """Fetched into a folder beside `target`, then renamed to it (untimed), so that the
        tree is checked where every method's is."""
        out = target.parent / "sfs-out"
        argv = [*command_for("sfs-peer"), "get", self.ids[tree.name], "--json"]
        argv += ["--out", str(out), "--config", str(self.bob.config)]
        timed = run_timed(argv, self.folder / "get")
        try:
            if timed.returncode != 0:
                raise BenchError(f"sfs-peer get failed: {timed.last_error_line()}")
            Path(json.loads(timed.stdout)["path"]).rename(target)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return timed.seconds


def run(args: argparse.Namespace) -> str:
    """The markdown section for results.md; `args.rounds`."""
    with tempfile.TemporaryDirectory(prefix="sfs-bench-folders-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        trees = [stdlib_tree(root / "src"), small_files_tree(root / "src")]
        progress("starting sshd and the wormhole mailbox and relay")
        methods: list[FolderMethod] = []
        not_run: dict[str, str] = {}
        try:
            sshd = stack.enter_context(Sshd(root / "sshd"))
            methods += [ScpR(sshd, root), TarSsh(sshd, root)]
        except (BenchError, subprocess.CalledProcessError, OSError) as exc:
            not_run["scp -r, tar over ssh"] = str(exc)
        try:
            methods.append(WormholeDir(stack.enter_context(WormholeNet(root / "wormhole"))))
        except (NotRun, BenchError, OSError) as exc:
            not_run[WormholeDir.label] = str(exc)
        progress("starting an sfs broker and two peers; alice shares both trees")
        sfs = stack.enter_context(SfsFolders(root / "sfs", trees))
        methods.append(sfs)
        results = {
            tree.name: run_rounds(methods, tree, root / "in", args.rounds, not_run)
            for tree in trees
        }
        return render(trees, results, not_run, args.rounds, sfs.share_seconds)


def run_rounds(
    methods: Sequence[FolderMethod],
    tree: Tree,
    target: Path,
    count: int,
    not_run: dict[str, str],
    shuffle: random.Random | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """(command seconds, sync seconds) per round of each method that did not fail. As
    for the transfers (`bench.transfer.run_rounds`), each round runs the methods in its
    own order (`shuffle`), each after a rest (`SETTLE`): in a fixed order `scp -r` always
    ran right after the previous round's sfs tree was deleted, and took 8.1-8.5 s there
    against 4.7-5.3 s in the first round."""
    shuffle = shuffle or random.Random()  # noqa: S311 (an order of runs, not secrets)
    rounds: dict[str, list[tuple[float, float]]] = {m.label: [] for m in methods}
    width = max((len(label) for label in rounds), default=0)
    for number in range(1, count + 1):
        order = list(methods)
        shuffle.shuffle(order)
        for method in order:
            if method.label in not_run:
                continue
            time.sleep(transfer.SETTLE)
            try:
                seconds = method.transfer(tree, target)
                synced = 0.0 if method.durable else durable()
                check_tree(tree, target)
            except BenchError as exc:
                not_run[method.label] = f"failed on {tree.name}, round {number}: {exc}"
                rounds.pop(method.label, None)
                continue
            finally:
                shutil.rmtree(target, ignore_errors=True)
            rounds[method.label].append((seconds, synced))
            progress(
                f"round {number}/{count}  {tree.name}  {method.label:<{width}}"
                f"  {seconds + synced:6.2f} s"
            )
    return rounds


def check_tree(tree: Tree, target: Path) -> None:
    if not target.is_dir():
        raise BenchError(f"nothing was received at {target}")
    got = manifest(target)
    if got != tree.manifest:
        missing = len(tree.manifest.keys() - got.keys())
        differ = sum(1 for k in tree.manifest.keys() & got.keys() if got[k] != tree.manifest[k])
        raise BenchError(f"the received tree differs: {missing} missing, {differ} different")


def cell(text: str) -> str:
    """Text for a markdown table cell: `|` escaped."""
    return text.replace("|", "\\|")


def render(
    trees: list[Tree],
    results: dict[str, dict[str, list[tuple[float, float]]]],
    not_run: dict[str, str],
    count: int,
    shares: dict[str, float],
) -> str:
    lines = [
        "## Folders: sfs against scp -r, tar over ssh, magic-wormhole",
        "",
        f"{count} round(s) of each method on each tree, alternating, over 127.0.0.1. Seconds"
        " of wall time of the receiving command, plus a `sync` after it for the methods"
        " that do not make the received tree durable (all but sfs, whose `get` syncs the"
        " tree before it renames it into place). magic-wormhole is timed from the sender's"
        " start, as it zips the folder before offering it.",
        "",
        "| tree | method | seconds median | spread (min-max) | vs scp -r | vs tar over ssh"
        " | MB/s | files/s | sync (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tree in trees:
        medians = {
            label: statistics.median(seconds + synced for seconds, synced in done)
            for label, done in results[tree.name].items()
            if done
        }
        scp = next((m for label, m in medians.items() if label.startswith("scp -r")), None)
        tar = next((m for label, m in medians.items() if label.startswith("tar ")), None)
        for label, done in results[tree.name].items():
            if not done:
                continue
            totals = [seconds + synced for seconds, synced in done]
            median = medians[label]
            synced = (
                "own"
                if label == SfsFolders.label
                else f"{statistics.median(s for _, s in done):.2f} s"
            )
            spread = f"{min(totals):.2f}-{max(totals):.2f}"
            lines.append(
                f"| {tree.name} | {cell(label)} | {median:.2f} | {spread}"
                f" | {ratio(scp, median)} | {ratio(tar, median)}"
                f" | {tree.size / median / 1e6:.0f} | {tree.files / median:,.0f} | {synced} |"
            )
    for label, reason in not_run.items():
        lines.append(f"| | {cell(label)} | not run: {cell(reason)} | | | | | | |")
    sizes = "; ".join(f"{t.name}: {t.files:,} files, {t.size / 1e6:,.0f} MB" for t in trees)
    shared = "; ".join(f"{name}: {seconds:.1f} s" for name, seconds in shares.items())
    lines += [
        "",
        "- vs scp -r, vs tar over ssh: how many times faster than that method (its median"
        " seconds over this one's), in this run.",
        f"- Trees: {sizes}. The stdlib tree is copied from this interpreter's, without"
        " site-packages; its `__pycache__` folders are part of it.",
        "- sfs: a throwaway broker and two peers (tests/harness.py), transport encryption"
        " on; alice shares each tree once before the rounds and serves it; bob runs"
        f" `sfs-peer get ID --json --out DIR`. The share, not timed above: {shared or 'none'}.",
        f"- ssh methods: cipher `{CIPHER}` against the throwaway sshd (bench/sshd.py);"
        " tar runs `tar -C SRC -cf - . | ssh ... 'mkdir -p DST && tar -C DST -xf -'`.",
        "- magic-wormhole: `wormhole send FOLDER`, `wormhole receive --accept-file -o DST`,"
        " direct, in the private network namespace of bench/wormhole.py.",
        "- `sync` flushes every file system, so on a shared machine it can include others'"
        " writes: on a busy machine the sync column is an upper bound.",
    ]
    return "\n".join(lines) + "\n"


def ratio(anchor: float | None, median: float) -> str:
    return "" if anchor is None else f"{anchor / median:.2f}x"
