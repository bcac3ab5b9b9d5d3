"""sfs.common.tree_index (an index checked page by page, `--include` choices) and
sfs.peer.tree_write (where a folder share lands)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.common.tree_index import Pages, index_of
from sfs.peer.tree_write import build_tree_from, staging_path
from tests.trees import MTIME_NS, crafted_tree

ENTRIES = [
    Entry("a", FOLDER, 0, 0o755, MTIME_NS),
    Entry("a/b", FOLDER, 0, 0o700, MTIME_NS),
    Entry("a/b/one.txt", FILE, 3, 0o644, MTIME_NS),
    Entry("a/two.txt", FILE, 4, 0o600, MTIME_NS),
    Entry("a-b", FILE, 5, 0o755, MTIME_NS),
    Entry("link", LINK, 0, 0o777, MTIME_NS, "a/two.txt"),
]
DATA = b"one" + b"two!" + b"three"


def test_include_chooses_matches_folder_contents_and_the_folders_on_the_way() -> None:
    tree = crafted_tree(ENTRIES, DATA, chunk_size=4).index
    paths = lambda chosen: {tree.entries[n].path for n in chosen}  # noqa: E731
    assert paths(tree.matching(["a/b"])) == {"a", "a/b", "a/b/one.txt"}
    assert paths(tree.matching(["*.txt"])) == {"a", "a/b", "a/b/one.txt", "a/two.txt"}
    assert paths(tree.matching(["a-?"])) == {"a-b"}
    assert tree.matching(["nothing"]) == set()
    # Chunks of 4 bytes: "one" + "t" | "wo!" + "t" | "hree"
    assert tree.chunks_of_entries(tree.matching(["a/two.txt"])) == {0, 1}
    assert tree.chunks_of_entries(tree.matching(["a-b"])) == {1, 2}


def test_a_holders_own_index_still_checks_its_pages() -> None:
    tree = crafted_tree(ENTRIES, DATA)
    assert [e.path for e in index_of(tree.header_bytes, tree.pages, False).entries] == [
        e.path for e in ENTRIES
    ]
    damaged = Pages([tree.pages.entries[0][:-1] + b"\x00"], tree.pages.hashes)
    with pytest.raises(IntegrityError, match="entries page 0 does not match"):
        index_of(tree.header_bytes, damaged, False)


def built(tmp_path: Path, chosen: set[int] | None = None) -> Path:
    tree = crafted_tree(ENTRIES, DATA, name="shared").index
    part = tmp_path / "stream"
    part.write_bytes(DATA)
    fd = os.open(part, os.O_RDONLY)
    try:
        return build_tree_from(fd, tree, tmp_path / "out", "f" * 32, chosen)
    finally:
        os.close(fd)


def test_a_tree_is_built_with_modes_mtimes_and_links(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    root = built(tmp_path)
    assert root == tmp_path / "out" / "shared"
    assert (root / "a" / "b" / "one.txt").read_bytes() == b"one"
    assert (root / "a-b").read_bytes() == b"three"
    assert (root / "a-b").stat().st_mode & 0o777 == 0o755
    assert (root / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert (root / "a" / "two.txt").stat().st_mtime_ns == MTIME_NS
    assert os.readlink(root / "link") == "a/two.txt"
    assert not staging_path(tmp_path / "out", "f" * 32).exists()
    assert built(tmp_path) == tmp_path / "out" / "shared (1)"  # never merged into


def test_a_symlink_planted_at_the_staging_name_is_never_followed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    staging_path(tmp_path / "out", "f" * 32).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="is in the way"):
        built(tmp_path)
    assert list((tmp_path / "elsewhere").iterdir()) == []
