"""`serve` logs in with the device's own keys (`device_login`), never with the password
session of `login`: it keeps serving across that session's expiry and the user's
`logout`, and stops only when the broker refuses the device's keys.

Each test runs real `sfs-broker` and `sfs-peer` processes; heartbeats come every ~1.7 s
(the harness broker's presence ttl is 5 s).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import Cluster, Peer

REFUSED = (
    "error: the broker does not accept this device's keys for {name} (is this user "
    "registered from this data folder?); run `sfs-peer register`"
)


@dataclass
class World:
    cluster: Cluster
    bob: Peer


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        yield World(cluster, cluster.add_peer("bob"))


def broker_db(cluster: Cluster, statement: str, *values: object) -> int:
    db = sqlite3.connect(cluster.root / "broker" / "broker.db", timeout=10)
    try:
        with db:
            return db.execute(statement, values).rowcount
    finally:
        db.close()


def serving_a_file(world: World, name: str) -> tuple[Peer, str, bytes]:
    owner = world.cluster.add_peer(name, serve=True)
    content = os.urandom(200_000)
    source = world.cluster.root / f"{name}.bin"
    source.write_bytes(content)
    return owner, owner.share(source), content


def fetches(world: World, file_id: str, content: bytes) -> None:
    got = world.bob.run("get", file_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == content


def a_few_heartbeats() -> None:
    time.sleep(4)


def test_serve_keeps_serving_after_the_user_logs_out(world: World) -> None:
    erin, file_id, content = serving_a_file(world, "erin")
    erin.run("logout").check()
    assert not (erin.data_dir / "session.json").exists()
    a_few_heartbeats()
    fetches(world, file_id, content)
    assert erin.server is not None and erin.server.alive()
    assert " ERROR " not in erin.server.output() and "WARNING" not in erin.server.output()


def test_serve_remakes_its_session_when_it_expires(world: World) -> None:
    """Every session of the user is expired at the broker, the server's included: its
    next heartbeat is refused, and it logs in again with the device's keys."""
    fay, file_id, content = serving_a_file(world, "fay")
    changed = broker_db(
        world.cluster,
        "UPDATE sessions SET expires_at = ? WHERE user_id = "
        "(SELECT id FROM users WHERE username = 'fay')",
        int(time.time()) - 1,
    )
    assert changed >= 2  # the interactive session and the server's
    a_few_heartbeats()
    assert fay.server is not None and fay.server.alive()
    fetches(world, file_id, content)
    assert fay.server.output().count("heartbeat refused") == 0


def test_serve_needs_no_login_at_all(world: World) -> None:
    gus, file_id, content = serving_a_file(world, "gus")
    gus.stop()
    gus.run("logout").check()
    gus.serve()  # no session file: the device's keys are enough
    fetches(world, file_id, content)


def test_serve_stops_when_the_broker_refuses_the_devices_keys(world: World) -> None:
    """The account's transport key is replaced at the broker (as an administrator who
    re-keys it would): the running server's heartbeat is refused, its device login too,
    and it stops with one line that says what to do."""
    hal, _, _ = serving_a_file(world, "hal")
    assert hal.server is not None
    changed = broker_db(
        world.cluster,
        "UPDATE users SET curve_public = ? WHERE username = 'hal'",
        os.urandom(32),
    )
    assert changed == 1
    broker_db(
        world.cluster,
        "DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE username = 'hal')",
    )
    assert hal.server.popen.wait(30) == 1
    log = hal.server.output()
    assert log.strip().splitlines()[-1] == REFUSED.format(name="hal")
    assert "Traceback" not in log


def test_serve_of_an_unregistered_device_is_refused_at_once(world: World) -> None:
    ida = world.cluster.add_peer("ida", register=False)
    result = ida.run("serve")
    assert result.returncode == 1
    assert result.stderr.strip() == REFUSED.format(name="ida")
