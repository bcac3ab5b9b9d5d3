"""Scenarios with real `sfs-broker` and `sfs-peer` processes, driven through the CLI."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from sfs.common import protocol
from sfs.common.errors import RemoteError
from sfs.peer.client import BrokerClient
from tests.harness import Cluster, command_for, one_line_error

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

    bob_sees = {hit["file_id"] for hit in bob.run("search", "--json").check().json()["hits"]}
    assert {public_id, private_id} <= bob_sees
    by_keyword = bob.run("search", "quarterly", "--json").check().json()["hits"]
    assert [hit["file_id"] for hit in by_keyword] == [public_id]
    carol_sees = {hit["file_id"] for hit in carol.run("search", "--json").check().json()["hits"]}
    assert public_id in carol_sees and private_id not in carol_sees

    for file_id, original in ((public_id, public), (private_id, private)):
        got = bob.run("get", file_id, "--json").check().json()
        saved = Path(got["path"])
        assert saved.parent == bob.download_dir
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


# --- the first hour of a new user (issue 8) --------------------------------------------------


@pytest.mark.parametrize("tool", ["sfs-peer", "sfs-broker"])
def test_short_h_and_version_on_both_tools(cluster: Cluster, tool: str) -> None:
    for args in (["-h"], ["serve", "-h"], ["--help"]):
        shown = cluster.run(tool, *args).check()
        assert shown.stdout.startswith("Usage: ") and shown.stderr == ""
        assert "<bool>" not in shown.stdout and "<str>" not in shown.stdout
    version = cluster.run(tool, "--version").check()
    release = importlib.metadata.version("sfs")
    assert version.stdout == f"{tool} {release} (protocol version {protocol.VERSION})\n"


def test_config_is_shown_required_only_without_sfs_config(cluster: Cluster) -> None:
    env = {key: value for key, value in os.environ.items() if key != "SFS_CONFIG"}
    without = subprocess.run(
        [*command_for("sfs-peer"), "list", "-h"], capture_output=True, text=True, env=env
    )
    assert "required]" in without.stdout  # [env var: SFS_CONFIG; required]
    with_env = cluster.run("sfs-peer", "list", "-h", env={"SFS_CONFIG": "x.yaml"}).check()
    assert "-c, --config FILE" in with_env.stdout
    assert "required" not in with_env.stdout


def test_get_help_tells_about_seeders_resume_and_gives_an_example(cluster: Cluster) -> None:
    shown = cluster.run("sfs-peer", "get", "-h").check().stdout
    assert shown.startswith("Usage: sfs-peer get [OPTIONS] FILE_ID\n")
    assert "seeders" in shown and "resumes" in shown and "--force" in shown
    assert "  sfs-peer get " in shown  # the example, kept on its own lines


def test_search_words_unquoted_must_all_match(cluster: Cluster) -> None:
    alice, bob = cluster.peers["alice"], cluster.peers["bob"]
    (cluster.root / "scan-0042.tif").write_bytes(b"raw scan")
    wanted = alice.share(cluster.root / "scan-0042.tif", "-k", "big", "-k", "raw")
    (cluster.root / "other.tif").write_bytes(b"other")
    alice.share(cluster.root / "other.tif", "-k", "big")
    both = bob.run("search", "big", "raw", "--json").check().json()
    assert [hit["file_id"] for hit in both["hits"]] == [wanted] and not both["partial"]
    none = bob.run("search", "raw", "nothing-like-this", "--json").check().json()
    assert none == {"hits": [], "partial": False}


def test_share_several_files_gives_one_id_each(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    paths = [cluster.root / f"part-{n}.txt" for n in range(3)]
    for n, path in enumerate(paths):
        path.write_text(f"part {n}\n")
    shown = alice.run("share", *map(str, paths)).check().stdout.splitlines()
    assert [line.split(" (")[0] for line in shown[::2]] == [
        f"shared part-{n}.txt" for n in range(3)
    ]
    ids = [line.removeprefix("file id: ") for line in shown[1::2]]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    listed = alice.run("share", *map(str, paths[:2]), "--json").check().json()
    assert [entry["name"] for entry in listed] == ["part-0.txt", "part-1.txt"]
    # A missing file is found before anything is shared.
    before = len(alice.run("list", "--json").check().json())
    refused = alice.run("share", str(paths[0]), str(cluster.root / "missing.txt"))
    assert "no such file" in one_line_error(refused) and refused.returncode == 2
    assert len(alice.run("list", "--json").check().json()) == before


def test_get_of_a_file_already_there_says_so_unless_forced(cluster: Cluster) -> None:
    alice, carol = cluster.peers["alice"], cluster.peers["carol"]
    (cluster.root / "twice.txt").write_text("same content\n")
    file_id = alice.share(cluster.root / "twice.txt")
    first = carol.run("get", file_id).check()
    saved = carol.download_dir / "twice.txt"
    assert first.stdout.startswith(f"saved {saved} ")
    again = carol.run("get", file_id).check()
    assert again.stdout.splitlines()[0] == f"already downloaded: {saved}"
    assert sorted(p.name for p in carol.download_dir.iterdir()) == ["twice.txt"]
    as_json = carol.run("get", file_id, "--json").check().json()
    assert as_json["already_downloaded"] is True and as_json["path"] == str(saved)
    forced = carol.run("get", file_id, "--force", "--json").check().json()
    assert forced["already_downloaded"] is False
    assert Path(forced["path"]).name == "twice (1).txt"
    # Another file under that name is not "already there": a new name, as before.
    saved.write_text("changed locally\n")
    other = carol.run("get", file_id, "--json").check().json()
    assert Path(other["path"]).name == "twice (2).txt"


def test_getting_ones_own_file_is_refused(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    (cluster.root / "mine.txt").write_text("mine\n")
    file_id = alice.share(cluster.root / "mine.txt")
    refused = alice.run("get", file_id)
    assert "is your own file" in one_line_error(refused)
    assert refused.returncode == 2


def test_a_second_serve_for_one_data_folder_is_refused_at_once(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    assert alice.server is not None and alice.server.alive()
    second = alice.run("serve", timeout=30)
    message = one_line_error(second)
    pid = alice.server.popen.pid
    assert message.startswith(
        f"error: another `sfs-peer serve` is running for this data folder (pid {pid})"
    )
    assert second.returncode == 1
    assert alice.server.alive()


def test_a_broker_whose_address_is_taken_says_so_before_listening(cluster: Cluster) -> None:
    second = cluster.run("sfs-broker", "serve", "--config", str(cluster.broker_config), timeout=30)
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"error: cannot listen on {cluster.broker_endpoint}: the address is in use (another"
        " broker, or another program, listens there); stop it or change `bind`"
    ]
    assert "listening" not in second.stderr and "Traceback" not in second.stderr
    assert cluster.broker is not None and cluster.broker.alive()


def test_serve_whose_listen_address_another_program_holds_says_so(cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    listen = re.search(r"^listen: tcp://127\.0\.0\.1:(\d+)$", bob.config.read_text(), re.M)
    assert listen is not None
    with socket.socket() as other_program:
        other_program.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other_program.bind(("127.0.0.1", int(listen[1])))
        other_program.listen()
        refused = bob.run("serve", timeout=30)
    assert one_line_error(refused) == (
        f"error: cannot listen on tcp://127.0.0.1:{listen[1]}: the address is in use by"
        f" another program; change `listen` in {bob.config}"
    )
    assert refused.returncode == 1


def test_register_again_says_already_registered(cluster: Cluster) -> None:
    bob = cluster.peers["bob"]
    again = bob.run("register", "--password-stdin", input=bob.password + "\n")
    assert one_line_error(again) == (
        "error: bob is already registered from this data folder; use `sfs-peer login`"
    )
    # Logged out (no session file), the broker recognises the device's keys.
    bob.run("logout").check()
    again = bob.run("register", "--password-stdin", input="another-password\n")
    assert "bob is already registered from this data folder" in one_line_error(again)
    bob.run("login", "--password-stdin", input=bob.password + "\n").check()


def test_share_with_only_oneself_and_json_names(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    path = cluster.root / "Ärger für Zoë.txt"
    path.write_text("ü\n")
    shown = alice.run("share", str(path), "--to", "alice").check().stdout
    assert shown.splitlines()[0] == (
        "shared Ärger für Zoë.txt (3 B) with nobody else (only you: --to names other users)"
    )
    listed = alice.run("list", "--json").check()
    assert '"name": "Ärger für Zoë.txt"' in listed.stdout  # not \u escapes
    mine = [entry for entry in listed.json() if entry["name"] == "Ärger für Zoë.txt"]
    assert mine and all(entry["owner"] == "alice" for entry in mine)


@pytest.mark.parametrize("tool", ["sfs-peer", "sfs-broker"])
def test_a_bare_tool_shows_its_help_as_it_is(cluster: Cluster, tool: str) -> None:
    bare = cluster.run(tool)
    assert bare.returncode == 2 and bare.stdout == ""
    assert bare.stderr.startswith(f"Usage: {tool} [OPTIONS] COMMAND [ARGS]...\n")
    assert "Commands:\n" in bare.stderr
    assert "error:" not in bare.stderr and "\ufffd" not in bare.stderr
