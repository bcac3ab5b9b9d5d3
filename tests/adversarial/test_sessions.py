"""Sessions that are not (or no longer) valid: expired, forged, logged out, stolen from
another device. Every command that needs the broker's trust is refused with one line
that says to log in again, and nothing is changed; logging in again works."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sfs.common import crypto
from sfs.common.files import write_private_file
from tests.harness import Cluster, Peer, Result, one_line_error, snapshot

GONE = "error: the broker no longer knows this session (expired?); run `sfs-peer login`"
UNKNOWN_ID = "0" * 32


@dataclass
class World:
    cluster: Cluster
    alice: Peer
    bob: Peer
    carol: Peer
    public_id: str
    public: bytes
    source: Path  # a file bob may try to share


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        carol = cluster.add_peer("carol")
        public = os.urandom(100_000)
        (cluster.root / "public.bin").write_bytes(public)
        shared = alice.run("share", str(cluster.root / "public.bin"), "--json").check().json()
        source = cluster.root / "bobs.txt"
        source.write_text("bob's notes\n")
        yield World(cluster, alice, bob, carol, shared["file_id"], public, source)


def session_file(peer: Peer) -> Path:
    return peer.data_dir / "session.json"


def write_session(peer: Peer, username: str, token: str) -> None:
    document = {"username": username, "token": token, "expires_at": int(time.time()) + 3600}
    write_private_file(session_file(peer), json.dumps(document).encode())


def commands(world: World) -> dict[str, tuple[str, ...]]:
    """Every command that needs a session, with arguments it sends to the broker (the
    unshare of a file bob does not share: see the last test for one he does). Not
    `serve`: it signs in with the device's keys (test_unattended_serve.py)."""
    return {
        "search": ("search",),
        "get": ("get", world.public_id),
        "share": ("share", str(world.source)),
        "unshare": ("unshare", UNKNOWN_ID),
    }


def assert_all_refused(
    world: World, peer: Peer, message: str, only: tuple[str, ...] | None = None
) -> None:
    """Each command (or those named in `only`) fails with `message` and exit code 1,
    changing nothing."""
    downloads = snapshot(peer.download_dir)
    for name, args in commands(world).items():
        if only is not None and name not in only:
            continue
        result = peer.run(*args, timeout=30)
        assert one_line_error(result) == message, name
        assert result.returncode == 1, name
    assert snapshot(peer.download_dir) == downloads
    shares = peer.run("list", "--json").check().json()
    assert world.source.name not in [share["name"] for share in shares]


