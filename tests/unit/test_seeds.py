"""sfs.peer.seeds: which seeded copies are gone (the releasing itself, at a real broker,
is in tests/adversarial/test_seeded_copies.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sfs.peer.registry import Share
from sfs.peer.seeds import why_gone


def copy_at(path: Path, size: int = 10) -> Share:
    return Share("a" * 32, path, path.name, size, b"", b"", None, [], 0, owner="alice")


def test_a_copy_in_place_is_kept(tmp_path: Path) -> None:
    (tmp_path / "copy.bin").write_bytes(b"0123456789")
    assert why_gone(copy_at(tmp_path / "copy.bin")) is None


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: None, "is gone"),
        (lambda path: path.write_bytes(b"short"), "has another size than the file it is a copy of"),
        (lambda path: path.mkdir(), "is not a regular file any more"),
        (lambda path: os.mkfifo(path), "is not a regular file any more"),
        (lambda path: path.symlink_to("/etc/hostname"), "is not a regular file any more"),
    ],
    ids=["deleted", "other size", "a directory", "a FIFO", "a symlink"],
)
def test_a_copy_deleted_or_replaced_is_gone(tmp_path: Path, make: object, reason: str) -> None:
    path = tmp_path / "copy.bin"
    make(path)  # type: ignore[operator]
    assert why_gone(copy_at(path)) == reason


def test_a_copy_whose_folder_was_replaced_by_a_file_is_gone(tmp_path: Path) -> None:
    (tmp_path / "folder").write_bytes(b"")
    assert why_gone(copy_at(tmp_path / "folder" / "copy.bin")) == "is gone"
