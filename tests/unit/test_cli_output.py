"""What the CLIs print from other people's text: literal, and safe for a terminal."""

from __future__ import annotations

import pytest
import typer
from rich.console import Console

from sfs.common.cli import SafeTable, fail, printable


@pytest.mark.parametrize(
    "hostile",
    ["\x1b[2J", "name\x1b]0;title\x07", "evil\u202etxt.exe", "a\nb", "a\rb", "\x00", "\x7f"],
)
def test_printable_removes_control_and_format_characters(hostile: str) -> None:
    shown = printable(hostile)
    assert not any(ch in shown for ch in "\x1b\x07\u202e\n\r\x00\x7f")
    assert "\ufffd" in shown


def test_printable_keeps_ordinary_text() -> None:
    assert printable("Ärger [bold]x[/bold] 📄 report.pdf") == "Ärger [bold]x[/bold] 📄 report.pdf"


def test_table_cells_are_literal_and_printable() -> None:
    console = Console(force_terminal=False, width=60, markup=False)
    table = SafeTable("name")
    table.add_row("[red]x[/red]\x1b[31m")
    with console.capture() as captured:
        console.print(table)
    assert "[red]x[/red]\ufffd[31m" in captured.get()
    assert "\x1b" not in captured.get()


def test_fail_prints_one_sanitised_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exited:
        fail("alice: bad \x1b[2J news", 3)
    assert exited.value.exit_code == 3
    assert capsys.readouterr().err == "error: alice: bad \ufffd[2J news\n"
