"""Prompts and help of the CLIs, without a broker: who a prompt is for, Ctrl-D, a new
secret typed twice, and which commands need no passphrase."""

from __future__ import annotations

import getpass
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sfs.broker.cli import app as broker_app
from sfs.common.config import PeerConfig
from sfs.common.errors import UsageError
from sfs.peer import keys, prompts
from sfs.peer.cli import app as peer_app
from sfs.peer.pins import Pin


def settings(tmp_path: Path) -> PeerConfig:
    return PeerConfig(
        path=tmp_path / "alice.yaml",
        username="alice",
        data_dir=tmp_path / "alice",
        download_dir=tmp_path / "downloads",
        listen="tcp://127.0.0.1:7000",
        advertise="tcp://127.0.0.1:7000",
        broker_endpoint="tcp://broker.example:5555",
        broker_public_key=b"k" * 40,
    )


class Terminal:
    """getpass on a terminal that answers from a script; records the prompts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answers: list[str | None]) -> None:
        self.prompts: list[str] = []
        self._answers: Iterator[str | None] = iter(answers)
        monkeypatch.setattr(getpass, "getpass", self._getpass)
        monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
        monkeypatch.delenv(prompts.PASSPHRASE_ENV, raising=False)

    def _getpass(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        answer = next(self._answers)
        if answer is None:  # Ctrl-D
            raise EOFError
        return answer


def test_password_prompt_says_for_whom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal(monkeypatch, ["secret"])
    assert prompts.password(settings(tmp_path), from_stdin=False) == "secret"
    assert terminal.prompts == ["password for alice at tcp://broker.example:5555: "]


def test_passphrase_prompt_names_the_user_and_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal(monkeypatch, ["pass"])
    assert prompts.passphrase(settings(tmp_path)) == b"pass"
    assert terminal.prompts == [
        f"passphrase for alice's private keys ({tmp_path / 'alice' / 'keys'}): "
    ]


def test_ctrl_d_at_a_prompt_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Terminal(monkeypatch, [None])
    with pytest.raises(UsageError) as refused:
        prompts.password(settings(tmp_path), from_stdin=False)
    assert str(refused.value) == "cancelled at the prompt (end of input); nothing was done"
    assert refused.value.exit_code == 2


def test_a_new_password_that_does_not_match_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = Terminal(monkeypatch, ["one", "two", "three", "three"])
    assert prompts.password(settings(tmp_path), from_stdin=False, confirm=True) == "three"
    assert (
        terminal.prompts
        == [
            "password for alice at tcp://broker.example:5555: ",
            "password again: ",
        ]
        * 2
    )
    assert capsys.readouterr().err == "the two passwords do not match; try again\n"


def test_three_mismatches_give_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal(monkeypatch, ["a", "b", "c", "d", "e", "f"])
    with pytest.raises(UsageError, match=r"the passwords did not match \(3 tries\)"):
        prompts.password(settings(tmp_path), from_stdin=False, confirm=True)
    assert len(terminal.prompts) == 6


def test_new_passphrase_asks_again_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal(monkeypatch, ["p1", "p2", "p3", "p3"])
    assert prompts.new_passphrase(settings(tmp_path)) == b"p3"
    assert terminal.prompts[0].startswith("new passphrase for alice's private keys (")
    assert terminal.prompts[1] == "passphrase again: "


def test_public_keys_are_read_without_the_passphrase(tmp_path: Path) -> None:
    created = keys.create_identity(tmp_path, "alice", passphrase=b"correct horse")

    def must_not_ask() -> bytes:
        raise AssertionError("asked for the passphrase")

    assert keys.load_public_bundle(tmp_path, "alice", must_not_ask) == created.bundle
    # An identity from before public.bundle existed: loaded in full once, which writes it.
    (tmp_path / "keys" / "public.bundle").unlink()
    assert keys.load_public_bundle(tmp_path, "alice", lambda: b"correct horse") == created.bundle
    assert keys.load_public_bundle(tmp_path, "alice", must_not_ask) == created.bundle


def test_a_public_file_that_disagrees_is_rewritten_when_the_keys_load(tmp_path: Path) -> None:
    created = keys.create_identity(tmp_path, "alice")
    other = keys.create_identity(tmp_path / "other", "alice")
    public = tmp_path / "keys" / "public.bundle"
    public.write_bytes((tmp_path / "other" / "keys" / "public.bundle").read_bytes())
    assert keys.load_public_bundle(tmp_path, "alice") == other.bundle  # shown as found
    assert keys.load_identity(tmp_path, "alice").bundle == created.bundle
    assert keys.load_public_bundle(tmp_path, "alice") == created.bundle  # repaired


runner = CliRunner()


@pytest.mark.parametrize("app", [peer_app, broker_app], ids=["sfs-peer", "sfs-broker"])
def test_short_h_and_no_type_names_in_help(app: object) -> None:
    for args in (["-h"], ["init", "-h"], ["status", "-h"] if app is broker_app else ["get", "-h"]):
        shown = runner.invoke(app, args, prog_name="tool")  # type: ignore[arg-type]
        assert shown.exit_code == 0, shown.output
        assert shown.output.startswith("Usage: tool ")
        assert "<bool>" not in shown.output and "<str>" not in shown.output
        assert "<path>" not in shown.output


def test_version(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = runner.invoke(peer_app, ["--version"], prog_name="sfs-peer")
    assert shown.exit_code == 0
    assert shown.output.startswith("sfs-peer ")


@pytest.mark.parametrize("app", [peer_app, broker_app], ids=["sfs-peer", "sfs-broker"])
def test_the_command_list_shows_whole_phrases_at_80_columns(app: object) -> None:
    shown = runner.invoke(app, ["-h"], prog_name="tool", env={"COLUMNS": "80"})  # type: ignore[arg-type]
    commands = shown.output.split("Commands:\n", 1)[1].splitlines()
    assert len(commands) >= 4
    for line in commands:
        assert len(line) <= 80 and not line.endswith("..."), line
        assert line.count("(") == line.count(")"), line  # never cut inside brackets


def test_ctrl_d_at_the_replace_question_cancels_and_keeps_the_pin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ask = prompts.ask_to_replace(b"\x02" * 32)
    pinned = Pin("bob", b"\x01" * 32, "first use", 1_700_000_000)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(UsageError) as refused:
        ask(pinned, None)
    assert str(refused.value) == (
        "cancelled at the prompt (end of input); the pin of bob is unchanged"
    )
    assert "replace the pin of bob?" in capsys.readouterr().err
    for typed, meant in (("y\n", True), ("yes\n", True), ("\n", False), ("n\n", False)):
        monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
        assert ask(pinned, None) is meant
