"""sfs.peer.partial: the temporary download file and the file name taken from a manifest."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import resource
import stat
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfs.common.errors import IntegrityError, StorageError
from sfs.peer import partial as partial_module
from sfs.peer.partial import MAX_NAME_BYTES, PartialFile, remove_abandoned, safe_filename

CHUNK = 4096
FILE_ID = "0123456789abcdef0123456789abcdef"
DATA = random.Random(11).randbytes(4 * CHUNK + 100)  # 5 chunks, the last one short
SHA = hashlib.sha256(DATA).digest()


def chunks(data: bytes = DATA) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def new_partial(folder: Path, data: bytes = DATA) -> PartialFile:
    return PartialFile(folder, FILE_ID, len(data), CHUNK)


# --- writing and finishing ------------------------------------------------------------------


def test_chunks_in_order_give_the_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    assert partial.path.parent == tmp_path
    assert partial.path.name.startswith(f".sfs-{FILE_ID}.") and partial.path.suffix == ".part"
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    target = partial.finish(SHA, "report.pdf")
    assert target == tmp_path / "report.pdf"
    assert target.read_bytes() == DATA
    assert not partial.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.pdf"]


@pytest.mark.parametrize(
    "order", [[4, 3, 2, 1, 0], [1, 0, 3, 2, 4], [4, 0, 1, 2, 3], [2, 4, 0, 3, 1]]
)
def test_chunks_out_of_order_give_the_file(tmp_path: Path, order: list[int]) -> None:
    partial = new_partial(tmp_path)
    parts = chunks()
    for index in order:
        partial.write(index, parts[index])
    assert partial.finish(SHA, "out.bin").read_bytes() == DATA


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(5)))
def test_any_chunk_order_gives_the_file_and_its_hash(order: list[int]) -> None:
    parts = chunks()
    with tempfile.TemporaryDirectory() as folder:
        partial = new_partial(Path(folder))
        for index in order:
            partial.write(index, parts[index])
        target = partial.finish(SHA, "out.bin")  # the whole-file hash must match
        assert target.read_bytes() == DATA


def test_the_final_name_does_not_exist_before_finish(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
        assert not (tmp_path / "out.bin").exists()
    partial.finish(SHA, "out.bin")
    assert (tmp_path / "out.bin").exists()


def test_empty_file(tmp_path: Path) -> None:
    partial = PartialFile(tmp_path, FILE_ID, 0, CHUNK)
    target = partial.finish(hashlib.sha256(b"").digest(), "empty")
    assert target.read_bytes() == b""


def test_folder_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    partial = new_partial(folder)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    assert partial.finish(SHA, "x").parent == folder


def test_wrong_whole_file_hash_is_refused(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    wrong = bytes(32)
    with pytest.raises(IntegrityError, match="SHA-256"):
        partial.finish(wrong, "out.bin")
    assert not (tmp_path / "out.bin").exists()
    partial.discard()
    assert list(tmp_path.iterdir()) == []


def test_hash_of_other_content_is_refused(tmp_path: Path) -> None:
    """Same size, one byte different: the hash is over the bytes, not the length."""
    partial = new_partial(tmp_path)
    parts = chunks()
    parts[2] = bytes([parts[2][0] ^ 1]) + parts[2][1:]
    for index, chunk in enumerate(parts):
        partial.write(index, chunk)
    with pytest.raises(IntegrityError):
        partial.finish(SHA, "out.bin")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("missing", [0, 2, 4])
def test_missing_chunks_are_refused(tmp_path: Path, missing: int) -> None:
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        if index != missing:
            partial.write(index, chunk)
    with pytest.raises(IntegrityError, match="missing"):
        partial.finish(SHA, "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_nothing_written_is_refused(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    with pytest.raises(IntegrityError, match="missing"):
        partial.finish(SHA, "out.bin")


def test_discard_removes_the_temporary_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    partial.write(0, chunks()[0])
    assert partial.path.exists()
    partial.discard()
    assert not partial.path.exists()
    partial.discard()  # twice is harmless
    assert list(tmp_path.iterdir()) == []


# --- names and permissions ------------------------------------------------------------------


def finished(folder: Path, name: str, data: bytes = DATA) -> Path:
    partial = new_partial(folder, data)
    for index, chunk in enumerate(chunks(data)):
        partial.write(index, chunk)
    return partial.finish(hashlib.sha256(data).digest(), name)


def test_a_taken_name_gets_a_number(tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(b"mine")
    assert finished(tmp_path, "report.pdf") == tmp_path / "report (1).pdf"
    assert finished(tmp_path, "report.pdf") == tmp_path / "report (2).pdf"
    assert (tmp_path / "report.pdf").read_bytes() == b"mine"  # never overwritten
    assert (tmp_path / "report (1).pdf").read_bytes() == DATA


def test_a_taken_name_without_extension_gets_a_number(tmp_path: Path) -> None:
    (tmp_path / "notes").write_bytes(b"mine")
    assert finished(tmp_path, "notes") == tmp_path / "notes (1)"


def test_a_dangling_symlink_counts_as_taken(tmp_path: Path) -> None:
    (tmp_path / "out.bin").symlink_to(tmp_path / "nowhere")
    assert finished(tmp_path, "out.bin") == tmp_path / "out (1).bin"
    assert not (tmp_path / "nowhere").exists()


def test_partial_file_is_private_and_final_file_follows_umask(
    tmp_path: Path, umask_022: None
) -> None:
    partial = new_partial(tmp_path)
    assert mode_of(partial.path) == 0o600
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    assert mode_of(partial.path) == 0o600
    target = partial.finish(SHA, "out.bin")
    assert mode_of(target) == 0o644


def test_final_file_follows_a_stricter_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        target = finished(tmp_path, "out.bin")
    finally:
        os.umask(previous)
    assert mode_of(target) == 0o640


def test_another_downloads_partial_file_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / f".sfs-{FILE_ID}.part"
    other.write_bytes(b"someone else's download")
    partial = new_partial(tmp_path)
    assert partial.path != other
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    assert partial.finish(SHA, "out.bin").read_bytes() == DATA
    assert other.read_bytes() == b"someone else's download"


def test_two_downloads_of_one_file_at_once_each_keep_their_own_bytes(tmp_path: Path) -> None:
    first, second = new_partial(tmp_path), new_partial(tmp_path)
    parts = chunks()
    first.write(0, parts[0])  # the second download has barely started when the first ends
    second.write(0, parts[0])
    for index in range(1, len(parts)):
        first.write(index, parts[index])
    done = first.finish(SHA, "out.bin")
    assert done.read_bytes() == DATA
    second.discard()
    assert done.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_name_taken_at_the_last_moment_is_not_replaced(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    (tmp_path / "out.bin").write_bytes(b"created while we downloaded")
    target = partial.finish(SHA, "out.bin")
    assert target.name == "out (1).bin"
    assert (tmp_path / "out.bin").read_bytes() == b"created while we downloaded"


def test_a_numbered_name_still_fits(tmp_path: Path) -> None:
    long_name = "x" * 251 + ".bin"
    (tmp_path / long_name).write_bytes(b"taken")
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    target = partial.finish(SHA, long_name)
    assert target.name.endswith(" (1).bin")
    assert len(target.name.encode()) <= 255
    assert target.read_bytes() == DATA


def test_a_leftover_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (f".sfs-{FILE_ID}.part", "out.bin"):
        (tmp_path / name).symlink_to(victim)
    partial = new_partial(tmp_path)
    partial.write(0, chunks()[0])
    assert victim.read_bytes() == b"precious"
    assert not partial.path.is_symlink()
    partial.discard()
    assert victim.read_bytes() == b"precious"


def test_a_folder_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError):
        new_partial(blocker / "downloads")


# --- safe_filename --------------------------------------------------------------------------

FALLBACK = "fallback-id"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("my report (final).pdf", "my report (final).pdf"),
        ("résumé.txt", "résumé.txt"),
        ("../../x", "x"),
        ("/etc/passwd", "passwd"),
        ("a/b/c.txt", "c.txt"),
        ("a\\b\\c", "c"),
        ("..\\..\\windows\\evil.exe", "evil.exe"),
        ("C:\\Users\\x\\file.doc", "file.doc"),
        ("..", FALLBACK),
        (".", FALLBACK),
        ("", FALLBACK),
        ("...", FALLBACK),
        (".......", FALLBACK),
        ("/", FALLBACK),
        ("dir/", FALLBACK),
        ("../", FALLBACK),
        ("   ", FALLBACK),
        (".hidden", "hidden"),
        ("..hidden", "hidden"),
        ("./.bashrc", "bashrc"),
        ("a\x00b", "ab"),
        ("line\nbreak.txt", "linebreak.txt"),
        ("tab\there", "tabhere"),
        ("\x1b[31mred", "[31mred"),
        ("bell\x07\x7f", "bell"),
        ("\u202etxt.exe", "txt.exe"),  # right-to-left override
        ("zero\u200bwidth", "zerowidth"),
        ("\x00", FALLBACK),
        ("\n\r\t", FALLBACK),
        (".\n.", FALLBACK),
        ("/\x00", FALLBACK),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, FALLBACK) == expected


@pytest.mark.parametrize("unit", ["a", "é", "€", "😀"])
def test_long_names_are_cut_to_whole_characters(unit: str) -> None:
    name = unit * 300 + ".txt"
    assert len(name.encode()) > MAX_NAME_BYTES
    result = safe_filename(name, FALLBACK)
    encoded = result.encode()
    assert MAX_NAME_BYTES - len(unit.encode()) < len(encoded) <= MAX_NAME_BYTES
    assert encoded.decode() == result  # no character cut in half
    assert set(result) == {unit}


def test_a_name_of_exactly_the_limit_is_kept() -> None:
    name = "é" * 127 + "a"  # 255 bytes
    assert safe_filename(name, FALLBACK) == name


def test_a_long_hostile_path_keeps_only_its_last_component() -> None:
    name = "../" * 200 + "x" * 10
    assert safe_filename(name, FALLBACK) == "x" * 10


@settings(max_examples=500)
@given(name=st.text(max_size=400))
def test_safe_filename_always_gives_a_plain_visible_name(name: str) -> None:
    result = safe_filename(name, FALLBACK)
    assert result
    assert "/" not in result
    assert "\\" not in result
    assert not result.startswith(".")
    assert result not in {".", ".."}
    assert len(result.encode()) <= MAX_NAME_BYTES
    assert not any(unicodedata.category(ch).startswith("C") for ch in result)


# --- write errors ----------------------------------------------------------------------------


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwrite may take part of the data (near a size limit, say): the rest follows."""
    real_pwrite = os.pwrite
    calls = []

    def stingy(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        return real_pwrite(fd, bytes(data)[:1000], offset)

    monkeypatch.setattr(os, "pwrite", stingy)
    target = finished(tmp_path, "out.bin")
    assert target.read_bytes() == DATA
    assert len(calls) > len(chunks())


def test_a_write_that_takes_nothing_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    partial = new_partial(tmp_path)
    with pytest.raises(StorageError, match="accepted no data"):
        partial.write(0, chunks()[0])
    partial.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_is_reported_clearly(tmp_path: Path) -> None:
    """RLIMIT_FSIZE mid-chunk: the first write is short, the next fails with EFBIG
    (Python ignores SIGXFSZ). Only the soft limit changes, so it can be put back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    partial = new_partial(tmp_path)
    partial.write(0, chunks()[0])
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHUNK + CHUNK // 2, hard))
    try:
        with pytest.raises(StorageError) as refused:
            partial.write(1, chunks()[1])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(refused.value) == (
        f"cannot write in {tmp_path}: the file is larger than this file system "
        "(or a size limit) allows"
    )
    partial.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "no space left in {}"),
        (errno.EDQUOT, "no space left in {}: the disk quota is used up"),
        (errno.EIO, "cannot write in {}: Input/output error"),
    ],
)
def test_write_errors_name_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, message: str
) -> None:
    def failing(fd: int, data: bytes, offset: int) -> int:
        raise OSError(code, os.strerror(code))

    partial = new_partial(tmp_path)
    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(StorageError) as refused:
        partial.write(0, chunks()[0])
    assert str(refused.value) == message.format(tmp_path)
    partial.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["a file", "inside a file", "a symlink to a file"])
def test_a_folder_that_is_a_file_is_named_as_such(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"mine")
    folder = {
        "a file": blocker,
        "inside a file": blocker / "downloads",
        "a symlink to a file": tmp_path / "link",
    }[where]
    if where == "a symlink to a file":
        folder.symlink_to(blocker)
    with pytest.raises(StorageError) as refused:
        new_partial(folder)
    assert str(refused.value) == f"cannot write in {folder}: that path is not a folder"
    assert blocker.read_bytes() == b"mine"


# --- abandoned temporary files -------------------------------------------------------------


def abandoned_part(folder: Path, file_id: str = FILE_ID) -> Path:
    """The temporary file of a download that was killed: written, closed, still there."""
    path = folder / f".sfs-{file_id}.k1ll3d.part"
    path.write_bytes(b"unverified bytes")
    return path


def test_the_next_download_removes_an_abandoned_temporary_file(tmp_path: Path) -> None:
    left = abandoned_part(tmp_path)
    other = abandoned_part(tmp_path, "f" * 32)  # any file's, not only this one's
    partial = new_partial(tmp_path)
    assert not left.exists() and not other.exists()
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    partial.finish(SHA, "out.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_download_in_progress_keeps_its_temporary_file(tmp_path: Path) -> None:
    """Its lock says it is alive, whether it is in this process or another (a second
    open file, like another process's, has a lock of its own)."""
    first = new_partial(tmp_path)
    held = abandoned_part(tmp_path)
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        second = new_partial(tmp_path)
        assert first.path.exists() and held.exists()
        assert remove_abandoned(tmp_path) == []
    finally:
        os.close(fd)
    assert remove_abandoned(tmp_path) == [held]
    for partial in (first, second):
        for index, chunk in enumerate(chunks()):
            partial.write(index, chunk)
    assert {first.finish(SHA, "out.bin").name, second.finish(SHA, "out.bin").name} == {
        "out.bin",
        "out (1).bin",
    }


def test_this_processs_downloads_are_kept_where_locks_are_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock emulated with POSIX locks (NFS) lets this process lock its own files
    again: its live downloads must still be recognised."""
    live = new_partial(tmp_path)
    left = abandoned_part(tmp_path)
    monkeypatch.setattr(partial_module, "_lock", lambda fd, wait: True)
    assert remove_abandoned(tmp_path) == [left]
    assert live.path.exists()
    live.discard()
    assert list(tmp_path.iterdir()) == []


def test_only_regular_files_with_the_temporary_name_are_removed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    keep = [
        tmp_path / "notes.part",
        tmp_path / ".sfs-not-a-file-id.x.part",
        tmp_path / f".sfs-{FILE_ID}.part",  # no random part
        tmp_path / f"sfs-{FILE_ID}.x.part",
    ]
    for path in keep:
        path.write_bytes(b"mine")
    link = tmp_path / f".sfs-{FILE_ID}.link.part"
    link.symlink_to(victim)
    fifo = tmp_path / f".sfs-{FILE_ID}.fifo.part"
    os.mkfifo(fifo)
    folder = tmp_path / f".sfs-{FILE_ID}.dir.part"
    folder.mkdir()
    assert remove_abandoned(tmp_path) == []
    assert all(path.read_bytes() == b"mine" for path in keep)
    assert link.is_symlink() and victim.read_bytes() == b"precious"
    assert fifo.exists() and folder.is_dir()


def test_a_temporary_file_removed_before_it_is_locked_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another download may find it unlocked in that instant, and remove it."""
    real_mkstemp = tempfile.mkstemp
    made: list[str] = []

    def raced(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        made.append(name)
        if len(made) == 1:
            Path(name).unlink()  # what the other download does
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", raced)
    partial = new_partial(tmp_path)
    assert len(made) == 2 and partial.path == Path(made[1])
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    assert partial.finish(SHA, "out.bin").read_bytes() == DATA


def test_discard_after_finish_leaves_the_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
    target = partial.finish(SHA, "out.bin")
    partial.discard()  # what a caller's cleanup may still do
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert target.read_bytes() == DATA
