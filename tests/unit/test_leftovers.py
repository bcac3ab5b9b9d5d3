"""sfs.peer.leftovers: unfinished downloads listed, and removed only when they are this
user's own abandoned `.part` files: never through a symlink, never another user's file,
never one a running `get` is writing."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from sfs.common.errors import StorageError
from sfs.peer.leftovers import clean, unfinished

ID_A, ID_B = "a" * 32, "b" * 32
NOW = 2_000_000_000.0
DAY = 86_400


def _part(folder: Path, file_id: str, size: int = 10, age_days: float = 30) -> Path:
    path = folder / f".sfs-{file_id}.part"
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_days * DAY, NOW - age_days * DAY))
    return path


def test_lists_partial_downloads_oldest_first(tmp_path: Path) -> None:
    _part(tmp_path, ID_A, size=5, age_days=1)
    _part(tmp_path, ID_B, size=7, age_days=3)
    found = unfinished(tmp_path)
    assert [(u.file_id, u.size, u.in_use) for u in found] == [(ID_B, 7, False), (ID_A, 5, False)]
    assert found[0].path == tmp_path / f".sfs-{ID_B}.part"


def test_a_missing_folder_has_none(tmp_path: Path) -> None:
    assert unfinished(tmp_path / "nope") == []
    assert clean(tmp_path / "nope", 0, NOW).removed == []


def test_a_file_instead_of_the_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot read the folder"):
        unfinished(tmp_path / "file")


@pytest.mark.parametrize(
    "name",
    [
        f".sfs-{ID_A}.part.bak",
        f"sfs-{ID_A}.part",
        f".sfs-{ID_A.upper()}.part",
        f".sfs-{ID_A[:31]}.part",
        "report.pdf",
    ],
)
def test_only_exact_partial_names_are_touched(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"keep")
    os.utime(path, (NOW - 30 * DAY, NOW - 30 * DAY))
    assert unfinished(tmp_path) == []
    assert clean(tmp_path, 0, NOW).removed == []
    assert path.read_bytes() == b"keep"


def test_removes_the_old_keeps_the_recent(tmp_path: Path) -> None:
    old = _part(tmp_path, ID_A, age_days=10)
    recent = _part(tmp_path, ID_B, age_days=2)
    done = clean(tmp_path, 7 * DAY, NOW)
    assert [u.file_id for u in done.removed] == [ID_A]
    assert [u.file_id for u in done.kept_recent] == [ID_B]
    assert not old.exists() and recent.exists()
    assert [u.file_id for u in clean(tmp_path, 0, NOW).removed] == [ID_B]
    assert not recent.exists()


def test_a_symlink_named_like_a_partial_is_never_followed_nor_removed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"precious")
    link = tmp_path / f".sfs-{ID_A}.part"
    link.symlink_to(target)
    assert unfinished(tmp_path) == []
    assert clean(tmp_path, 0, NOW).removed == []
    assert link.is_symlink() and target.read_bytes() == b"precious"


def test_a_hard_link_a_folder_or_a_fifo_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"other")
    os.link(other, tmp_path / f".sfs-{ID_A}.part")
    (tmp_path / f".sfs-{ID_B}.part").mkdir()
    fifo_id = "c" * 32
    os.mkfifo(tmp_path / f".sfs-{fifo_id}.part")
    assert unfinished(tmp_path) == []
    assert clean(tmp_path, 0, NOW).removed == []
    assert (tmp_path / f".sfs-{ID_A}.part").read_bytes() == b"other"
    assert (tmp_path / f".sfs-{ID_B}.part").is_dir()
    assert (tmp_path / f".sfs-{fifo_id}.part").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_another_users_file_is_left_alone(tmp_path: Path) -> None:
    path = _part(tmp_path, ID_A)
    os.chown(path, 65534, 65534)
    assert unfinished(tmp_path) == []
    assert clean(tmp_path, 0, NOW).removed == []
    assert path.exists()


def test_a_download_in_progress_is_shown_and_kept(tmp_path: Path) -> None:
    path = _part(tmp_path, ID_A)
    fd = os.open(path, os.O_RDWR)  # as `get` holds it (peer/partial.py)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert [u.in_use for u in unfinished(tmp_path)] == [True]
        done = clean(tmp_path, 0, NOW)
        assert done.removed == [] and [u.file_id for u in done.kept_in_use] == [ID_A]
        assert path.exists()
    finally:
        os.close(fd)
    assert [u.file_id for u in clean(tmp_path, 0, NOW).removed] == [ID_A]


def _staging(folder: Path, file_id: str) -> Path:
    """A folder download's staging tree as an interrupted `get` leaves it."""
    root = folder / f".sfs-{file_id}.tree"
    (root / "sub").mkdir(parents=True, mode=0o700)
    (root / "sub" / "a.bin").write_bytes(b"a" * 300)
    (root / "b.bin").write_bytes(b"b" * 200)
    os.utime(root / "b.bin", (0, 0))  # a finished file gets its shared mtime
    return root


def test_a_folders_staging_tree_is_listed_and_removed(tmp_path: Path) -> None:
    root = _staging(tmp_path, ID_A)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_bytes(b"keep")
    (root / "sub" / "link").symlink_to(victim)
    [found] = unfinished(tmp_path)
    assert (found.file_id, found.path, found.size, found.in_use) == (ID_A, root, 500, False)
    assert found.modified > 1_000_000  # when it was written, not the files' shared mtimes
    assert clean(tmp_path, DAY, found.modified + 1).kept_recent == [found]
    assert [u.file_id for u in clean(tmp_path, 0, found.modified + 1).removed] == [ID_A]
    assert not root.exists()
    assert (victim / "keep").read_bytes() == b"keep"  # the link inside was not followed


def test_a_staging_tree_in_use_a_link_or_a_file_is_left_alone(tmp_path: Path) -> None:
    root = _staging(tmp_path, ID_A)
    elsewhere = _staging(tmp_path / "elsewhere", ID_B)
    (tmp_path / f".sfs-{ID_B}.tree").symlink_to(elsewhere)
    (tmp_path / f".sfs-{'c' * 32}.tree").write_bytes(b"a file")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # as `get` holds it (tree_staging.py)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert [(u.file_id, u.in_use) for u in unfinished(tmp_path)] == [(ID_A, True)]
        done = clean(tmp_path, 0, NOW)
        assert done.removed == [] and [u.file_id for u in done.kept_in_use] == [ID_A]
    finally:
        os.close(fd)
    assert root.exists() and elsewhere.exists()
    assert (tmp_path / f".sfs-{'c' * 32}.tree").read_bytes() == b"a file"
