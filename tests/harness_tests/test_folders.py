"""Folder shares with real processes, through the CLI: a tree with nested folders, an
empty folder, an executable, a relative link, non-ASCII names and an empty file goes
from `share` to `get` byte for byte, with modes and links; links that point outside are
refused unless `--skip-unsafe`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, one_line_error

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
    file_id = alice.share(source)
    got = bob.run("get", file_id, "--json").check().json()
    assert got["path"] == str(bob.download_dir / "projet été")
    assert (got["files"], got["files_resumed"]) == (4, 0)
    assert listing(Path(got["path"])) == listing(source)
    again = bob.run("get", file_id).check()
    assert "already downloaded" in again.stdout
    [listed] = [s for s in alice.run("list", "--json").check().json() if s["file_id"] == file_id]
    assert (listed["kind"], listed["files"], listed["name"]) == ("folder", 4, "projet été")
    assert "folder, 4 files" in alice.run("list", "--wide").check().stdout


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
