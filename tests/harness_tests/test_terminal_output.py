"""What a person sees: `sfs-peer` in a real terminal 80 columns wide (tmux, read back with
`capture-pane`), and piped into `cat`.

Captured with `capture-pane -J` (tests/terminal.py's `Screens`), a line the terminal
wrapped comes back joined, longer than 80 columns: so "no line is wider than 80" means
nothing was wrapped. Skipped when tmux is missing, unless SFS_REQUIRE_TMUX=1 (as in CI)
makes that a failure.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator

import pytest
from rich.cells import cell_len

from tests.harness import Cluster, Peer
from tests.terminal import COLUMNS, Screens, require_tmux

pytestmark = pytest.mark.harness
require_tmux()

LONG_NAME = "Quarterly report 2026 - final version (approved by the board).pdf"
NO_SPACES = "holiday-photos_2025-08-lake-como-and-the-dolomites-full-resolution.tar.zst"
NAMES = [LONG_NAME, NO_SPACES, "notes.txt"]
FOLDER = "folder of shared files"


def _words(text: str) -> set[str]:
    return {word for word in re.split(r"[\s\-_./,()]+", text) if word}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        running.add_peer("alice", serve=True)
        running.add_peer("bob")
        folder = running.root / "some" / "deeply" / "nested" / FOLDER
        folder.mkdir(parents=True)
        for size, name in enumerate(NAMES, start=1):
            (folder / name).write_bytes(os.urandom(1000 * size**5))
            running.peers["alice"].share(folder / name, "-k", "report", "-k", "finance")
        running.peers["alice"].share(folder, "-k", "report")  # a folder of the three files
        yield running


@pytest.fixture(scope="module")
def terminal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Screens]:
    running = Screens(tmp_path_factory.mktemp("terminal"))
    yield running
    running.close()


def _sfs(peer: Peer, *args: str) -> str:
    return shlex.join(["sfs-peer", *args, "--config", str(peer.config)])


def _ids(peer: Peer) -> dict[str, str]:
    found = peer.run("search", "--json").check().json()
    return {hit["name"]: hit["file_id"] for hit in found["hits"]}


def _check_80_columns(screen: list[str], ids: dict[str, str]) -> None:
    """Nothing wrapped; each file on lines of its own, starting with a short unique id;
    every word of its name whole; no full id."""
    assert all(cell_len(line) <= COLUMNS for line in screen), "\n".join(screen)
    text = "\n".join(screen)
    for name, file_id in ids.items():
        starts = [i for i, line in enumerate(screen) if line.startswith(file_id[:8])]
        assert len(starts) == 1, text
        assert file_id not in text  # shortened (`--wide` shows it)
        name_lines = screen[starts[0] : starts[0] + 4]
        assert _words(name) <= {w for line in name_lines for w in _words(line)}, text
    assert "--wide shows full ids" in text


def test_search_at_80_columns(terminal: Screens, cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    screen = terminal.run(_sfs(bob, "search"))
    ids = _ids(bob)
    _check_80_columns(screen, ids)
    assert screen[0].split()[:4] == ["file", "id", "name", "files"]
    assert len(screen) <= 1 + 4 * 3 + 1  # three files and a folder, not a line per character
    [folder] = [line for line in screen if line.startswith(ids[FOLDER][:8])]
    assert f"{FOLDER}/" in folder and folder.split()[5] == "3"  # the folder's files


def test_list_at_80_columns(terminal: Screens, cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    screen = terminal.run(_sfs(alice, "list"))
    _check_80_columns(screen, _ids(cluster.peers["bob"]))
    assert "path" in screen[-1]  # left out at 80 columns, and said so
    wide = terminal.run(_sfs(alice, "list", "--wide"))
    assert all(file_id in "\n".join(wide) for file_id in _ids(cluster.peers["bob"]).values())


def test_peers_at_80_columns_and_verified_pins(terminal: Screens, cluster: Cluster) -> None:
    alice, bob = cluster.peers["alice"], cluster.peers["bob"]
    got = bob.run("get", _ids(bob)["notes.txt"]).check()
    assert "first contact with alice" in got.stderr and "sfs-peer verify alice" in got.stderr
    fingerprint = alice.run("whoami", "--json").check().json()["fingerprint"]
    screen = terminal.run(_sfs(bob, "peers"))
    assert all(cell_len(line) <= COLUMNS for line in screen)
    row = next(line for line in screen if line.startswith("alice "))
    assert row.split()[1:3] == ["-".join(fingerprint.split("-")[:4]) + "…", "no"]

    shown = terminal.run(_sfs(bob, "verify", "alice"))
    assert all(cell_len(line) <= COLUMNS for line in shown)
    code = bob.run("verify", "alice", "--json").check().json()["safety_code"]
    assert alice.run("verify", "bob", "--json").check().json()["safety_code"] == code
    assert re.fullmatch(r"\d{5}( \d{5}){11}", code)
    assert " ".join(line.strip() for line in shown[1:3]) == code
    bob.run("verify", "alice", "--confirm").check()
    after = terminal.run(_sfs(bob, "peers"))
    assert next(line for line in after if line.startswith("alice ")).split()[2] == "yes"


def test_piped_into_cat_one_record_per_line(terminal: Screens, cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    ids = _ids(bob)
    screen = terminal.run(_sfs(bob, "search") + " | cat")
    for name, file_id in ids.items():
        record = [line for line in screen if file_id in line]
        assert len(record) == 1 and name in record[0]  # whole id, whole name, one line
    records = bob.run("search").check().stdout.splitlines()  # through a pipe as well
    assert len(records) == 1 + len(ids)
    fields = {line.split("\t")[0]: line.split("\t") for line in records[1:]}
    assert {ids[name]: name for name in ids} == {fid: f[1] for fid, f in fields.items()}
    assert records[0].split("\t")[:4] == ["file id", "name", "kind", "files"]
    assert fields[ids[FOLDER]][2:4] == ["folder", "3"]
    assert fields[ids["notes.txt"]][2:4] == ["file", "1"]


def test_unfinished_downloads_listed_and_cleaned(terminal: Screens, cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    bob.download_dir.mkdir(parents=True, exist_ok=True)
    partial = bob.download_dir / f".sfs-{'e' * 32}.part"
    partial.write_bytes(b"x" * 5000)
    decoy = bob.download_dir / f".sfs-{'f' * 32}.part"
    decoy.symlink_to(cluster.root / "broker.yaml")
    listed = terminal.run(_sfs(bob, "list"))
    assert any(line.startswith("1 unfinished download (4.9 KiB)") for line in listed), listed
    assert "unfinished" not in bob.run("list").check().stdout  # piped: records only
    screen = terminal.run(_sfs(bob, "list", "--partial"))
    assert any(line.startswith("e" * 8) and "4.9 KiB" in line for line in screen), screen
    assert not any(line.startswith("f" * 8) for line in screen)
    kept = bob.run("clean", "--json").check().json()  # written just now: kept
    assert kept["removed"] == [] and kept["kept_recent"] == [str(partial)]
    done = bob.run("clean", "--older-than", "0", "--json").check().json()
    assert done["removed"] == [str(partial)] and done["bytes_freed"] == 5000
    assert not partial.exists() and decoy.is_symlink()
    assert (cluster.root / "broker.yaml").exists()
