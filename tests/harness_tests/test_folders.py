"""Folder shares with real processes, through the CLI: a tree with nested folders, an
empty folder, an executable, a relative link, non-ASCII names and an empty file goes
from `share` to `get` byte for byte, with modes and links; links that point outside are
refused unless `--skip-unsafe`; Ctrl-C in the middle of a folder keeps its verified
chunks, and the same `get` fetches only the rest."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, command_for, one_line_error, snapshot, wait_for_partial

pytestmark = pytest.mark.harness


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        running.add_peer("alice").serve()
        running.add_peer("bob")
        yield running


def make_tree(root: Path) -> Path:
    tree = root / "projet été"
    (tree / "src" / "deep" / "deeper").mkdir(parents=True)
    (tree / "empty folder").mkdir()
    (tree / "src" / "main.py").write_text("print('hi')\n")
    (tree / "src" / "deep" / "deeper" / "données.bin").write_bytes(os.urandom(3 << 20))
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "empty").write_bytes(b"")
    (tree / "main").symlink_to("src/main.py")
    return tree


def listing(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    found: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            found[rel] = ("folder", path.stat().st_mode & 0o777, "")
        else:
            found[rel] = ("file", path.stat().st_mode & 0o777, path.read_bytes())
    return found


def test_a_real_tree_round_trip_through_the_cli(cluster: Cluster) -> None:
    alice, bob = cluster.peers["alice"], cluster.peers["bob"]
    source = make_tree(cluster.root / "alice-files")
    file_id = alice.share(source, "-k", "vacances")
    got = bob.run("get", file_id, "--json").check().json()
    assert got["path"] == str(bob.download_dir / "projet été")
    assert (got["files"], got["files_resumed"]) == (4, 0)
    assert listing(Path(got["path"])) == listing(source)
    again = bob.run("get", file_id).check()
    assert "already downloaded" in again.stdout
    [listed] = [s for s in alice.run("list", "--json").check().json() if s["file_id"] == file_id]
    assert (listed["kind"], listed["files"], listed["name"]) == ("folder", 4, "projet été")
    piped = [line.split("\t") for line in alice.run("list").check().stdout.splitlines()]
    assert [file_id, "projet été", "folder", "4"] in [fields[:4] for fields in piped]
    # Search finds it, a folder of 4 files, by its name and by its keyword.
    size = sum(len(data) for kind, _, data in listing(source).values() if kind == "file")
    [hit] = bob.run("search", "projet", "--json").check().json()["hits"]
    assert (hit["file_id"], hit["kind"], hit["files"], hit["size"]) == (file_id, "folder", 4, size)
    found = bob.run("search", "vacances").check().stdout.splitlines()
    assert [file_id, "projet été", "folder", "4"] in [line.split("\t")[:4] for line in found]


def test_a_link_out_of_the_folder_is_refused_unless_skipped(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    tree = cluster.root / "leaky"
    tree.mkdir()
    (tree / "fine.txt").write_text("fine\n")
    (tree / "passwd").symlink_to("/etc/passwd")
    refused = alice.run("share", str(tree))
    assert refused.returncode != 0
    assert one_line_error(refused).startswith(f"error: links in {tree} that point outside it")
    alice.share(tree, "--skip-unsafe")


def test_ctrl_c_in_the_middle_of_a_folder_keeps_verified_chunks_and_resumes(
    cluster: Cluster,
) -> None:
    owner = cluster.add_peer("olga", upload_rate=1 << 20)  # 1 MiB/s: time to interrupt
    owner.serve()
    bob = cluster.peers["bob"]
    tree = cluster.root / "olga-files" / "dataset"
    for folder in range(4):
        (tree / f"part{folder}").mkdir(parents=True)
        for number in range(50):
            (tree / f"part{folder}" / f"{number:02}.bin").write_bytes(os.urandom(20_000))
    size = 4 * 50 * 20_000
    file_id = owner.share(tree)
    argv = [*command_for("sfs-peer"), "get", file_id, "--json", "--config", str(bob.config)]
    getting = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cluster.root
    )
    wait_for_partial(bob.download_dir, 1 << 20)
    getting.send_signal(signal.SIGINT)
    _, err = getting.communicate(timeout=60)
    assert getting.returncode != 0
    assert "Traceback" not in err
    assert not (bob.download_dir / "dataset").exists()  # nothing named before it is whole
    # The staging tree is the partial download: no `.part` stream beside it.
    assert not [name for name in snapshot(bob.download_dir) if ".part" in name]
    [staging] = [p.name for p in bob.download_dir.iterdir() if p.name.endswith(".tree")]

    got = bob.run("get", file_id, "--json", timeout=120).check().json()
    assert got["chunks_resumed"] > 0 and got["files_resumed"] > 0
    assert 0 < got["bytes"] < size  # only the rest came over the network
    assert listing(Path(got["path"])) == listing(tree)
    assert not (bob.download_dir / staging).exists()
