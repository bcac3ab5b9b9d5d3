"""sfs.common.tree_rules: every hostile entry is refused, with one line naming it."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfs.common.errors import IntegrityError
from sfs.common.tree import Entry
from sfs.common.tree_rules import TreeChecker, check_entries, check_totals, fold, order_key
from tests.unit.tree_records import make_header


def f(path: str, size: int = 1) -> Entry:
    return Entry(path=path, kind="file", size=size, mode=0o644, mtime_ns=0)


def d(path: str) -> Entry:
    return Entry(path=path, kind="folder", size=0, mode=0o755, mtime_ns=0)


def ln(path: str, target: str) -> Entry:
    return Entry(path=path, kind="link", size=0, mode=0o777, mtime_ns=0, target=target)


def refused(entries: list[Entry]) -> str:
    with pytest.raises(IntegrityError) as caught:
        check_entries(entries)
    message = str(caught.value)
    assert "\n" not in message
    return message


HOSTILE: list[tuple[str, list[Entry], str]] = [
    ("empty path", [f("")], "entry '': empty path"),
    ("absolute", [f("/etc/passwd")], "entry '/etc/passwd': path absolute"),
    ("dot-dot", [d("a"), f("a/../../x")], "entry 'a/../../x': '..' component"),
    ("bare dot-dot", [f("..")], "entry '..': '..' component"),
    ("dot", [d("a"), f("a/./b")], "entry 'a/./b': '.' component"),
    ("empty component", [d("a"), f("a//b")], "entry 'a//b': empty component"),
    ("trailing slash", [d("a/")], "entry 'a/': empty component"),
    ("NUL", [f("a\0b")], "entry 'a\\x00b': path control character U+0000"),
    ("newline", [f("a\nb")], "entry 'a\\nb': path control character U+000A"),
    ("escape", [f("a\x1b[2Jb")], "entry 'a\\x1b[2Jb': path control character U+001B"),
    ("C1 control", [f("a\x85b")], "entry 'a\\x85b': path control character U+0085"),
    ("backslash", [f("..\\x")], "entry '..\\\\x': path backslash (a separator on Windows)"),
    ("component over 255 bytes", [f("é" * 128)], "a component longer than 255 bytes"),
    ("path over 4,096 bytes", [f("/".join(["a" * 200] * 21))], "path longer than 4,096 bytes"),
    ("not NFC", [f("e\u0301")], "entry 'e\u0301': path not in Unicode NFC form"),
    ("case collision", [f("README"), f("readme")], "entry 'readme': same name as 'README'"),
    (
        "case collision far apart in byte order",
        [d("A"), f("A/x"), f("B"), d("a")],
        "entry 'a': same name as 'A' after case folding",
    ),
    ("fold collision (ß)", [f("STRASSE"), f("straße")], "same name as 'STRASSE'"),
    ("repeated", [f("a"), f("a")], "entry 'a': repeated"),
    ("out of order", [f("b"), f("a")], "entry 'a': out of order"),
    (
        "slash sorts first",
        [d("a"), f("a-b"), f("a/c")],
        "entry 'a/c': out of order",
    ),
    ("file as a folder prefix", [f("a"), f("a/b")], "entry 'a/b': inside 'a', which is a file"),
    ("link as a folder prefix", [ln("a", "b"), f("a/b")], "inside 'a', which is a link"),
    ("missing folder", [f("x/y")], "entry 'x/y': its folder 'x' is not listed before it"),
    ("folder with a size", [Entry("a", "folder", 3, 0o755, 0)], "entry 'a': a folder with a size"),
    ("setuid mode", [Entry("a", "file", 0, 0o4755, 0)], "entry 'a': mode has bits outside 0o777"),
    ("link with a size", [Entry("a", "link", 3, 0o777, 0, "b")], "a link with a size"),
    ("link without target", [Entry("a", "link", 0, 0o777, 0)], "a link without a target"),
    ("file with a target", [Entry("a", "file", 0, 0o644, 0, "b")], "a file with a link target"),
    ("absolute link", [ln("a", "/etc/passwd")], "entry 'a': link target absolute"),
    ("link out of the tree", [d("s"), ln("s/l", "../../x")], "entry 's/l': link target leaves"),
    ("link target NUL", [ln("l", "a\0")], "entry 'l': link target control character U+0000"),
    ("empty link target", [ln("l", "")], "entry 'l': link target empty"),
    (
        "link out through another link",
        [d("a"), ln("a/l", ".."), ln("a/m", "l/..")],
        "entry 'a/m': link target leaves the share through another link",
    ),
    (
        "link out through a case variant of a link",
        [d("a"), ln("a/L", ".."), ln("a/m", "l/..")],
        "entry 'a/m': link target leaves the share through another link",
    ),
    ("link loop", [ln("a", "b"), ln("b", "a")], "link target goes through over 40 links"),
]


@pytest.mark.parametrize(
    ("entries", "message"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_hostile_entries_are_refused_naming_the_entry(entries: list[Entry], message: str) -> None:
    line = refused(entries)
    assert line.startswith("unsafe tree: entry ")
    assert message in line


def test_the_first_bad_entry_is_named() -> None:
    assert "entry '../b'" in refused([f("a"), f("../b"), f("/c")])


def test_long_paths_are_shown_cut() -> None:
    line = refused([f("x" * 5000)])
    assert len(line) < 300
    assert line.endswith("path longer than 4,096 bytes")


def test_a_good_tree_passes_with_its_totals() -> None:
    entries = [
        f("README", 5),
        d("src"),
        d("src/pkg"),
        f("src/pkg/a.py", 7),
        ln("src/pkg/up", "../.."),
        ln("src/pkg/sib", "../../README"),
        f("src/pkg-notes", 2),
        d("empty"),
        f("Ünïcödé", 0),
    ]
    entries.sort(key=lambda e: order_key(e.path))
    totals = check_entries(entries)
    assert (totals.files, totals.folders, totals.links, totals.size) == (4, 3, 2, 14)
    check_totals(make_header(files=4, folders=3, links=2, size=14), totals)
    with pytest.raises(IntegrityError, match="hold 4 files, 3 folders, 2 links, 14 bytes; "):
        check_totals(make_header(files=4, folders=3, links=2, size=15), totals)


def test_a_file_share_holds_one_file_named_as_the_share() -> None:
    totals = check_entries([f("report.pdf", 3)])
    header = make_header(kind="file", name="report.pdf", files=1, size=3)
    check_totals(header, totals)
    with pytest.raises(IntegrityError, match="named as the share"):
        check_totals(dataclasses.replace(header, name="other.pdf"), totals)


def test_links_inside_through_links_pass() -> None:
    check_entries([d("a"), d("a/b"), ln("a/b/l", ".."), ln("a/m", "b/l/../x")])


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=6)


@settings(max_examples=100)
@given(st.lists(st.lists(names, min_size=1, max_size=3).map("/".join), max_size=25))
def test_any_accepted_set_is_sorted_unique_and_collision_free(paths: list[str]) -> None:
    """Whatever the checker accepts has no two paths that fold alike, and each path's
    folder is listed: the properties a writer relies on."""
    with_folders = {"/".join(p.split("/")[:n]) for p in paths for n in range(1, p.count("/") + 2)}
    entries = [d(p) for p in sorted(with_folders, key=order_key)]
    try:
        check_entries(entries)
    except IntegrityError:
        return
    assert len({fold(e.path) for e in entries}) == len(entries)
    listed = {e.path for e in entries}
    for entry in entries:
        parent = entry.path.rpartition("/")[0]
        assert not parent or parent in listed


def test_checker_memory_is_per_open_folder() -> None:
    checker = TreeChecker()
    for i in range(50):
        checker.add(d(f"d{i:02}"))
        checker.add(f(f"d{i:02}/x"))
    # Only the root and the folder being listed are open.
    assert len(checker._stack) == 2
