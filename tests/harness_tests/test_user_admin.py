"""`sfs-broker user list|disable|enable|delete` against running peers (real processes).

A disabled user is refused and unlisted until enabled, and its `serve` comes back by
itself. A deleted user's name registered again by someone else inherits nothing: the
broker lists none of the old user's files or copies nor the files shared with the old
name, and the holders that pinned the old user (the owner, and a seeder that checks
the owner's signed grant by name) refuse the new keys until their users trust them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Cluster, Peer, one_line_error

pytestmark = pytest.mark.harness


def names(peer: Peer) -> list[str]:
    return sorted(hit["name"] for hit in peer.run("search", "--json").check().json()["hits"])


def admin(cluster: Cluster, *args: str) -> Any:
    return cluster.run("sfs-broker", "user", *args, "--config", str(cluster.broker_config))


def online(cluster: Cluster) -> set[str]:
    return {user["username"] for user in cluster.broker_status()["users"] if user["online"]}


def wait_until(check: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_disable_enable_and_delete_a_user(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob", serve=True)
        carol = cluster.add_peer("carol", serve=True)
        for name in ("public", "forbob", "bobs"):
            (tmp_path / f"{name}.txt").write_text(f"{name}\n" * 1000)
        public = alice.share(tmp_path / "public.txt")
        forbob = alice.share(tmp_path / "forbob.txt", "--to", "bob")
        bob.share(tmp_path / "bobs.txt")
        carol.run("get", public).check()  # carol seeds it, by alice's signed grant
        bob.run("get", forbob).check()  # alice pins bob's key
        assert alice.server is not None
        alice.server.stop()  # so that bob fetches the public file from carol alone
        got = bob.run("get", public, "--json").check().json()  # carol pins bob's key
        assert got["holders"] == ["carol"]
        alice.serve()

        listed = admin(cluster, "list", "--json").check().json()
        assert [(u["username"], u["files"], u["disabled"]) for u in listed] == [
            ("alice", 2, False),
            ("bob", 1, False),
            ("carol", 0, False),
        ]
        assert all(u["online"] and u["created_at"] > 0 for u in listed)
        table = admin(cluster, "list").check().stdout
        assert "disabled" in table and "bob" in table

        # Disabled: sessions ended, logins refused, files unlisted, offline.
        assert "disabled bob" in admin(cluster, "disable", "bob").check().stdout
        assert "no longer knows this session" in one_line_error(bob.run("search"))
        refused = bob.run("login", "--password-stdin", input="bob-password\n")
        assert "disabled" in one_line_error(refused)
        wrong = bob.run("login", "--password-stdin", input="not-the-password\n")
        assert "disabled" not in one_line_error(wrong)  # told only with the password
        assert names(carol) == ["public.txt"]
        assert "bob" not in online(cluster)
        assert bob.server is not None and bob.server.alive()  # it waits, refused
        assert admin(cluster, "list", "--json").check().json()[1]["disabled"] is True

        # Enabled: all of it back, and bob's server online again by itself.
        assert "enabled bob" in admin(cluster, "enable", "bob").check().stdout
        bob.run("login", "--password-stdin", input="bob-password\n").check()
        assert names(carol) == ["bobs.txt", "public.txt"]
        wait_until(lambda: "bob" in online(cluster), "bob's serve did not come back")

        # Deleted: with --yes only, when there is no terminal to ask on.
        assert "--yes" in one_line_error(admin(cluster, "delete", "bob"))
        done = admin(cluster, "delete", "bob", "--yes").check()
        assert "deleted bob (1 shared file)" in done.stdout
        bob.server.popen.wait(30)  # its keys are refused: serve ends, saying so
        assert "does not accept this device's keys" in bob.server.output()
        assert [u["username"] for u in cluster.broker_status()["users"]] == ["alice", "carol"]
        assert names(carol) == ["public.txt"]
        assert "no such user: bob" in one_line_error(admin(cluster, "delete", "bob", "--yes"))
        assert "not a username" in one_line_error(admin(cluster, "disable", "Bob!"))

        # Someone else registers "bob": new keys, a new account.
        config = cluster.write_peer_config("newbob")
        config.write_text(config.read_text().replace("username: newbob", "username: bob"))
        new_bob = Peer(cluster, "newbob", config, "new-bob-password")
        new_bob.run("init").check()
        new_bob.run("register", "--password-stdin", input="new-bob-password\n").check()
        assert names(new_bob) == ["public.txt"]  # not what alice shared with the old bob
        refused = new_bob.run("get", forbob)
        assert "no file" in one_line_error(refused)
        lookup_refused = new_bob.run("get", public)  # alice and carol pinned the old bob
        assert lookup_refused.returncode != 0
        assert "pinned" in lookup_refused.stderr
        assert not (new_bob.download_dir / "public.txt").exists()

        # The owner checks the new key with its person and trusts it; the seeder,
        # which was not told, still refuses.
        fingerprint = new_bob.run("whoami", "--json").check().json()["fingerprint"]
        alice.run("trust", "bob", fingerprint, "--replace").check()
        got = new_bob.run("get", public, "--json").check().json()
        assert got["holders"] == ["alice"]
        assert (new_bob.download_dir / "public.txt").read_text() == "public\n" * 1000
