"""sfs.peer.preflight and sfs.peer.serve_lock: what `get` and `serve` check before they
start. Local files only; a name from the manifest is never used as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from sfs.common.errors import InUse, StorageError
from sfs.common.tree import FILE, FOLDER, Entry
from sfs.common.tree_index import TreeIndex
from sfs.peer.partial import partial_path
from sfs.peer.preflight import already_downloaded, check_free_space, human_size
from sfs.peer.serve_lock import serve_lock
from sfs.peer.tree_write import staging_path
from tests.trees import MTIME_NS, crafted_tree, file_tree

FILE_ID = "ab" * 16
CONTENT = b"the signed content\n" * 1000  # 5 chunks of 4 KiB


def make_manifest(content: bytes, name: str = "report.pdf") -> TreeIndex:
    return file_tree(content, 4096, name=name).index


def test_the_same_content_under_the_download_name_is_already_there(tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(CONTENT)
    assert already_downloaded(tmp_path, FILE_ID, make_manifest(CONTENT)) == tmp_path / "report.pdf"


@pytest.mark.parametrize(
    "local",
    [b"", CONTENT[:-1], CONTENT + b"x", b"X" + CONTENT[1:]],
    ids=["empty", "shorter", "longer", "same size, other bytes"],
)
def test_other_content_is_not_already_there(tmp_path: Path, local: bytes) -> None:
    (tmp_path / "report.pdf").write_bytes(local)
    assert already_downloaded(tmp_path, FILE_ID, make_manifest(CONTENT)) is None


def test_nothing_there(tmp_path: Path) -> None:
    assert already_downloaded(tmp_path / "missing", FILE_ID, make_manifest(CONTENT)) is None


def test_the_name_comes_from_safe_filename_never_a_path(tmp_path: Path) -> None:
    """A manifest named "../outside.pdf" is looked for as "outside.pdf" in the folder,
    never beside it."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    (tmp_path / "outside.pdf").write_bytes(CONTENT)
    manifest = make_manifest(CONTENT, name="../outside.pdf")
    assert already_downloaded(folder, FILE_ID, manifest) is None
    (folder / "outside.pdf").write_bytes(CONTENT)
    assert already_downloaded(folder, FILE_ID, manifest) == folder / "outside.pdf"


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.pdf").write_bytes(CONTENT)
    (tmp_path / "report.pdf").symlink_to(tmp_path / "elsewhere.pdf")
    assert already_downloaded(tmp_path, FILE_ID, make_manifest(CONTENT)) is None


def test_a_fifo_under_the_name_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "report.pdf")
    # Run where a hang would be a timeout, not a stuck test run.
    code = (
        "import sys; from pathlib import Path;"
        "from sfs.peer.preflight import already_downloaded;"
        "from tests.unit.test_preflight import make_manifest;"
        f"print(already_downloaded(Path(sys.argv[1]), {FILE_ID!r}, make_manifest(b'x')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    assert done.stdout == "None\n"


Usage = namedtuple("Usage", "total used free")


def test_free_space_is_checked_and_the_message_says_how_much(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = make_manifest(CONTENT)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, len(CONTENT) - 1))
    with pytest.raises(StorageError) as refused:
        check_free_space(tmp_path / "not" / "made" / "yet", FILE_ID, manifest)
    message = str(refused.value)
    assert "not enough free space" in message
    assert f"needs {human_size(len(CONTENT))} more, {human_size(len(CONTENT) - 1)} free" in message
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, len(CONTENT)))
    check_free_space(tmp_path, FILE_ID, manifest)


def test_what_an_earlier_try_wrote_counts_as_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(1 << 20)
    manifest = make_manifest(content)
    partial_path(tmp_path, FILE_ID).write_bytes(content[: 1 << 19])
    written = partial_path(tmp_path, FILE_ID).stat().st_blocks * 512
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, len(content) - written))
    check_free_space(tmp_path, FILE_ID, manifest)  # the rest fits
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(10**9, 0, len(content) - written - 1)
    )
    with pytest.raises(StorageError, match="not enough free space"):
        check_free_space(tmp_path, FILE_ID, manifest)


def test_a_folder_needs_its_size_once_less_what_its_staging_tree_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder's files are its partial storage: no second copy is made."""
    entries = [Entry("a", FOLDER, 0, 0o755, MTIME_NS), Entry("a/b", FILE, 1 << 20, 0o644, 0)]
    content = os.urandom(1 << 20)
    manifest = crafted_tree(entries, content).index
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, len(content)))
    check_free_space(tmp_path, FILE_ID, manifest)  # once fits
    kept = staging_path(tmp_path, FILE_ID) / "a"
    kept.mkdir(parents=True)
    (kept / "b").write_bytes(content[: 1 << 19])
    (kept / "elsewhere").symlink_to("/")  # not followed
    written = (kept / "b").stat().st_blocks * 512
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, len(content) - written))
    check_free_space(tmp_path, FILE_ID, manifest)  # the rest fits
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(10**9, 0, len(content) - written - 1)
    )
    with pytest.raises(StorageError, match="not enough free space"):
        check_free_space(tmp_path, FILE_ID, manifest)


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 5 * 1024**3, 3 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 GiB",
        "3.0 TiB",
    ]


def test_one_serve_per_data_folder(tmp_path: Path) -> None:
    """The lock is per open file description, so a second holder in this same process
    is refused as another process would be; the pid is named."""
    with serve_lock(tmp_path):
        with pytest.raises(InUse) as refused, serve_lock(tmp_path):
            pass
        assert str(refused.value) == (
            "another `sfs-peer serve` is running for this data folder"
            f" (pid {os.getpid()}): {tmp_path}"
        )
        assert refused.value.exit_code == 1
    with serve_lock(tmp_path):  # released when the first one ended
        pass


def test_a_folder_that_cannot_be_written_is_left_to_the_download_to_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/sys has 0 B free, but "cannot write" is the true reason: the download says it."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    check_free_space(blocker / "downloads", FILE_ID, make_manifest(CONTENT))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    check_free_space(tmp_path, FILE_ID, make_manifest(CONTENT))


def test_a_file_system_that_tells_no_sizes_is_not_called_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, 0))  # as sysfs says
    check_free_space(tmp_path, FILE_ID, make_manifest(CONTENT))
