"""What a person sees: the CLI in a real terminal of 80 columns (tmux, read back with
`capture-pane`), and the same commands piped into `cat`.

The terminal is tests/terminal.py's `Terminal`; without tmux these tests skip, unless
SFS_REQUIRE_TMUX=1 (as in CI) makes that a failure.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

import pytest

from tests.harness import Cluster, Peer
from tests.terminal import COLUMNS, Terminal, require_tmux

pytestmark = pytest.mark.harness

require_tmux()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker()
        running.add_peer("alice", serve=True)
        running.add_peer("bob")
        yield running


@pytest.fixture
def terminal(cluster: Cluster) -> Iterator[Terminal]:
    opened = Terminal(cluster.root)
    try:
        yield opened
    finally:
        opened.close()


def config_of(peer: Peer) -> str:
    return shlex.quote(str(peer.config))


def fits(output: str) -> None:
    """Nothing was wider than the terminal: joined back, every line is 80 or less."""
    wide = [line for line in output.splitlines() if len(line) > COLUMNS]
    assert not wide, "\n".join(wide)


def test_help_fits_80_columns_and_reads_the_same_piped(terminal: Terminal) -> None:
    for command in ("sfs-peer -h", "sfs-peer get -h", "sfs-peer share -h", "sfs-broker -h"):
        shown, code = terminal.run(command)
        assert code == 0
        fits(shown)
        assert shown.lstrip().startswith("Usage: ")
        assert "<bool>" not in shown and "<str>" not in shown
        piped, code = terminal.run(f"{command} | cat")
        assert code == 0
        assert piped.split() == shown.split()  # the same words; a pipe adds no decoration
    shown, _ = terminal.run("sfs-peer get -h")
    assert "seeders" in shown and "resumes" in shown
    assert "\n    sfs-peer get 0f3c9a1e5b7d42c68e0a9b1c2d3e4f50 --out ~/Downloads\n" in shown


def test_ctrl_d_at_the_password_prompt_is_a_clear_exit_2(
    cluster: Cluster, terminal: Terminal
) -> None:
    bob = cluster.peers["bob"]
    marker = terminal.start(f"sfs-peer login -c {config_of(bob)}")
    terminal.wait_for(re.escape(f"password for bob at {cluster.broker_endpoint}: "))
    terminal.key("C-d")
    shown, code = terminal.finish(marker)
    assert code == 2
    assert "error: cancelled at the prompt (end of input); nothing was done" in shown
    assert "internal error" not in shown and "Traceback" not in shown


def test_a_mismatched_password_at_register_is_asked_again(
    cluster: Cluster, terminal: Terminal
) -> None:
    dave = cluster.add_peer("dave", register=False)
    first = re.escape(f"password for dave at {cluster.broker_endpoint}: ")
    again = "password again: "
    marker = terminal.start(f"sfs-peer register -c {config_of(dave)}")
    for prompt, count, typed in (
        (first, 1, "first-try"),
        (again, 1, "second-try"),
        (first, 2, dave.password),
        (again, 2, dave.password),
    ):
        terminal.wait_for(prompt, count)
        terminal.type(typed)
        terminal.key("Enter")
    shown, code = terminal.finish(marker)
    assert code == 0, shown
    assert "the two passwords do not match; try again" in shown
    assert "registered dave and logged in" in shown
    assert "first-try" not in shown and dave.password not in shown  # prompts never echo


def test_already_downloaded_in_a_terminal_and_piped(cluster: Cluster, terminal: Terminal) -> None:
    alice, bob = cluster.peers["alice"], cluster.peers["bob"]
    (cluster.root / "twice.txt").write_text("twice\n")
    file_id = alice.share(cluster.root / "twice.txt")
    shown, code = terminal.run(f"sfs-peer get {file_id} -c {config_of(bob)}")
    assert code == 0 and "saved " in shown
    shown, code = terminal.run(f"sfs-peer get {file_id} -c {config_of(bob)}")
    assert code == 0
    assert f"already downloaded: {bob.download_dir / 'twice.txt'}" in shown
    fits(shown)
    piped, code = terminal.run(f"sfs-peer get {file_id} -c {config_of(bob)} | cat")
    assert code == 0 and f"already downloaded: {bob.download_dir / 'twice.txt'}" in piped


def test_commands_without_private_keys_ask_no_passphrase(
    cluster: Cluster, terminal: Terminal
) -> None:
    erin = cluster.add_peer("erin", init=False)
    erin.run("init", "--passphrase", env={"SFS_PASSPHRASE": "erin's passphrase"}).check()
    for command in ("whoami", "list", "peers"):
        shown, code = terminal.run(f"sfs-peer {command} -c {config_of(erin)}")
        assert "passphrase" not in shown, shown
        assert code == 0, shown
    shown, _ = terminal.run(f"sfs-peer whoami -c {config_of(erin)}")
    assert "username:    erin" in shown
    # What signs does ask, and names whose keys; Ctrl-D there is a clear exit 2 too.
    marker = terminal.start(f"sfs-peer serve -c {config_of(erin)}")
    terminal.wait_for(re.escape(f"passphrase for erin's private keys ({erin.data_dir / 'keys'}): "))
    terminal.key("C-d")
    shown, code = terminal.finish(marker)
    assert code == 2, shown
    assert "error: cancelled at the prompt (end of input); nothing was done" in shown
