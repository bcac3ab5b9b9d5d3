"""Tables as a person reads them: laid out for the terminal's width, or one record per
line when the output goes to a pipe or a file.

On a terminal, fixed columns (ids, sizes, dates) are never cut; free text (names, paths)
takes the room that is left and wraps at spaces (at punctuation only inside a run
wider than a line), never inside a word unless one word is wider than the whole
column; columns that do not fit are left out, least useful first (`--wide` keeps them
all). Piped, every record is one line of
tab-separated fields, never wrapped, so `grep`, `cut` and `tee` work.

Every cell is made printable first: a name chosen by someone else cannot move the cursor,
nor start a new line or a new field (tabs and newlines become U+FFFD).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len, chop_cells
from rich.text import Text

from sfs.common.cli import printable
from sfs.common.identity import format_fingerprint

SHORT_ID = 8  # git's default: unique prefixes of at least this many characters
GAP = "  "
MIN_WRAP = 12  # free text is not squeezed below this (or its `least`)
_WORDS = re.compile(r"\S+\s*|\s+")
_PIECES = re.compile(r"[^\s\-_./,]*(?:[\-_./,]+|\s+|$)")


@dataclass(frozen=True)
class Column:
    header: str
    keep: int = 0  # 0: always shown; the highest is left out first on a narrow terminal
    wraps: bool = False  # free text: may wrap; otherwise never cut
    right: bool = False
    least: int = MIN_WRAP  # free text: columns are left out before this one gets narrower
    # Where the column appears: a terminal shows `photos/` and a count only for folders,
    # while a pipe gets the exact name and a field for each fact.
    on_terminal: bool = True
    in_pipe: bool = True


def size_text(size: int) -> str:
    """Binary units everywhere (the bars too): `1.5 MiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def short_ids(ids: Sequence[str], minimum: int = SHORT_ID) -> dict[str, str]:
    """Each id -> its shortest prefix of at least `minimum` characters that no other id
    in `ids` starts with (git's rule, among the ids shown)."""
    ordered = sorted(set(ids))
    shortest: dict[str, str] = {}
    for i, current in enumerate(ordered):
        length = minimum
        for neighbour in ordered[max(0, i - 1) : i] + ordered[i + 1 : i + 2]:
            common = 0
            while common < min(len(current), len(neighbour)) and (
                current[common] == neighbour[common]
            ):
                common += 1
            length = max(length, common + 1)
        shortest[current] = current[:length]
    return shortest


def short_fingerprint(fingerprint: bytes) -> str:
    """The first four groups (80 bits), enough to tell pins apart at a glance; comparing
    keys is what `verify`'s safety code is for."""
    return "-".join(format_fingerprint(fingerprint).split("-")[:4]) + "…"


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` cells, broken after spaces; a run without
    spaces wider than a line is broken after its punctuation, and a piece of it still
    wider than `width` is the only thing ever cut."""
    lines: list[str] = []
    line = ""

    def end_line() -> None:
        nonlocal line
        if line.strip():
            lines.append(line.rstrip())
        line = ""

    for word in _WORDS.findall(text):
        if cell_len((line + word).rstrip()) <= width:
            line += word
            continue
        if cell_len(word.rstrip()) <= width:  # fits a line of its own: never broken
            end_line()
            line = word.lstrip()
            continue
        for piece in (p for p in _PIECES.findall(word) if p):
            if cell_len((line + piece).rstrip()) > width:
                end_line()
                line = piece
            else:
                line += piece
            while cell_len(line.rstrip()) > width:
                head, *_ = chop_cells(line, width)
                lines.append(head)
                line = line[len(head) :]
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


def _only(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], keep: list[bool]
) -> tuple[list[Column], list[list[str]]]:
    return [c for c, k in zip(columns, keep, strict=True) if k], [
        [cell for cell, k in zip(row, keep, strict=True) if k] for row in rows
    ]


def piped(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[str]:
    """A header, then one line per record, fields separated by tabs."""
    columns, cells = _only(columns, rows, [c.in_pipe for c in columns])
    return ["\t".join(c.header for c in columns)] + [
        "\t".join(printable(cell) for cell in row) for row in cells
    ]


def laid_out(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int, wide: bool = False
) -> tuple[list[Text], list[str]]:
    """The table's lines for a terminal `width` cells wide, and the headers of the
    columns left out to fit (none with `wide`)."""
    columns, rows = _only(columns, rows, [c.on_terminal for c in columns])
    cells = [[printable(cell) for cell in row] for row in rows]
    natural = [
        max([cell_len(c.header)] + [cell_len(row[i]) for row in cells])
        for i, c in enumerate(columns)
    ]
    least = [
        min(natural[i], max(c.least, cell_len(c.header))) if c.wraps else natural[i]
        for i, c in enumerate(columns)
    ]
    shown = list(range(len(columns)))

    def needed() -> int:
        return sum(least[i] for i in shown) + len(GAP) * (len(shown) - 1)

    while not wide and needed() > width:
        droppable = [i for i in shown if columns[i].keep > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda i: (columns[i].keep, i)))
    for i in shown:  # still too wide: free text gives up its room, down to MIN_WRAP
        if columns[i].wraps and needed() > width:
            least[i] = max(min(natural[i], MIN_WRAP), least[i] - (needed() - width))
    widths = {i: least[i] for i in shown}
    spare = max(0, width - needed())
    for i in sorted((i for i in shown if columns[i].wraps), key=lambda i: (columns[i].keep, i)):
        extra = min(spare, natural[i] - widths[i])
        widths[i] += extra
        spare -= extra

    placed = [(columns[i], widths[i]) for i in shown]
    lines = [_line([column.header for column, _ in placed], placed)]
    lines[0].stylize("bold")
    for row in cells:
        wrapped = [wrap(row[i], widths[i]) if columns[i].wraps else [row[i]] for i in shown]
        for n in range(max(len(w) for w in wrapped)):
            lines.append(_line([w[n] if n < len(w) else "" for w in wrapped], placed))
    dropped = [c.header for i, c in enumerate(columns) if i not in shown]
    return lines, dropped


def _line(parts: list[str], placed: list[tuple[Column, int]]) -> Text:
    padded = []
    for part, (column, width) in zip(parts, placed, strict=True):
        room = " " * max(0, width - cell_len(part))
        padded.append(room + part if column.right else part + room)
    return Text(GAP.join(padded).rstrip())
