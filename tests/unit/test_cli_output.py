"""What the CLIs print from other people's text: literal, and safe for a terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from rich.cells import cell_len
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from sfs.common.cli import SafeTable, fail, printable, stdout
from sfs.common.identity import format_fingerprint
from sfs.common.protocol import SearchHit, SearchResult
from sfs.peer import bars, cli_options, output, tables
from sfs.peer import cli as peer_cli
from sfs.peer.pins import Pin
from sfs.peer.registry import Share
from sfs.peer.tables import Column
from tests.unit.tree_records import folder_manifest


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


# --- tables at 80 columns and in pipes (sfs.peer.tables) ----------------------------------


LONG_NAME = "Quarterly report 2026 - final version (approved by the board).pdf"
NO_SPACES = "holiday-photos_2025-08-lake-como-and-the-dolomites-full-resolution.tar.zst"
SEARCH_COLUMNS = [
    Column("file id"),
    Column("name", wraps=True, least=28),
    Column("size", right=True),
    Column("owner", keep=1),
    Column("online", keep=1),
    Column("keywords", keep=3, wraps=True),
    Column("shared", keep=2),
]


def _rows(*names: str) -> list[list[str]]:
    return [
        [f"{i:08x}", name, "1.0 MiB", "alice", "yes", "report, finance", "2026-12-01 00:26"]
        for i, name in enumerate(names)
    ]


def test_short_ids_are_unique_prefixes_of_eight_or_more() -> None:
    ids = ["0123456789" + "a" * 22, "0123456789" + "b" * 22, "f" * 32]
    short = tables.short_ids(ids)
    assert short == {ids[0]: ids[0][:11], ids[1]: ids[1][:11], ids[2]: "f" * 8}
    assert tables.short_ids(["abc"]) == {"abc": "abc"}  # never longer than the id
    many = [f"{n:032x}" for n in range(300)]
    shown = tables.short_ids(many)
    assert len(set(shown.values())) == 300
    assert all(len(s) >= 8 and full.startswith(s) for full, s in shown.items())


def test_short_fingerprint_is_the_first_four_groups() -> None:
    short = tables.short_fingerprint(bytes(32))
    assert short == "AAAA-AAAA-AAAA-AAAA…"


@pytest.mark.parametrize("width", [5, 12, 20, 33])
def test_wrap_breaks_at_spaces_and_punctuation_only(width: int) -> None:
    for text in (LONG_NAME, NO_SPACES):
        lines = tables.wrap(text, width)
        assert all(cell_len(line) <= width for line in lines)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
        if width >= 12:  # every word fits: none is cut
            words = {w for w in re.split(r"[\s\-_./,()]+", text) if w}
            assert words <= {w for line in lines for w in re.split(r"[\s\-_./,()]+", line)}


@pytest.mark.parametrize("width", range(12, 41))
def test_wrap_breaks_inside_a_space_free_run_only_when_it_is_wider_than_a_line(
    width: int,
) -> None:
    """`board).pdf` stays whole: punctuation breaks only what cannot fit a line."""
    lines = tables.wrap(LONG_NAME, width)
    for token in LONG_NAME.split():
        if cell_len(token) <= width:
            assert any(token in line.split() for line in lines), (token, lines)
    assert tables.wrap(NO_SPACES, 40)[0] == "holiday-photos_2025-08-lake-como-and-"


def test_wrap_counts_wide_characters_by_cells() -> None:
    lines = tables.wrap("報告書 二〇二六年 最終版.pdf", 10)
    assert all(cell_len(line) <= 10 for line in lines)


def test_eighty_columns_keep_the_name_whole_and_leave_out_the_least_useful() -> None:
    rows = _rows(LONG_NAME, NO_SPACES)
    lines, dropped = tables.laid_out(SEARCH_COLUMNS, rows, 80)
    text = [line.plain for line in lines]
    assert all(cell_len(line) <= 80 for line in text)
    assert dropped == ["keywords"]  # the least useful, so the name keeps its room
    assert text[0].split() == ["file", "id", "name", "size", "owner", "online", "shared"]
    start = text[0].index("name")
    end = text[0].index("size") + len("size") - len("1.0 MiB") - len(tables.GAP)
    assert end - start >= 28
    for first, name in ((1, LONG_NAME), (1 + len(tables.wrap(LONG_NAME, end - start)), NO_SPACES)):
        assert text[first].startswith(rows[0 if name == LONG_NAME else 1][0] + "  ")
        pieces = tables.wrap(name, end - start)
        shown = [line[start:end].rstrip() for line in text[first : first + len(pieces)]]
        assert shown == pieces  # every word whole, in the name column
    assert len(text) == 1 + 3 + 3  # not seventeen lines


def test_a_narrow_terminal_squeezes_the_name_before_cutting_an_id() -> None:
    lines, dropped = tables.laid_out(SEARCH_COLUMNS, _rows(LONG_NAME, NO_SPACES), 40)
    assert dropped == ["owner", "online", "keywords", "shared"]
    assert all(cell_len(line.plain) <= 40 for line in lines)
    assert [line.plain[:8] for line in lines if line.plain[:1] == "0"] == ["00000000", "00000001"]


def test_wide_keeps_every_column() -> None:
    lines, dropped = tables.laid_out(SEARCH_COLUMNS, _rows("notes.txt"), 80, wide=True)
    assert dropped == []
    assert "report, finance" in lines[1].plain and "2026-12-01 00:26" in lines[1].plain


def test_a_wide_terminal_shows_everything_on_one_line() -> None:
    lines, dropped = tables.laid_out(SEARCH_COLUMNS, _rows(LONG_NAME), 200)
    assert dropped == [] and len(lines) == 2 and LONG_NAME in lines[1].plain


def test_piped_is_one_line_per_record_with_nothing_cut() -> None:
    hostile = "evil\tname\nwith a newline\x1b[2J"
    records = tables.piped(SEARCH_COLUMNS, _rows(LONG_NAME, NO_SPACES, hostile))
    assert len(records) == 4
    assert records[0] == "file id\tname\tsize\towner\tonline\tkeywords\tshared"
    assert records[1].split("\t")[1] == LONG_NAME
    assert all(len(r.split("\t")) == 7 for r in records)  # a tab in a name is no field
    assert "\x1b" not in records[3] and "\n" not in records[3]


# --- the CLI's tables, as `sfs-peer` prints them ---------------------------------------------


class _FakePeer:
    """Just enough of `Peer` for the commands that only print."""

    def __init__(self, hits: list[SearchHit], pins: list[Pin]) -> None:
        self.hits, self.pins = hits, pins
        self.partial = False
        self.config = type("Config", (), {"username": "bob"})()

    def __enter__(self) -> _FakePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def find(self, query: str, owner: str | None) -> SearchResult:
        return SearchResult(self.hits, self.partial)

    def peers(self) -> list[Pin]:
        return self.pins


FOLDER = "projet été"
FOLDER_HIT = SearchHit(
    "ef" * 16, FOLDER, 250 << 20, "bob", [], 1_790_000_000, False, "folder", 1234
)


@pytest.fixture
def fake_peer(monkeypatch: pytest.MonkeyPatch) -> _FakePeer:
    hits = [
        SearchHit(f"{n:02x}" * 16, name, 3 << 20, "alice", ["report"], 1_790_000_000, True)
        for n, name in ((0xAB, LONG_NAME), (0xCD, NO_SPACES))
    ] + [FOLDER_HIT]
    pins = [
        Pin("alice", bytes(32), "first use", 1_790_000_000),
        Pin("carol", b"\xff" * 32, "trusted by hand", 1_790_000_000, verified_at=1_790_000_100),
    ]
    fake = _FakePeer(hits, pins)
    monkeypatch.setattr(cli_options, "open_peer", lambda config: fake)
    return fake


def _run(*args: str) -> str:
    result = CliRunner().invoke(peer_cli.app, [*args, "--config", "unused.yaml"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_search_piped_prints_full_ids_one_record_per_line(fake_peer: _FakePeer) -> None:
    lines = _run("search").splitlines()
    assert lines[0] == "file id\tname\tkind\tfiles\tsize\towner\tonline\tkeywords\tshared"
    assert lines[1].split("\t")[:5] == ["ab" * 16, LONG_NAME, "file", "1", "3.0 MiB"]
    assert lines[2].split("\t")[1] == NO_SPACES
    assert lines[3].split("\t")[:5] == ["ef" * 16, FOLDER, "folder", "1234", "250.0 MiB"]
    assert len(lines) == 4 and all(len(line.split("\t")) == 9 for line in lines)


def test_search_json_says_kind_and_files(fake_peer: _FakePeer) -> None:
    hits = json.loads(_run("search", "--json"))["hits"]
    assert [(h["name"], h["kind"], h["files"]) for h in hits] == [
        (LONG_NAME, "file", 1),
        (NO_SPACES, "file", 1),
        (FOLDER, "folder", 1234),
    ]


def _terminal(monkeypatch: pytest.MonkeyPatch, width: int = 80) -> Console:
    console = Console(
        force_terminal=True, width=width, color_system=None, record=True, highlight=False
    )
    monkeypatch.setattr(output, "stdout", console)
    return console


def _column(header: str, lines: list[str], starts: str) -> str:
    """The cell under `header` (right-aligned to it) on the line that starts so."""
    end = lines[0].index(header) + len(header)
    line = next(line for line in lines if line.startswith(starts))
    return line[:end].split("  ")[-1].strip()


def test_search_at_80_columns_shows_a_folder_by_its_slash_and_file_count(
    monkeypatch: pytest.MonkeyPatch, fake_peer: _FakePeer
) -> None:
    console = _terminal(monkeypatch)
    output.print_found(SearchResult(fake_peer.hits), wide=False, json=False)
    lines = console.export_text().splitlines()
    assert all(cell_len(line) <= 80 for line in lines), lines
    assert lines[0].split() == ["file", "id", "name", "files", "size", "owner", "online"]
    folder = next(line for line in lines if line.startswith("efefefef"))
    assert folder.split()[1:5] == ["projet", "été/", "1,234", "250.0"]
    assert _column("files", lines, "abababab") == ""  # a file share: no count
    assert _column("files", lines, "efefefef") == "1,234"
    assert lines[-1] == "(--wide shows full ids, keywords, shared)"


def test_a_search_without_folders_has_no_files_column(
    monkeypatch: pytest.MonkeyPatch, fake_peer: _FakePeer
) -> None:
    console = _terminal(monkeypatch)
    output.print_found(SearchResult(fake_peer.hits[:2]), wide=False, json=False)
    lines = console.export_text().splitlines()
    assert lines[0].split() == ["file", "id", "name", "size", "owner", "online", "shared"]
    assert not any("/" in line for line in lines)


def _shares() -> list[Share]:
    path = Path("/data")
    return [
        Share("ab" * 16, path / "notes.txt", "notes.txt", 14, b"", b"", None, [], 0),
        Share("ef" * 16, path / FOLDER, FOLDER, 250 << 20, folder_manifest(3, FOLDER), b"",
              ["bob"], ["été"], 0),
    ]  # fmt: skip


def test_list_shows_folders_as_search_does(monkeypatch: pytest.MonkeyPatch) -> None:
    console = _terminal(monkeypatch)
    output.print_shares(_shares(), "alice", [], wide=False, json=False)
    lines = console.export_text().splitlines()
    assert all(cell_len(line) <= 80 for line in lines), lines
    assert lines[0].split()[:5] == ["file", "id", "name", "files", "size"]
    assert lines[2].split()[1:4] == ["projet", "été/", "3"]
    assert _column("files", lines, "abababab") == ""


def test_list_piped_and_json_say_kind_and_files(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output.print_shares(_shares(), "alice", [], wide=False, json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[:5] == ["file id", "name", "kind", "files", "size"]
    assert lines[1].split("\t")[:5] == ["ab" * 16, "notes.txt", "file", "1", "14 B"]
    assert lines[2].split("\t")[:5] == ["ef" * 16, FOLDER, "folder", "3", "250.0 MiB"]
    output.print_shares(_shares(), "alice", [], wide=False, json=True)
    documents = json.loads(capsys.readouterr().out)
    assert [(d["kind"], d["files"]) for d in documents] == [("file", 1), ("folder", 3)]


def test_a_partial_search_says_more_may_match(fake_peer: _FakePeer) -> None:
    assert json.loads(_run("search", "--json"))["partial"] is False
    fake_peer.partial = True
    document = json.loads(_run("search", "--json"))
    assert (len(document["hits"]), document["partial"]) == (3, True)
    result = CliRunner().invoke(peer_cli.app, ["search", "--config", "unused.yaml"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 4  # piped: the records alone
    assert result.stderr == "more may match: add a word\n"


def test_peers_json_and_pipe_say_which_pins_are_verified(fake_peer: _FakePeer) -> None:
    documents = json.loads(_run("peers", "--json"))
    assert [(d["username"], d["verified"]) for d in documents] == [
        ("alice", False),
        ("carol", True),
    ]
    lines = _run("peers").splitlines()
    assert lines[0] == "user\tfingerprint\tverified\tpinned\tsince"
    assert lines[1].split("\t")[:3] == ["alice", format_fingerprint(bytes(32)), "no"]
    assert lines[2].split("\t")[2] == "yes"


def test_long_lines_are_not_wrapped_when_piped(fake_peer: _FakePeer) -> None:
    """Piped, a message longer than 80 columns stays one line (rich would wrap it)."""
    with stdout.capture() as captured:
        stdout.print("x " * 100)
    assert captured.get() == "x " * 100 + "\n"


# --- the progress bar (sfs.peer.bars) ----------------------------------------------------


def _render(progress: Progress) -> str:
    console = Console(width=100, force_terminal=True, color_system=None, record=True)
    console.print(progress.make_tasks_table(progress.tasks))
    return console.export_text()


def test_the_bar_shows_its_label_literally_in_binary_units() -> None:
    clock = [100.0]
    progress = bars.new_progress(Console(force_terminal=True), lambda: clock[0])
    bar = bars.Bar(progress, "from [bold]2[/bold] holders", lambda: clock[0])
    bar(3 << 20, 8 << 20)
    shown = _render(progress)
    assert "[progress.description]" not in shown
    assert "from [bold]2[/bold] holders" in shown
    assert "3.0 MiB / 8.0 MiB" in shown
    assert " MB" not in shown


def test_a_folder_bar_shows_the_files_whole_beside_the_bytes() -> None:
    progress = bars.new_progress(Console(force_terminal=True))
    bar = bars.Bar(progress, "from alice")
    bar(3 << 20, 8 << 20, (1200, 20000))
    shown = _render(progress)
    assert "3.0 MiB / 8.0 MiB" in shown and "1,200 / 20,000 files" in shown
    bar(4 << 20, 8 << 20, (0, 1))  # a single file: no file count
    assert "files" not in _render(progress)


def test_before_the_size_is_known_nothing_like_question_marks() -> None:
    progress = bars.new_progress(Console(force_terminal=True))
    bars.Bar(progress, "connecting to the holders")
    shown = _render(progress)
    assert "connecting to the holders" in shown and "?" not in shown


def test_a_stalled_download_says_who_it_waits_for_and_how_long() -> None:
    clock = [100.0]
    progress = bars.new_progress(Console(force_terminal=True), lambda: clock[0])
    bar = bars.Bar(progress, "from 2 holders", lambda: clock[0])
    bar.waiting_for("waiting for 2 holders")
    bar(1 << 20, 8 << 20)
    clock[0] += bars.STALLED_AFTER - 1
    assert "waiting" not in _render(progress)
    clock[0] = 100.0 + 12
    assert "waiting for 2 holders (12 s without data)" in _render(progress)
    bar(2 << 20, 8 << 20)  # data again
    assert "waiting" not in _render(progress)


@pytest.mark.parametrize(
    ("holders", "text"),
    [
        (["alice"], "alice"),
        (["alice", "bob"], "alice, bob"),
        (["a", "b", "c"], "a, b, c"),
        (["a", "b", "c", "d", "e"], "a, b, c and 2 more"),
    ],
)
def test_the_bar_names_the_holders(holders: list[str], text: str) -> None:
    assert bars.holders_text(holders) == text
