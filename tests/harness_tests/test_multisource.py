"""Multi-source downloads with real processes: peers that downloaded a file serve it too
(seeding), `get` pulls from every holder at once, and survives one of them dying."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfs.broker.store import add_sql_functions
from tests.harness import Cluster, Peer, command_for, one_line_error, snapshot, wait_for_partial

pytestmark = pytest.mark.harness

MiB = 1 << 20
SIZE = 96 * MiB


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        yield running


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while block := data.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def holders_listed(cluster: Cluster, file_id: str) -> set[str]:
    db = sqlite3.connect(cluster.root / "broker" / "broker.db")
    try:
        rows = db.execute(
            "SELECT u.username FROM holders h JOIN users u ON u.id = h.user_id WHERE h.file_id = ?",
            (file_id,),
        ).fetchall()
    finally:
        db.close()
    return {row[0] for row in rows}


def test_three_holders_one_killed_mid_transfer(cluster: Cluster) -> None:
    alice = cluster.add_peer("alice", serve=True)
    source = cluster.root / "big.bin"
    expected = make_file(source, SIZE)
    file_id = alice.share(source)

    # bob and carol download it, and so become holders (seed is on by default).
    seeders: list[Peer] = []
    for name in ("bob", "carol"):
        seeder = cluster.add_peer(name)
        got = seeder.run("get", file_id, "--json").check().json()
        assert got["seeding"] is True
        assert "alice" in got["holders"] and set(got["holders"]) <= {"alice", "bob"}
        seeder.serve()
        seeders.append(seeder)
    assert holders_listed(cluster, file_id) == {"bob", "carol"}
    listed = seeders[0].run("list", "--json").check().json()
    assert [(s["file_id"], s["owner"]) for s in listed] == [(file_id, "alice")]

    # dave pulls from all three, one request in flight each; carol dies on the way.
    dave = cluster.add_peer("dave", window=1)
    getting = subprocess.Popen(
        [*command_for("sfs-peer"), "get", file_id, "--json", "--config", str(dave.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cluster.root,
    )
    wait_for_partial(dave.download_dir, 8 * MiB)
    assert seeders[1].server is not None
    seeders[1].server.kill()
    out, err = getting.communicate(timeout=120)
    assert getting.returncode == 0, err
    got = json.loads(out)

    assert file_sha256(Path(got["path"])) == expected
    assert got["bytes"] == SIZE
    assert {"alice", "bob"} <= set(got["holders"]) <= {"alice", "bob", "carol"}
    assert set(snapshot(dave.download_dir)) == {"big.bin"}  # no partial left behind


def test_a_seeder_refuses_whom_the_owners_grant_leaves_out(cluster: Cluster) -> None:
    """The broker lies (a crafted access row) while the owner is offline: the seeder
    still refuses, because it checks the owner's signed access list, not the broker."""
    owner = cluster.add_peer("olga", serve=True)
    friend = cluster.add_peer("fred")
    stranger = cluster.add_peer("sten")
    secret = cluster.root / "secret.bin"
    make_file(secret, 2 * MiB)
    file_id = owner.share(secret, "--to", "fred")
    assert friend.run("get", file_id, "--json").check().json()["seeding"] is True
    friend.serve()
    owner.stop()  # now only fred's copy is online

    db = sqlite3.connect(cluster.root / "broker" / "broker.db", isolation_level=None)
    add_sql_functions(db)  # the search index's triggers call them
    try:
        db.execute(
            "INSERT INTO access (file_id, user_id) SELECT ?, id FROM users WHERE username = ?",
            (file_id, "sten"),
        )
    finally:
        db.close()
    before = snapshot(stranger.download_dir)
    refused = stranger.run("get", file_id)
    assert one_line_error(refused) == f"error: fred: file {file_id} is not shared with you"
    assert refused.returncode == 1
    assert snapshot(stranger.download_dir) == before
    assert friend.server is not None and friend.server.alive()


def test_without_seed_a_download_is_not_served(cluster: Cluster) -> None:
    owner = cluster.add_peer("paula", serve=True)
    source = cluster.root / "plain.bin"
    make_file(source, MiB)
    file_id = owner.share(source)
    quiet = cluster.add_peer("quinn", seed="false")
    assert quiet.run("get", file_id, "--json").check().json()["seeding"] is False
    assert quiet.run("list", "--json").check().json() == []
    assert "quinn" not in holders_listed(cluster, file_id)
