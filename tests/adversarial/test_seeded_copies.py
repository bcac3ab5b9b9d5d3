"""Seeded copies that are gone: a peer whose downloaded copy was deleted or moved must
stop announcing itself as a holder of it (`sfs-peer serve` checks its seeded copies at
start and whenever one fails to read, and `release`s them at the broker), so that
requesters are not sent to a holder that cannot serve them.

Real `sfs-broker` and `sfs-peer` processes (`tests.harness`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, Peer, one_line_error
from tests.harness_tests.test_multisource import holders_listed

MiB = 1 << 20
WAIT = 30.0  # generous: the machine is shared


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        yield running


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT:g} s: {what}")
        time.sleep(0.1)


def seeded(cluster: Cluster, owner: Peer, seeder: Peer, name: str) -> tuple[str, Path]:
    """`owner` shares a new 2 MiB file and `seeder` downloads it (and so seeds it)."""
    source = cluster.root / name
    source.write_bytes(os.urandom(2 * MiB))
    file_id = owner.share(source)
    got = seeder.run("get", file_id, "--json").check().json()
    assert got["seeding"] is True
    assert seeder.name in holders_listed(cluster, file_id)
    return file_id, Path(got["path"])


def test_a_seeded_copy_deleted_while_offline_is_released_when_serving_starts(
    cluster: Cluster,
) -> None:
    """Stopped by: `serve` checks every seeded copy at start, in the background, and
    releases what it no longer has."""
    owner = cluster.add_peer("olga", serve=True)
    seeder, reader = cluster.add_peer("sam"), cluster.add_peer("rita")
    file_id, copy = seeded(cluster, owner, seeder, "deleted.bin")
    copy.unlink()

    server = seeder.serve()
    wait_until(lambda: "sam" not in holders_listed(cluster, file_id), "sam released it")
    # Released at the broker first, then forgotten here and logged: wait for the log.
    said = f"no longer seeding deleted.bin ({file_id}): {copy} is gone"
    wait_until(lambda: said in server.output(), "sam said so")
    assert seeder.run("list", "--json").check().json() == []
    got = reader.run("get", file_id, "--json").check().json()
    assert got["holders"] == ["olga"]


def test_a_seeded_copy_moved_while_serving_is_released_after_it_fails(
    cluster: Cluster,
) -> None:
    """The seeder serves; its copy is moved away, and the owner is offline. The first
    requester is told the holder cannot read it; then the seeder releases it, and the
    next requester is told nobody serves it, instead of being sent there again.
    Stopped by: a failed read makes `serve` check that copy, in the background."""
    owner = cluster.add_peer("otto", serve=True)
    seeder, reader = cluster.add_peer("sid"), cluster.add_peer("ruth")
    file_id, copy = seeded(cluster, owner, seeder, "moved.bin")
    seeder.serve()
    owner.stop()
    copy.rename(copy.with_name("elsewhere.bin"))

    first = one_line_error(reader.run("get", file_id))
    assert first == "error: sid: the holder cannot read moved.bin any more"
    wait_until(lambda: "sid" not in holders_listed(cluster, file_id), "sid released it")
    again = one_line_error(reader.run("get", file_id))
    assert again.startswith("error: otto is offline: nobody is serving moved.bin right now")
    assert seeder.server is not None and seeder.server.alive()
    assert "Traceback" not in seeder.server.output()


def test_a_seeded_copy_still_there_is_kept(cluster: Cluster) -> None:
    """The check releases only what is gone: a copy in place stays seeded across a
    restart of `serve`."""
    owner = cluster.add_peer("oscar", serve=True)
    seeder = cluster.add_peer("stan")
    file_id, _ = seeded(cluster, owner, seeder, "kept.bin")
    server = seeder.serve()
    checked = "seeded copies checked: 1 in place, 0 gone"
    wait_until(lambda: checked in server.output(), "the check at start")
    assert holders_listed(cluster, file_id) == {"stan"}
    assert [s["file_id"] for s in seeder.run("list", "--json").check().json()] == [file_id]
