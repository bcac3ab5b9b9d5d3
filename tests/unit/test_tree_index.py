"""sfs.common.tree_index: an index checked page by page, `--include` choices."""

from __future__ import annotations

import pytest

from sfs.common.errors import IntegrityError
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.common.tree_index import Pages, index_of
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
