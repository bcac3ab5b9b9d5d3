"""sfs.peer.tree_staging, staging_walk, open_files and tree_write: a folder share written
straight from its verified chunks into the staging folder, resumed from it, finished and
renamed into place."""

from __future__ import annotations

import fcntl
import os
import resource
from pathlib import Path

import pytest

from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.common.tree_index import TreeIndex
from sfs.peer import tree_staging, tree_write
from sfs.peer.tree_staging import StagingTree
from sfs.peer.tree_write import staging_path
from tests.trees import MTIME_NS, crafted_tree

ENTRIES = [
    Entry("a", FOLDER, 0, 0o755, MTIME_NS),
    Entry("a/b", FOLDER, 0, 0o700, MTIME_NS),
    Entry("a/b/one.txt", FILE, 3, 0o644, MTIME_NS),
    Entry("a/two.txt", FILE, 4, 0o600, MTIME_NS),
    Entry("a-b", FILE, 5, 0o755, MTIME_NS),
    Entry("empty", FILE, 0, 0o640, MTIME_NS),
    Entry("link", LINK, 0, 0o777, MTIME_NS, "a/two.txt"),
]
DATA = b"one" + b"two!" + b"three"
ID = "f" * 32
CHUNK = 4  # never encoded here, so the protocol's MIN_CHUNK_SIZE does not apply


def tree_of(entries: list[Entry], data: bytes, chunk_size: int = CHUNK) -> TreeIndex:
    return crafted_tree(entries, data, name="shared", chunk_size=chunk_size).index


def chunk(tree: TreeIndex, data: bytes, index: int) -> bytes:
    return data[index * tree.chunk_size : (index + 1) * tree.chunk_size]


def download(
    out: Path,
    tree: TreeIndex,
    data: bytes,
    chosen: set[int] | None = None,
    only: set[int] | None = None,
) -> StagingTree:
    """A staging tree with the chunks it wants (or `only` those) written; not finished."""
    staging = StagingTree(out, ID, tree, chosen)
    have = set(staging.resume())
    wanted = tree.chunks_of_entries(chosen) if chosen is not None else range(tree.chunk_count)
    for index in wanted:
        if index not in have and (only is None or index in only):
            staging.write(index, chunk(tree, data, index))
    return staging


def built(out: Path, entries: list[Entry] = ENTRIES, data: bytes = DATA) -> Path:
    return download(out, tree_of(entries, data), data).finish()


