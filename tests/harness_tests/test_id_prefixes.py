"""A unique prefix of a file id wherever an id is taken (`get`, `unshare`), through the
real CLI: resolved among the files the user can see, refused when it is too short, when
it names nothing the user may see, and when it names several (each one listed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfs.broker.store import SqliteStore
from sfs.broker.store_contract import FileEntry
from tests.harness import Cluster, one_line_error

pytestmark = pytest.mark.harness


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        running.add_peer("alice", serve=True)
        running.add_peer("bob")
        running.add_peer("carol")
        yield running


def twin(cluster: Cluster, file_id: str, name: str) -> str:
    """A file of carol's, for everyone, whose id shares its first 9 characters with
    `file_id`: written straight into the broker's store (a real share would take about
    2^32 tries to collide on 8 characters). It can be listed, never downloaded."""
    twin_id = file_id[:9] + ("0" if file_id[9] != "0" else "1") + "0" * 22
    store = SqliteStore(cluster.root / "broker" / "broker.db")
    try:
        carol = store.get_user("carol")
        assert carol is not None
        entry = FileEntry(twin_id, "carol", name, 1, [], b"not a manifest", b"sig", 1)
        store.add_file(carol.id, entry, None)
    finally:
        store.close()
    return twin_id


def test_get_and_unshare_take_a_unique_prefix(cluster: Cluster) -> None:
    alice, bob = cluster.peers["alice"], cluster.peers["bob"]
    path = cluster.root / "prefix.bin"
    path.write_bytes(os.urandom(300_000))
    file_id = alice.share(path)

    got = bob.run("get", file_id[:8], "--json").check().json()
    assert got["file_id"] == file_id
    assert Path(got["path"]).read_bytes() == path.read_bytes()
    again = bob.run("get", file_id[:12].upper()).check()  # case does not matter
    assert again.stdout.startswith("already downloaded:")

    # bob seeds his copy: unshare finds it among his own shares by its prefix
    stopped = bob.run("unshare", file_id[:10]).check()
    assert stopped.stdout.strip() == f"stopped sharing {file_id}"
    stopped = alice.run("unshare", file_id[:8]).check()
    assert stopped.stdout.strip() == f"stopped sharing {file_id}"
    gone = bob.run("get", file_id[:8], "--force")
    assert one_line_error(gone) == (
        f"error: no file id starting with {file_id[:8]} is shared with you"
    )
    assert gone.returncode == 1


def test_a_prefix_never_reveals_a_file_one_may_not_see(cluster: Cluster) -> None:
    alice, carol = cluster.peers["alice"], cluster.peers["carol"]
    path = cluster.root / "for-bob-only.txt"
    path.write_text("private\n")
    file_id = alice.share(path, "--to", "bob")
    for typed in (file_id[:8], file_id[:20], file_id):
        refused = carol.run("get", typed)
        assert "is shared with you" in one_line_error(refused)
        assert "for-bob-only" not in refused.stderr
        assert refused.returncode == 1


def test_an_ambiguous_prefix_is_refused_with_the_candidates(cluster: Cluster) -> None:
    alice, bob = cluster.peers["alice"], cluster.peers["bob"]
    path = cluster.root / "one of two.txt"
    path.write_text("the real one\n")
    file_id = alice.share(path)
    twin_id = twin(cluster, file_id, "the twin.txt")

    refused = bob.run("get", file_id[:8])
    assert refused.returncode == 2
    line = one_line_error(refused)
    assert line.startswith(f"error: file id {file_id[:8]} is ambiguous: 2 files start with it")
    first, second = sorted([(file_id, "one of two.txt (alice)"), (twin_id, "the twin.txt (carol)")])
    assert line.endswith(f"{first[0][:10]} {first[1]}, {second[0][:10]} {second[1]}")
    assert not (bob.download_dir / "one of two.txt").exists()

    got = bob.run("get", file_id[:10], "--json").check().json()  # one more character
    assert got["file_id"] == file_id

    # unshare looks at alice's own shares first: the twin at the broker does not count
    assert alice.run("unshare", file_id[:8]).check().stdout.strip() == (
        f"stopped sharing {file_id}"
    )


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("abc1234", "error: file id abc1234 is too short: ids are 32 hex characters;"),
        ("", "error: not a file id: ''"),
        ("../../etc/passwd", "error: not a file id: '../../etc/passwd'"),
        ("abcdefgh", "error: not a file id: 'abcdefgh'"),
        ("0" * 33, "error: not a file id:"),
    ],
)
def test_what_is_not_an_id_or_a_prefix_is_refused_before_asking(
    cluster: Cluster, typed: str, message: str
) -> None:
    for command in ("get", "unshare"):
        refused = cluster.peers["bob"].run(command, typed)
        assert one_line_error(refused).startswith(message)
        assert refused.returncode == 2
