"""An attacker who can rename entries in the download folder (a group-writable folder
without the sticky bit) swaps the temporary file while a download finishes.

The swap is made at the moment the review found (during the fsync that follows the
completeness check, which the fchmod just before announces); `os.fsync` is wrapped only to
act at exactly that instant, so the race is won every time instead of now and then.
Nothing unverified may ever get the final name, and `finish` must not report success
for bytes it never checked.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sfs.common.errors import IntegrityError
from sfs.peer.partial import PartialFile
from tests.unit.test_partial import DATA, FILE_ID, manifest_of, write_all

FORGED = b"forged bytes the download never checked"


def swap_during_fsync(monkeypatch: pytest.MonkeyPatch, partial: PartialFile) -> None:
    """Make the first fsync of the temporary file move it aside and put a forged file at
    its path first, as an attacker watching for the fchmod would."""
    real_fsync = os.fsync
    done = []

    def fsync(fd: int) -> None:
        if not done and os.fstat(fd).st_ino == partial.path.stat().st_ino:
            done.append(True)
            partial.path.rename(partial.path.with_name("moved-aside"))
            forged = partial.path.with_name("forged")
            forged.write_bytes(FORGED)
            forged.rename(partial.path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def finished_names(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def test_a_temporary_file_swapped_during_the_fsync_never_gets_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = PartialFile(tmp_path, FILE_ID, manifest_of())
    write_all(partial)
    swap_during_fsync(monkeypatch, partial)
    target = partial.finish("report.pdf")
    assert target.read_bytes() == DATA  # the checked bytes, not the forged ones
    assert FORGED not in finished_names(tmp_path).values()
    # The attacker's entry is left where they put it, not taken for ours.
    assert partial.path.read_bytes() == FORGED


def test_without_hard_links_a_swapped_temporary_file_is_refused_and_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = PartialFile(tmp_path, FILE_ID, manifest_of())
    write_all(partial)
    swap_during_fsync(monkeypatch, partial)

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(IntegrityError, match="replaced by someone else"):
        partial.finish("report.pdf")
    assert not (tmp_path / "report.pdf").exists()
    assert FORGED not in finished_names(tmp_path).values()


def test_without_hard_links_an_untouched_download_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = PartialFile(tmp_path, FILE_ID, manifest_of())
    write_all(partial)
    (tmp_path / "report.pdf").write_bytes(b"taken")

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = partial.finish("report.pdf")
    assert target.name == "report (1).pdf"
    assert target.read_bytes() == DATA
    assert not partial.path.exists()


def test_a_temporary_file_deleted_as_the_download_finishes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = PartialFile(tmp_path, FILE_ID, manifest_of())
    write_all(partial)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if partial.path.exists():
            partial.path.unlink()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(IntegrityError, match="deleted by someone else"):
        partial.finish("report.pdf")
    assert finished_names(tmp_path) == {}


def test_without_hard_links_a_swap_whose_undo_is_blocked_leaves_nothing_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker swaps the temporary file right after the rename's check, then puts a
    folder at the temporary path so that moving their entry back fails: it must not keep
    the final name."""
    partial = PartialFile(tmp_path, FILE_ID, manifest_of())
    write_all(partial)
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self == partial.path and Path(target).name == "report.pdf":
            self.rename(self.with_name("moved-aside"))  # ours, out of the way
            self.write_bytes(FORGED)  # theirs, renamed in our place
            moved = real_rename(self, target)
            self.mkdir()
            (self / "blocker").write_bytes(b"x")
            return moved
        return real_rename(self, target)

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(IntegrityError, match="replaced by someone else"):
        partial.finish("report.pdf")
    assert not (tmp_path / "report.pdf").exists()