def logs_in_and_works(world: World, peer: Peer) -> None:
    """Logging in again gives a working session (the lookup of `get` needs it), and the
    broker and alice still answer."""
    peer.run("login", "--password-stdin", input=peer.password + "\n").check()
    got = peer.run("get", world.public_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == world.public
    assert world.alice.server is not None and world.alice.server.alive()


def expire_session(cluster: Cluster, peer: Peer) -> None:
    """Move the broker's clock past `peer`'s session, as far as that session goes."""
    token = json.loads(session_file(peer).read_text())["token"]
    db = sqlite3.connect(cluster.root / "broker" / "broker.db", timeout=10)
    try:
        with db:
            changed = db.execute(
                "UPDATE sessions SET expires_at = ? WHERE token_hash = ?",
                (int(time.time()) - 1, crypto.token_digest(token)),
            ).rowcount
    finally:
        db.close()
    assert changed == 1


def test_an_expired_session_is_refused(world: World) -> None:
    """Stopped by: `expires_at > now` in the broker's session lookup."""
    expire_session(world.cluster, world.bob)
    assert_all_refused(world, world.bob, GONE)
    logs_in_and_works(world, world.bob)


def test_a_forged_token_is_refused(world: World) -> None:
    """A random token of the right form. Stopped by: the broker knows only the hashes
    of the tokens it issued."""
    bob = world.bob
    write_session(bob, "bob", crypto.new_token())
    assert_all_refused(world, bob, GONE)
    logs_in_and_works(world, bob)


def test_a_logged_out_token_is_refused(world: World) -> None:
    """The session file saved before `logout` and put back. Stopped by: logout deletes
    the session at the broker."""
    bob = world.bob
    saved = session_file(bob).read_bytes()
    bob.run("logout").check()
    assert not session_file(bob).exists()
    write_private_file(session_file(bob), saved)
    assert_all_refused(world, bob, GONE)
    logs_in_and_works(world, bob)


def test_a_token_stolen_from_another_device_is_refused(world: World) -> None:
    """carol puts bob's live token in her session file. Stopped by: a session only
    works from the transport key it was issued to."""
    bob, carol = world.bob, world.carol
    token = json.loads(session_file(bob).read_text())["token"]
    write_session(carol, "carol", token)
    assert_all_refused(world, carol, GONE, only=("search", "get", "share"))
    bob.run("search").check()  # bob's own session is untouched
    logs_in_and_works(world, carol)


def test_without_a_session_file_commands_say_log_in(world: World) -> None:
    """`logout` with a dead token still ends the local session; then every command
    says so without asking the broker."""
    bob = world.bob
    write_session(bob, "bob", crypto.new_token())
    result = bob.run("logout")
    assert result.returncode == 0, result
    assert not session_file(bob).exists()
    assert_all_refused(
        world, bob, "error: bob is not logged in; run `sfs-peer login`", only=("search", "get")
    )
    logs_in_and_works(world, bob)


def test_unshare_without_a_session_stops_serving_and_says_the_broker_still_lists_it(
    world: World,
) -> None:
    """Serving stops at once (the holder is where access is enforced); the broker's
    listing needs a session, and the message says so. Once logged in, unshare again."""
    bob = world.bob
    file_id = bob.share(world.source)
    write_session(bob, "bob", crypto.new_token())

    result = bob.run("unshare", file_id)
    assert one_line_error(result) == (
        f"error: stopped serving {file_id}, but the broker still lists it: "
        + GONE.removeprefix("error: ")
    )
    assert result.returncode == 1
    assert file_id not in [share["file_id"] for share in bob.run("list", "--json").check().json()]

    bob.run("login", "--password-stdin", input=bob.password + "\n").check()
    found = bob.run("search", "--json").check().json()["hits"]
    assert file_id in {hit["file_id"] for hit in found}
    bob.run("unshare", file_id).check()
    found = bob.run("search", "--json").check().json()["hits"]
    assert file_id not in {hit["file_id"] for hit in found}


@pytest.mark.parametrize("damage", ["not json", "no token", "another user", "readable"])
def test_a_damaged_session_file_is_reported(world: World, damage: str) -> None:
    bob = world.bob
    path = session_file(bob)
    expected = {
        "not json": f"error: the session file {path} is corrupt; run `sfs-peer login`",
        "no token": f"error: the session file {path} is corrupt; run `sfs-peer login`",
        "another user": "error: the saved session is for carol; run `sfs-peer login`",
        "readable": (
            f"error: the session file {path} is accessible by other users (mode 644); "
            f"run: chmod 600 {path}"
        ),
    }[damage]
    saved = path.read_bytes()
    if damage == "not json":
        write_private_file(path, b"{not json")
    elif damage == "no token":
        write_private_file(path, json.dumps({"username": "bob", "expires_at": 1}).encode())
    elif damage == "another user":
        write_session(bob, "carol", crypto.new_token())
    else:
        write_session(bob, "bob", crypto.new_token())
        path.chmod(0o644)
    result: Result = bob.run("search")
    assert one_line_error(result) == expected
    assert result.returncode == 1
    write_private_file(path, saved)  # the session itself is still good


def test_a_session_expires_after_its_ttl() -> None:
    """A real expiry, with a broker whose sessions last 3 s."""
    with Cluster() as cluster:
        cluster.start_broker(session_ttl=3)
        bob = cluster.add_peer("bob")  # registering logs in
        time.sleep(3.2)
        result = bob.run("search")
        assert one_line_error(result) == GONE
        assert result.returncode == 1
        bob.run("login", "--password-stdin", input=bob.password + "\n").check()
        bob.run("search").check()