def everything(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def test_a_tree_is_built_with_modes_mtimes_and_links(tmp_path: Path) -> None:
    root = built(tmp_path / "out")
    assert root == tmp_path / "out" / "shared"
    assert (root / "a" / "b" / "one.txt").read_bytes() == b"one"
    assert (root / "a-b").read_bytes() == b"three"
    assert (root / "empty").read_bytes() == b""
    assert (root / "empty").stat().st_mode & 0o777 == 0o640
    assert (root / "a-b").stat().st_mode & 0o777 == 0o755
    assert (root / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert (root / "a" / "two.txt").stat().st_mtime_ns == MTIME_NS
    assert os.readlink(root / "link") == "a/two.txt"
    assert everything(root) == {entry.path for entry in ENTRIES}
    # Nothing but the tree: no stream beside it, no staging left.
    assert os.listdir(tmp_path / "out") == ["shared"]
    assert built(tmp_path / "out") == tmp_path / "out" / "shared (1)"  # never merged into


def test_only_the_chosen_entries_are_made(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    chosen = tree.matching(["a/two.txt"])
    root = download(tmp_path, tree, DATA, chosen).finish()
    assert everything(root) == {"a", "a/two.txt"}
    assert (root / "a" / "two.txt").read_bytes() == b"two!"


def test_every_entry_gets_its_mode_and_mtime_even_in_a_read_only_folder(tmp_path: Path) -> None:
    entries = [
        Entry("locked", FOLDER, 0, 0o500, MTIME_NS + 1),
        Entry("locked/inner", FOLDER, 0, 0o555, MTIME_NS + 2),
        Entry("locked/inner/none", FILE, 2, 0o000, MTIME_NS + 3),
        Entry("locked/link", LINK, 0, 0o777, MTIME_NS + 4, "inner/none"),
        Entry("locked/ro", FILE, 3, 0o444, MTIME_NS + 5),
        Entry("run", FILE, 1, 0o751, MTIME_NS + 6),
    ]
    root = built(tmp_path, entries, b"nnrrrx")
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


def test_many_files_and_folders_never_near_the_open_file_limit(tmp_path: Path) -> None:
    entries = [Entry(f"d{n:03}", FOLDER, 0, 0o755, MTIME_NS) for n in range(100)]
    entries.insert(1, Entry("d000/deep", FOLDER, 0, 0o755, MTIME_NS))
    entries += [Entry(f"f{n:04}", FILE, 3, 0o644, MTIME_NS) for n in range(400)]
    data = b"abc" * 400
    tree = tree_of(entries, data, chunk_size=1000)  # a chunk ends hundreds of files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 50, hard))
    try:
        staging = StagingTree(tmp_path, ID, tree)
        for index in (1, 0):  # the second chunk first: a file spans both
            staging.write(index, chunk(tree, data, index))
        root = staging.finish()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list(root.iterdir())) == 500 and (root / "d000" / "deep").is_dir()
    assert (root / "f0333").read_bytes() == b"abc"  # bytes 999-1001: across the two chunks


def test_without_syncfs_each_file_and_folder_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(tree_staging, "has_syncfs", lambda: False)
    monkeypatch.setattr(tree_write, "has_syncfs", lambda: False)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    root = built(tmp_path)
    assert (root / "a" / "b" / "one.txt").read_bytes() == b"one"
    made = sum(entry.kind != LINK for entry in ENTRIES)
    assert len(synced) >= made + 2  # every file and folder, the staging folder, its parent


def test_an_interrupted_download_resumes_only_what_is_missing(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)  # chunks: "onet" "wo!t" "hree"
    first = download(tmp_path, tree, DATA, only={0, 2})
    first.keep()
    staging = staging_path(tmp_path, ID)
    assert os.listdir(tmp_path) == [staging.name]
    assert staging.stat().st_mode & 0o777 == 0o700

    second = StagingTree(tmp_path, ID, tree)
    assert second.found and second.resume() == [0, 2]
    assert not second.complete
    with pytest.raises(IntegrityError, match="chunks missing"):
        second.finish()
    second.write(1, chunk(tree, DATA, 1))
    root = second.finish()
    assert (root / "a" / "two.txt").read_bytes() == b"two!"
    assert os.listdir(tmp_path) == ["shared"]


def test_a_byte_changed_between_runs_is_not_trusted(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    download(tmp_path, tree, DATA).keep()
    (staging_path(tmp_path, ID) / "a-b").write_bytes(b"thrEe")  # chunk 2: "hree"
    again = StagingTree(tmp_path, ID, tree)
    assert again.resume() == [0, 1]
    again.write(2, chunk(tree, DATA, 2))
    assert (again.finish() / "a-b").read_bytes() == b"three"


def test_a_file_missing_or_cut_short_is_fetched_again(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    download(tmp_path, tree, DATA).keep()
    (staging_path(tmp_path, ID) / "a" / "b" / "one.txt").unlink()  # chunk 0
    os.truncate(staging_path(tmp_path, ID) / "a-b", 0)  # chunks 1 ("wo!" + "t") and 2
    again = StagingTree(tmp_path, ID, tree)
    assert again.resume() == []
    for index in range(3):
        again.write(index, chunk(tree, DATA, index))
    assert everything(again.finish()) == {entry.path for entry in ENTRIES}


@pytest.mark.parametrize("planted", ["a/two.txt", "a", "a/b/one.txt"])
def test_a_symlink_planted_in_the_staging_tree_is_refused_never_followed(
    tmp_path: Path, planted: str
) -> None:
    tree = tree_of(ENTRIES, DATA)
    download(tmp_path / "out", tree, DATA, only={0}).keep()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "two.txt").write_bytes(b"mine")
    (victim / "one.txt").write_bytes(b"mine")
    at = staging_path(tmp_path / "out", ID) / planted
    if at.is_dir():
        for path in sorted(at.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        at.rmdir()
    else:
        at.unlink(missing_ok=True)
    at.symlink_to(victim / "two.txt" if planted.endswith(".txt") else victim)
    with pytest.raises(StorageError, match=f"{planted} is in the way") as refused:
        StagingTree(tmp_path / "out", ID, tree)
    assert "\n" not in str(refused.value)
    assert at.is_symlink()
    assert sorted(p.read_bytes() for p in victim.iterdir()) == [b"mine", b"mine"]


def test_a_symlink_at_the_staging_name_is_never_followed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    staging_path(tmp_path / "out", ID).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="is in the way"):
        built(tmp_path / "out")
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("odd", ["a name not in the share", "a FIFO", "a hard link"])
def test_anything_else_in_the_staging_tree_is_refused_and_left_alone(
    tmp_path: Path, odd: str
) -> None:
    tree = tree_of(ENTRIES, DATA)
    download(tmp_path / "out", tree, DATA, only={0}).keep()
    staging = staging_path(tmp_path / "out", ID)
    if odd == "a FIFO":
        (staging / "a-b").unlink(missing_ok=True)
        os.mkfifo(staging / "a-b")
        name = "a-b"
    elif odd == "a hard link":
        (tmp_path / "other").write_bytes(b"other")
        os.link(tmp_path / "other", staging / "a-b")
        name = "a-b"
    else:
        (staging / "a" / "extra").write_bytes(b"x")
        name = "a/extra"
    with pytest.raises(StorageError, match=f"{name} is in the way"):
        StagingTree(tmp_path / "out", ID, tree)
    assert (tmp_path / "out" / "shared").exists() is False
    if odd == "a hard link":
        assert (tmp_path / "other").read_bytes() == b"other"


def test_entries_an_earlier_include_chose_are_removed(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    download(tmp_path, tree, DATA, tree.matching(["a-b"]), only=set()).keep()
    (staging_path(tmp_path, ID) / "a-b").write_bytes(b"junk!")
    root = download(tmp_path, tree, DATA, tree.matching(["a/b"])).finish()
    assert everything(root) == {"a", "a/b", "a/b/one.txt"}


def test_an_interrupted_finish_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the finish set the entries' own modes (0500 folders, 0000 files) and
    made the links, before the rename: the next attempt reads it all back."""
    entries = [
        Entry("locked", FOLDER, 0, 0o500, MTIME_NS),
        Entry("locked/none", FILE, 2, 0o000, MTIME_NS),
        Entry("locked/link", LINK, 0, 0o777, MTIME_NS, "none"),
        Entry("z", FILE, 4, 0o444, MTIME_NS),
    ]
    data = b"nnzzzz"
    tree = tree_of(entries, data)
    first = download(tmp_path, tree, data)

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tree_write, "_name_unused", stopped)
    with pytest.raises(KeyboardInterrupt):
        first.finish()
    first.keep()
    monkeypatch.undo()
    again = StagingTree(tmp_path, ID, tree)
    assert again.resume() == [0, 1]
    root = again.finish()
    try:
        assert (root / "locked").stat().st_mode & 0o777 == 0o500
        assert (root / "z").stat().st_mode & 0o777 == 0o444
        assert os.readlink(root / "locked" / "link") == "none"
    finally:
        (root / "locked").chmod(0o700)
        (root / "locked" / "none").chmod(0o600)
    assert (root / "locked" / "none").read_bytes() == b"nn"


def test_two_downloads_never_share_a_staging_tree(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    first = StagingTree(tmp_path, ID, tree)
    with pytest.raises(StorageError, match="another `sfs-peer get` is downloading this folder"):
        StagingTree(tmp_path, ID, tree)
    first.discard()
    assert os.listdir(tmp_path) == []


def test_a_staging_tree_locked_elsewhere_is_left_alone(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    download(tmp_path, tree, DATA, only={0}).keep()
    fd = os.open(staging_path(tmp_path, ID), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StorageError, match="another"):
            StagingTree(tmp_path, ID, tree)
    finally:
        os.close(fd)
    assert StagingTree(tmp_path, ID, tree).resume() == [0]


def test_a_chunk_that_does_not_match_is_refused_and_never_written(tmp_path: Path) -> None:
    tree = tree_of(ENTRIES, DATA)
    staging = StagingTree(tmp_path, ID, tree)
    with pytest.raises(IntegrityError, match="chunk 1 does not match"):
        staging.write(1, b"WO!T")
    assert not (staging_path(tmp_path, ID) / "a" / "two.txt").exists()
    staging.write(1, chunk(tree, DATA, 1))  # "wo!" of two.txt, "t" of a-b
    with pytest.raises(IntegrityError, match="delivered twice"):
        staging.write(1, chunk(tree, DATA, 1))
    assert (staging_path(tmp_path, ID) / "a-b").read_bytes() == b"t"
    assert (staging_path(tmp_path, ID) / "a" / "two.txt").stat().st_size == 4


def test_a_kept_tree_of_more_folders_than_open_files_allowed_is_resumed(tmp_path: Path) -> None:
    entries = [Entry("top", FOLDER, 0, 0o755, MTIME_NS)]
    entries += [Entry(f"top/d{n:03}", FOLDER, 0, 0o755, MTIME_NS) for n in range(200)]
    entries.append(Entry("top/d199/f", FILE, 4, 0o644, MTIME_NS))
    tree = tree_of(entries, b"data")
    StagingTree(tmp_path, ID, tree).keep()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 50, hard))
    try:
        again = StagingTree(tmp_path, ID, tree)
        assert again.found and again.resume() == []
        again.write(0, b"data")
        root = again.finish()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list((root / "top").iterdir())) == 200
