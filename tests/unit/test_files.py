"""sfs.common.files: private files, atomic replacement, permission checks."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfs.common import files
from sfs.common.errors import KeyFileError, StorageError
from sfs.common.files import locked, make_private_dir, read_private_file, write_private_file


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0, so a mode of 0600 can only come from the code, not from the umask."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# --- write_private_file ---------------------------------------------------------------------


def test_write_creates_a_0600_file(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "secret.key"
    write_private_file(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert mode_of(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["secret.key"]  # no temp file left behind


def test_write_empty_data(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    write_private_file(path, b"")
    assert path.read_bytes() == b""
    assert mode_of(path) == 0o600


def test_write_replaces_an_existing_file_atomically(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"old content that is longer")
    path.chmod(0o644)
    old_inode = path.stat().st_ino
    write_private_file(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600  # the loose mode of the old file is not kept
    assert path.stat().st_ino != old_inode  # renamed into place, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["secret.key"]


def test_write_never_touches_another_writers_temp_file(tmp_path: Path) -> None:
    other = tmp_path / ".secret.key.tmp"
    other.write_bytes(b"another process, mid-write")
    write_private_file(tmp_path / "secret.key", b"data")
    assert (tmp_path / "secret.key").read_bytes() == b"data"
    assert other.read_bytes() == b"another process, mid-write"


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    payloads = [bytes([65 + n]) * 100_000 for n in range(8)]

    def writer(data: bytes) -> None:
        for _ in range(20):
            write_private_file(target, data)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in payloads
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_locked_serialises_read_modify_write(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")

    def bump() -> None:
        for _ in range(50):
            with locked(counter):
                value = int(counter.read_text())
                write_private_file(counter, str(value + 1).encode())

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.read_text() == "200"


def test_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match="No space left on device"):
        write_private_file(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["secret.key"]


def test_write_into_a_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot write"):
        write_private_file(tmp_path / "missing" / "secret.key", b"x")


def test_write_over_a_folder_is_a_storage_error(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(StorageError):
        write_private_file(target, b"x")
    assert (target / "inside").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["folder"]


# --- read_private_file ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_read_accepts_owner_only_modes(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"secret")
    path.chmod(mode)
    assert read_private_file(path, "the key file") == b"secret"


def test_read_what_write_wrote(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    write_private_file(path, b"\x00\xffdata")
    assert read_private_file(path, "the key file") == b"\x00\xffdata"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o620, 0o777])
def test_read_refuses_files_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"secret")
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        read_private_file(path, "the key file")
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"mode {mode:o}" in message
    assert message.startswith(f"the key file {path} is accessible by other users")


def test_read_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match=r"the key file .*absent\.key does not exist"):
        read_private_file(path, "the key file")


def test_read_a_folder_is_a_key_file_error(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    with pytest.raises(KeyFileError, match="cannot read the key file"):
        read_private_file(folder, "the key file")


def test_read_below_a_file_is_a_key_file_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KeyFileError, match="cannot read"):
        read_private_file(tmp_path / "file" / "secret.key", "the key file")


# --- make_private_dir -------------------------------------------------------------------------


def test_make_private_dir(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "data"
    make_private_dir(path)
    assert path.is_dir()
    assert mode_of(path) == 0o700
    make_private_dir(path)  # exists already: fine
    assert path.is_dir()


def test_make_private_dir_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c"
    make_private_dir(path)
    assert path.is_dir()


def test_make_private_dir_below_a_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create"):
        make_private_dir(tmp_path / "file" / "data")
    with pytest.raises(StorageError, match="cannot create"):
        make_private_dir(tmp_path / "file")
