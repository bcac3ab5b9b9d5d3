"""Scenarios with real `sfs-broker` and `sfs-peer` processes, driven through the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from sfs.common import protocol
from sfs.common.errors import RemoteError
from sfs.peer.client import BrokerClient
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


def test_share_search_get_round_trip(cluster: Cluster) -> None:
    alice, bob, carol = (cluster.peers[n] for n in ("alice", "bob", "carol"))
    public = cluster.root / "report.pdf"
    public.write_bytes(os.urandom(2_500_000))
    private = cluster.root / "salaries.csv"
    private.write_text("name,salary\nbob,1\n")

    public_id = (
        alice.run("share", str(public), "-k", "Quarterly", "--json").check().json()["file_id"]
    )
    private_id = alice.share(private, "--to", "bob")

    bob_sees = {hit["file_id"] for hit in bob.run("search", "--json").check().json()}
    assert {public_id, private_id} <= bob_sees
    by_keyword = bob.run("search", "quarterly", "--json").check().json()
    assert [hit["file_id"] for hit in by_keyword] == [public_id]
    carol_sees = {hit["file_id"] for hit in carol.run("search", "--json").check().json()}
    assert public_id in carol_sees and private_id not in carol_sees

    for file_id, original in ((public_id, public), (private_id, private)):
        got = bob.run("get", file_id, "--json").check().json()
        saved = Path(got["path"])
        assert saved.parent == bob.download_dir
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == got["sha256"]
        assert saved.read_bytes() == original.read_bytes()

    refused = carol.run("get", private_id)
    assert "is shared with you" in one_line_error(refused)
    assert not carol.download_dir.exists() or list(carol.download_dir.iterdir()) == []


def test_owner_offline_exit_code_and_message(cluster: Cluster) -> None:
    dave = cluster.add_peer("dave")  # registered, never serves
    (cluster.root / "dave.txt").write_text("hi")
    file_id = dave.share(cluster.root / "dave.txt")
    result = cluster.peers["bob"].run("get", file_id)
    assert "dave is offline" in one_line_error(result)
    assert result.returncode == 6


def test_wrong_password_and_unknown_id(cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    wrong = bob.run("login", "--password-stdin", input="wrong\n")
    assert "wrong username or password" in one_line_error(wrong)
    bob.run("login", "--password-stdin", input=bob.password + "\n").check()
    unknown = bob.run("get", "f" * 32)
    assert "is shared with you" in one_line_error(unknown)
    not_an_id = bob.run("get", "../../etc/passwd")
    assert "not a file id" in one_line_error(not_an_id)


def test_password_over_72_bytes_is_refused_clearly(cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    result = bob.run("login", "--password-stdin", input="x" * 73 + "\n")
    assert "72 bytes" in one_line_error(result)


def test_bad_config_names_the_key(cluster: Cluster) -> None:
    config = cluster.root / "broken.yaml"
    config.write_text(cluster.peers["bob"].config.read_text() + "colour: blue\n")
    result = cluster.run("sfs-peer", "whoami", "--config", str(config))
    assert "colour: unknown key" in one_line_error(result)
    assert result.returncode == 2
    missing = cluster.run("sfs-peer", "whoami", "--config", str(cluster.root / "nope.yaml"))
    assert "does not exist" in one_line_error(missing)


def test_whoami_and_status(cluster: Cluster) -> None:
    me = cluster.peers["bob"].run("whoami", "--json").check().json()
    assert me["username"] == "bob" and me["logged_in"] is True
    assert len(me["fingerprint"].replace("-", "")) == 52
    status = cluster.broker_status()
    names = {user["username"] for user in status["users"]}
    assert {"alice", "bob", "carol"} <= names
    assert [peer["username"] for peer in status["online"]] == ["alice"]
    assert status["files"] >= 1


def test_garbage_to_the_broker_process_then_cli_still_works(cluster: Cluster) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.linger = 0
        sock.connect(cluster.broker_endpoint)  # no CurveZMQ: must get nothing at all
        sock.send(b"\x00garbage")
        assert not sock.poll(500)
    finally:
        sock.close(linger=0)
        context.term()
    with BrokerClient(cluster.broker_endpoint, cluster.broker_public_key(), timeout=5) as client:
        for op in ("lookup", "nonsense"):  # a body that does not fit, an unknown operation
            with pytest.raises(RemoteError) as refused:
                client.call(op, protocol.Ping(), protocol.PingResult)
            assert refused.value.code == "bad_request"
        assert client.ping().version == protocol.VERSION
    assert cluster.broker is not None and cluster.broker.alive()
    cluster.peers["bob"].run("search", "--json").check()


def test_sigterm_stops_serve_cleanly_and_goes_offline(cluster: Cluster) -> None:
    erin = cluster.add_peer("erin", serve=True)
    assert "erin" in [p["username"] for p in cluster.broker_status()["online"]]
    assert erin.server is not None
    assert erin.server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in erin.server.output()
    assert "erin" not in [p["username"] for p in cluster.broker_status()["online"]]


def test_demo_runs_from_a_clean_state() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo finished" in done.stdout
    assert "matches the original" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_stops_cleanly_on_signal(sig: int) -> None:
    with Cluster() as own:
        broker = own.start_broker()
        assert broker.stop(sig) == 0
        log = broker.output()
        assert "stopped" in log
        assert "Traceback" not in log


@pytest.mark.parametrize(
    "args",
    [["whoami"], ["no-such-command"], ["get", "--config", "x.yaml"], ["share", "--nope"]],
)
def test_usage_errors_are_one_line(cluster: Cluster, args: list[str]) -> None:
    result = cluster.run("sfs-peer", *args)
    one_line_error(result)
    assert result.returncode == 2
