"""Options and arguments of type `str`, `Path` and flags are coerced by common/cli.py
without typer's pydantic adapters (start-up time): the same values as typer's, and a
clear error for a flag's environment variable that is not a boolean."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest
import typer

from sfs.common.cli import command, new_app


def parsed(args: list[str], monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = new_app("test")
    seen: dict[str, Any] = {}

    @app.command()
    @command
    def run(
        name: Annotated[str, typer.Argument()],
        paths: Annotated[list[Path], typer.Argument()],
        out: Annotated[Path | None, typer.Option("--out")] = None,
        word: Annotated[list[str] | None, typer.Option("--word")] = None,
        debug: Annotated[bool, typer.Option("--debug", envvar="SFS_TEST_FLAG")] = False,
    ) -> None:
        seen.update(name=name, paths=paths, out=out, word=word, debug=debug)

    @app.command()
    def other() -> None:  # two commands, so that `run` is a subcommand as in sfs-peer
        pass

    app(args, standalone_mode=False)
    return seen


def test_text_paths_lists_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = parsed(
        ["run", "é x", "a", "b/c", "--out", "d", "--word", "w1", "--word", "w2"], monkeypatch
    )
    assert seen == {
        "name": "é x",
        "paths": [Path("a"), Path("b/c")],
        "out": Path("d"),
        "word": ["w1", "w2"],
        "debug": False,
    }
    assert all(type(p) is type(Path("a")) for p in seen["paths"])


def test_absent_optional_values(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = parsed(["run", "n", "a", "--debug"], monkeypatch)
    assert (seen["out"], seen["word"], seen["debug"]) == (None, None, True)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("0", False)])
def test_a_flag_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    assert parsed(["run", "n", "a"], monkeypatch, SFS_TEST_FLAG=value)["debug"] is expected


def test_a_flag_variable_that_is_not_a_boolean_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(typer.BadParameter, match="'maybe' is not a valid boolean"):
        parsed(["run", "n", "a"], monkeypatch, SFS_TEST_FLAG="maybe")
