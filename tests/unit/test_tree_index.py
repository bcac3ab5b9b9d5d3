"""sfs.common.tree_index (an index checked page by page, `--include` choices) and
sfs.peer.tree_write (where a folder share lands)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.common.tree_index import Pages, index_of
from sfs.peer import tree_write
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


def build(tmp_path: Path, entries: list[Entry], data: bytes) -> Path:
    tree = crafted_tree(entries, data, name="shared").index
    (tmp_path / "stream").write_bytes(data)
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "stream", os.O_RDONLY)
    try:
        return build_tree_from(fd, tree, tmp_path / "out", "f" * 32)
    finally:
        os.close(fd)


def test_every_entry_gets_its_mode_and_mtime_even_in_a_read_only_folder(tmp_path: Path) -> None:
    entries = [
        Entry("locked", FOLDER, 0, 0o500, MTIME_NS + 1),
        Entry("locked/inner", FOLDER, 0, 0o555, MTIME_NS + 2),
        Entry("locked/inner/none", FILE, 2, 0o000, MTIME_NS + 3),
        Entry("locked/link", LINK, 0, 0o777, MTIME_NS + 4, "inner/none"),
        Entry("locked/ro", FILE, 3, 0o444, MTIME_NS + 5),
        Entry("run", FILE, 1, 0o751, MTIME_NS + 6),
    ]
    root = build(tmp_path, entries, b"nnrrrx")
    try:
        for entry in entries:
            info = (root / entry.path).lstat()
            assert info.st_mtime_ns == entry.mtime_ns, entry.path
            if entry.kind != LINK:
                assert info.st_mode & 0o7777 == entry.mode, entry.path
        assert (root / "run").read_bytes() == b"x"
    finally:
        for folder in ("locked", "locked/inner"):
            (root / folder).chmod(0o700)


def test_a_tree_of_more_folders_than_open_files_allowed_is_built(tmp_path: Path) -> None:
    entries = [Entry(f"d{n:03}", FOLDER, 0, 0o755, MTIME_NS) for n in range(200)]
    entries.insert(1, Entry("d000/deep", FOLDER, 0, 0o755, MTIME_NS))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 50, hard))
    try:
        root = build(tmp_path, entries, b"")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list(root.iterdir())) == 200 and (root / "d000" / "deep").is_dir()


def test_without_syncfs_each_file_and_folder_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(tree_write, "_has_syncfs", lambda: False)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    root = build(tmp_path, ENTRIES, DATA)
    assert (root / "a" / "b" / "one.txt").read_bytes() == b"one"
    made = sum(entry.kind != LINK for entry in ENTRIES)
    assert len(synced) >= made + 2  # every file and folder, the staging folder, its parent


def test_a_build_that_fails_leaves_only_folders_it_can_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [
        Entry("locked", FOLDER, 0, 0o500, MTIME_NS),
        Entry("locked/a", FILE, 2, 0o644, MTIME_NS),
        Entry("z", FILE, 4, 0o644, MTIME_NS),
    ]
    tree = crafted_tree(entries, b"aazzzz", name="shared").index
    (tmp_path / "stream").write_bytes(b"aaz")  # the stream ends inside the last file
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(tree_write.shutil, "rmtree", lambda path: None)  # to look at it
    fd = os.open(tmp_path / "stream", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="the stream ended early"):
            build_tree_from(fd, tree, tmp_path / "out", "f" * 32)
    finally:
        os.close(fd)
    left = staging_path(tmp_path / "out", "f" * 32) / "locked"
    assert left.stat().st_mode & 0o777 == 0o700  # the owner can still remove it all


def test_a_symlink_planted_at_the_staging_name_is_never_followed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    staging_path(tmp_path / "out", "f" * 32).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="is in the way"):
        built(tmp_path)
    assert list((tmp_path / "elsewhere").iterdir()) == []
