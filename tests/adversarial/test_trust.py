"""`sfs-peer trust`, against someone who wants a user to pin the wrong key: a message
("bob has a new key, run `sfs-peer trust bob XXXX`") that replaces a good pin, or pins
a name that does not exist, to be registered later by the attacker.

A pin is only replaced with `--replace` (or a yes on a terminal), after both
fingerprints are shown; a name the broker does not know is only pinned with
`--allow-unknown`; and the key the broker serves is compared with the one given.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sfs.common.identity import format_fingerprint
from sfs.peer.pins import PinStore
from tests.harness import Cluster, Peer, Result, command_for, one_line_error


@dataclass
class World:
    cluster: Cluster
    alice: Peer  # the user being tricked; her pins are cleared before each test
    bob_fp: str  # bob's real fingerprint
    carol_fp: str
    forged_fp: str  # a key nobody has: the attacker's


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice")
        fingerprints = {
            name: cluster.add_peer(name).run("whoami", "--json").check().json()["fingerprint"]
            for name in ("bob", "carol")
        }
        forged = format_fingerprint(os.urandom(32))
        yield World(cluster, alice, fingerprints["bob"], fingerprints["carol"], forged)


@pytest.fixture
def world_(world: World) -> World:
    """The module's world, with no pins at alice's."""
    (world.alice.data_dir / "pins.json").unlink(missing_ok=True)
    return world


def pins_of(peer: Peer) -> dict[str, str]:
    return {
        pin.username: format_fingerprint(pin.fingerprint)
        for pin in PinStore(peer.data_dir / "pins.json").all()
    }


def trust(peer: Peer, *args: str) -> Result:
    """`sfs-peer trust ...` with standard input a pipe at its end: never a terminal."""
    return peer.run("trust", *args, input="")


def test_a_new_pin_for_a_known_user_says_it_matches_the_broker(world_: World) -> None:
    result = trust(world_.alice, "bob", world_.bob_fp).check()
    assert f"bob is now pinned to {world_.bob_fp}" in result.stdout
    assert "the broker serves this same key for bob" in result.stdout
    assert result.stderr == ""
    assert pins_of(world_.alice) == {"bob": world_.bob_fp}


def test_replacing_a_pin_without_replace_is_refused_and_the_old_pin_kept(
    world_: World,
) -> None:
    """The attacker's message asks alice to trust bob at the attacker's key."""
    alice = world_.alice
    trust(alice, "bob", world_.bob_fp).check()
    refused = trust(alice, "bob", world_.forged_fp)
    line = one_line_error(refused)
    assert refused.returncode == 4
    assert world_.bob_fp in line and world_.forged_fp in line
    assert "--replace" in line
    assert pins_of(alice) == {"bob": world_.bob_fp}


def test_with_replace_the_pin_changes_and_both_fingerprints_are_shown(world_: World) -> None:
    alice = world_.alice
    trust(alice, "bob", world_.bob_fp).check()
    replaced = trust(alice, "bob", world_.forged_fp, "--replace").check()
    assert world_.bob_fp in replaced.stdout and world_.forged_fp in replaced.stdout
    assert "replaced" in replaced.stdout
    # The broker serves bob's real key, not this one: said, on stderr.
    assert "warning: the broker serves another key for bob" in replaced.stderr
    assert world_.bob_fp in replaced.stderr
    assert pins_of(alice) == {"bob": world_.forged_fp}
    # And back, as a script would, with --json.
    document = trust(alice, "bob", world_.bob_fp, "--replace", "--json").check().json()
    assert document == {
        "username": "bob",
        "fingerprint": world_.bob_fp,
        "previous": world_.forged_fp,
        "changed": True,
        "broker": "same",
        "broker_fingerprint": world_.bob_fp,
    }
    assert pins_of(alice) == {"bob": world_.bob_fp}


def test_trusting_the_pinned_key_again_changes_nothing(world_: World) -> None:
    alice = world_.alice
    trust(alice, "bob", world_.bob_fp).check()
    again = trust(alice, "bob", world_.bob_fp).check()
    assert f"bob was already pinned to {world_.bob_fp}" in again.stdout
    assert pins_of(alice) == {"bob": world_.bob_fp}


def test_a_new_pin_to_another_key_than_the_brokers_is_warned(world_: World) -> None:
    result = trust(world_.alice, "carol", world_.forged_fp).check()
    assert result.stderr.startswith("warning: the broker serves another key for carol: ")
    assert world_.carol_fp in result.stderr
    assert pins_of(world_.alice) == {"carol": world_.forged_fp}


def test_trusting_a_user_the_broker_does_not_know_is_refused(world_: World) -> None:
    """A pin for a name nobody has registered yet waits for whoever registers it."""
    refused = trust(world_.alice, "nobody", world_.forged_fp)
    assert one_line_error(refused) == (
        "error: the broker does not know the user nobody; check the name, or add"
        " --allow-unknown to pin it anyway"
    )
    assert refused.returncode == 2
    assert pins_of(world_.alice) == {}


def test_allow_unknown_pins_a_name_the_broker_does_not_know(world_: World) -> None:
    result = trust(world_.alice, "nobody", world_.forged_fp, "--allow-unknown").check()
    assert f"nobody is now pinned to {world_.forged_fp}" in result.stdout
    assert "warning: not checked with the broker: it does not know nobody" in result.stderr
    assert pins_of(world_.alice) == {"nobody": world_.forged_fp}


def test_not_logged_in_is_refused_unless_allow_unknown(world_: World) -> None:
    dave = world_.cluster.add_peer("dave")
    dave.run("logout").check()
    refused = trust(dave, "bob", world_.bob_fp)
    line = one_line_error(refused)
    assert "cannot ask the broker whether it knows bob" in line
    assert "sfs-peer login" in line and "--allow-unknown" in line
    assert pins_of(dave) == {}

    pinned = trust(dave, "bob", world_.bob_fp, "--allow-unknown").check()
    assert "warning: not checked with the broker: dave is not logged in" in pinned.stderr
    assert pins_of(dave) == {"bob": world_.bob_fp}


def test_a_bad_fingerprint_or_name_is_one_line(world_: World) -> None:
    for args in (("bob", "not-a-fingerprint"), ("Bob/..", world_.bob_fp)):
        refused = trust(world_.alice, *args)
        one_line_error(refused)
        assert refused.returncode == 2
    assert pins_of(world_.alice) == {}


def run_on_a_terminal(peer: Peer, answer: str, *args: str) -> Result:
    """`sfs-peer trust ARGS` with standard input a terminal, answered with `answer`."""
    argv = [*command_for("sfs-peer"), "trust", *args, "--config", str(peer.config)]
    controller, terminal = os.openpty()
    try:
        with subprocess.Popen(
            argv,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=peer.cluster.root,
            env={**os.environ, "COLUMNS": "200"},
        ) as process:
            os.close(terminal)
            terminal = -1
            os.write(controller, answer.encode() + b"\n")  # waits in the terminal's buffer
            out, err = process.communicate(timeout=120)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return Result(argv, process.returncode, out, err)


def test_on_a_terminal_the_replacement_is_asked_and_no_keeps_the_pin(world_: World) -> None:
    alice = world_.alice
    trust(alice, "bob", world_.bob_fp).check()
    kept = run_on_a_terminal(alice, "n", "bob", world_.forged_fp)
    assert kept.returncode == 4
    assert kept.stdout == ""
    assert "replace the pin of bob?" in kept.stderr
    assert world_.bob_fp in kept.stderr and world_.forged_fp in kept.stderr
    assert pins_of(alice) == {"bob": world_.bob_fp}

    replaced = run_on_a_terminal(alice, "y", "bob", world_.forged_fp)
    assert replaced.returncode == 0, replaced
    assert f"replaced the pin to {world_.bob_fp}" in replaced.stdout
    assert pins_of(alice) == {"bob": world_.forged_fp}
