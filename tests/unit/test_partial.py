"""sfs.peer.partial: the temporary download file and the file name taken from a manifest."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import resource
import signal
import stat
import tempfile
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfs.common.errors import IntegrityError, StorageError
from sfs.common.tree_index import TreeIndex
from sfs.peer.direct_writes import ChunkWriter
from sfs.peer.partial import MAX_NAME_BYTES, PartialFile, partial_path, safe_filename
from sfs.peer.stamps import stamp_of
from tests.trees import file_tree

# Small chunks keep the tests fast: these manifests are never encoded, so the protocol's
# MIN_CHUNK_SIZE does not apply. 4096 is also the usual file system block, so a chunk
# never written is a hole of its own.
CHUNK = 4096
FILE_ID = "0123456789abcdef0123456789abcdef"
OTHER_ID = "fedcba9876543210fedcba9876543210"
DATA = random.Random(11).randbytes(4 * CHUNK + 100)  # 5 chunks, the last one short


def chunks(data: bytes = DATA) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def manifest_of(data: bytes = DATA) -> TreeIndex:
    return file_tree(data, CHUNK).index


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
    return PartialFile(folder, FILE_ID, manifest_of(data))


def write_all(partial: PartialFile, data: bytes = DATA, skip: frozenset[int] = frozenset()) -> None:
    for index, chunk in enumerate(chunks(data)):
        if index not in skip:
            partial.write(index, chunk)


def part_of(folder: Path) -> Path:
    return partial_path(folder, FILE_ID)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- writing and finishing ------------------------------------------------------------------


def test_chunks_in_order_give_the_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    assert partial.path == tmp_path / f".sfs-{FILE_ID}.part" == part_of(tmp_path)
    assert partial.resume() == []
    write_all(partial)
    target = partial.finish("report.pdf")
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
    assert partial.finish("out.bin").read_bytes() == DATA


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(5)))
def test_any_chunk_order_gives_the_file_and_its_hash(order: list[int]) -> None:
    parts = chunks()
    with tempfile.TemporaryDirectory() as folder:
        partial = new_partial(Path(folder))
        for index in order:
            partial.write(index, parts[index])
        target = partial.finish("out.bin")  # every chunk verified, none missing
        assert target.read_bytes() == DATA


def test_the_final_name_does_not_exist_before_finish(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    for index, chunk in enumerate(chunks()):
        partial.write(index, chunk)
        assert not (tmp_path / "out.bin").exists()
    partial.finish("out.bin")
    assert (tmp_path / "out.bin").exists()


def test_empty_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path, b"")
    assert partial.resume() == []
    target = partial.finish("empty")
    assert target.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_folder_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    partial = new_partial(folder)
    write_all(partial)
    assert partial.finish("x").parent == folder


def test_a_chunk_that_does_not_match_the_manifest_is_never_written(tmp_path: Path) -> None:
    """Same size, one byte different: refused by `write` itself, before any disk write,
    so the file can never be finished with it (there is no whole-file hash behind)."""
    partial = new_partial(tmp_path)
    parts = chunks()
    bad = bytes([parts[2][0] ^ 1]) + parts[2][1:]
    with pytest.raises(IntegrityError, match="chunk 2 does not match"):
        partial.write(2, bad)
    assert partial.path.stat().st_size == 0
    for index, chunk in enumerate(parts):
        if index != 2:
            partial.write(index, chunk)
    with pytest.raises(IntegrityError, match="missing"):
        partial.finish("out.bin")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("index", [-1, 5, 99])
def test_a_chunk_index_outside_the_manifest_is_refused(tmp_path: Path, index: int) -> None:
    partial = new_partial(tmp_path)
    with pytest.raises(IntegrityError, match="does not match"):
        partial.write(index, chunks()[0])
    assert partial.path.stat().st_size == 0


def test_a_chunk_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    """The last chunk with its tail cut, or padded: never written."""
    partial = new_partial(tmp_path)
    last = chunks()[4]
    for data in (last[:-1], last + b"\0"):
        with pytest.raises(IntegrityError, match="chunk 4 does not match"):
            partial.write(4, data)


def test_a_chunk_delivered_twice_is_refused(tmp_path: Path) -> None:
    """Completeness counts each index once: a second copy cannot stand in for a missing
    chunk, and is not written over the first."""
    partial = new_partial(tmp_path)
    partial.write(1, chunks()[1])
    with pytest.raises(IntegrityError, match="twice"):
        partial.write(1, chunks()[1])
    write_all(partial, skip=frozenset({1}))
    assert partial.finish("out.bin").read_bytes() == DATA


@pytest.fixture
def held_write(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The next chunk write starts (`started` is set), then waits for `release`."""
    started, release = threading.Event(), threading.Event()
    real = ChunkWriter.write

    def write(self: ChunkWriter, data: bytes, offset: int) -> None:
        started.set()
        assert release.wait(10), "never released"
        real(self, data, offset)

    monkeypatch.setattr(ChunkWriter, "write", write)
    yield started, release
    release.set()


def test_a_chunk_delivered_again_while_its_first_copy_is_written_is_refused(
    tmp_path: Path, held_write: tuple[threading.Event, threading.Event]
) -> None:
    started, release = held_write
    partial = new_partial(tmp_path)
    first = threading.Thread(target=partial.write, args=(1, chunks()[1]))
    first.start()
    assert started.wait(10)
    with pytest.raises(IntegrityError, match="twice"):
        partial.write(1, chunks()[1])
    release.set()
    first.join(10)
    assert not first.is_alive()
    write_all(partial, skip=frozenset({1}))
    assert partial.finish("out.bin").read_bytes() == DATA


def test_stopping_waits_for_a_write_under_way(
    tmp_path: Path, held_write: tuple[threading.Event, threading.Event]
) -> None:
    """Writes run side by side, outside the lock: the descriptor is closed only once
    none is under way (its number could otherwise be reused under a write)."""
    started, release = held_write
    partial = new_partial(tmp_path)
    writing = threading.Thread(target=partial.write, args=(2, chunks()[2]))
    writing.start()
    assert started.wait(10)
    stopping = threading.Thread(target=partial.keep)
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive(), "closed under a write"
    release.set()
    writing.join(10)
    stopping.join(10)
    assert not stopping.is_alive()
    resumed_partial, found = resumed(tmp_path)
    assert found == [2]
    resumed_partial.discard()


def test_a_chunk_found_by_resume_cannot_be_written_again(tmp_path: Path) -> None:
    kept(tmp_path, [0, 3])
    partial, found = resumed(tmp_path)
    assert found == [0, 3]
    with pytest.raises(IntegrityError, match="twice"):
        partial.write(3, chunks()[3])
    partial.discard()


def test_a_write_after_the_download_stopped_is_refused(tmp_path: Path) -> None:
    """A holder's thread past its grace must not write through a closed descriptor (its
    number may belong to another file by then)."""
    partial = new_partial(tmp_path)
    partial.write(0, chunks()[0])
    partial.keep()
    with pytest.raises(StorageError, match="stopped"):
        partial.write(1, chunks()[1])
    assert partial.path.read_bytes() == chunks()[0]


@pytest.mark.parametrize("missing", [0, 2, 4])
def test_missing_chunks_are_refused(tmp_path: Path, missing: int) -> None:
    partial = new_partial(tmp_path)
    write_all(partial, skip=frozenset({missing}))
    with pytest.raises(IntegrityError, match="missing"):
        partial.finish("out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_nothing_written_is_refused(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    with pytest.raises(IntegrityError, match="missing"):
        partial.finish("out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_discard_removes_the_temporary_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    partial.write(0, chunks()[0])
    assert partial.path.exists()
    partial.discard()
    assert not partial.path.exists()
    partial.discard()  # twice is harmless
    assert list(tmp_path.iterdir()) == []


def test_keep_leaves_the_temporary_file_and_its_bytes(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    partial.write(0, chunks()[0])
    partial.keep()
    assert partial.path.read_bytes() == chunks()[0]
    partial.keep()  # twice is harmless
    partial.discard()  # after keep, the file is no longer this object's to remove
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.path.name]


def test_no_temporary_file_remains_after_finish(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    write_all(partial)
    partial.finish("out.bin")
    assert not part_of(tmp_path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    # and the next download of the same file starts from nothing
    again = new_partial(tmp_path)
    assert again.resume() == []
    assert again.path.stat().st_size == 0
    again.discard()


def test_discard_after_finish_leaves_the_file(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    write_all(partial)
    target = partial.finish("out.bin")
    partial.discard()  # what a caller's cleanup may still do
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert target.read_bytes() == DATA


# --- resuming -------------------------------------------------------------------------------


def kept(folder: Path, indexes: list[int], data: bytes = DATA) -> None:
    """An earlier attempt that wrote `indexes` (in that order), then stopped."""
    partial = new_partial(folder, data)
    parts = chunks(data)
    for index in indexes:
        partial.write(index, parts[index])
    partial.keep()


def resumed(folder: Path, data: bytes = DATA) -> tuple[PartialFile, list[int]]:
    partial = new_partial(folder, data)
    return partial, partial.resume()


def finish_rest(partial: PartialFile, found: list[int], data: bytes = DATA) -> bytes:
    """Write what `resume` did not find, finish, and give the file's bytes."""
    write_all(partial, data, skip=frozenset(found))
    return partial.finish("out.bin").read_bytes()


def damage(path: Path, offset: int) -> None:
    """Flip one byte of the file at `offset`, as a disk or a stray writer might."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x40]))


def test_a_new_attempt_resumes_exactly_the_chunks_written(tmp_path: Path) -> None:
    kept(tmp_path, [4, 0, 2])
    partial, found = resumed(tmp_path)
    assert found == [0, 2, 4]
    assert finish_rest(partial, found) == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_finishing_after_resume_writes_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept(tmp_path, [0, 1, 3])
    partial, found = resumed(tmp_path)
    written: list[int] = []
    real_pwrite = os.pwrite

    def counting(fd: int, data: bytes, offset: int) -> int:
        written.append(offset // CHUNK)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    assert finish_rest(partial, found) == DATA
    assert written == [2, 4]


def test_a_complete_temporary_file_finishes_without_writes(tmp_path: Path) -> None:
    kept(tmp_path, list(range(5)))
    partial, found = resumed(tmp_path)
    assert found == [0, 1, 2, 3, 4]
    assert partial.finish("out.bin").read_bytes() == DATA


@pytest.mark.parametrize(
    "offsets",
    [[CHUNK + 10], [0, 4 * CHUNK - 1], [len(DATA) - 1], [2 * CHUNK, 2 * CHUNK + 1, 4 * CHUNK]],
)
def test_damaged_chunks_are_not_resumed(tmp_path: Path, offsets: list[int]) -> None:
    kept(tmp_path, list(range(5)))
    for offset in offsets:
        damage(part_of(tmp_path), offset)
    partial, found = resumed(tmp_path)
    damaged = {offset // CHUNK for offset in offsets}
    assert found == [index for index in range(5) if index not in damaged]
    assert finish_rest(partial, found) == DATA


def test_a_chunk_cut_short_by_a_crash_is_not_resumed(tmp_path: Path) -> None:
    kept(tmp_path, list(range(5)))
    os.truncate(part_of(tmp_path), len(DATA) - 1)  # the last chunk lacks its last byte
    partial, found = resumed(tmp_path)
    assert found == [0, 1, 2, 3]
    assert finish_rest(partial, found) == DATA


def test_a_sparse_file_resumes_only_the_chunk_written(tmp_path: Path) -> None:
    kept(tmp_path, [3])
    assert part_of(tmp_path).stat().st_size == 4 * CHUNK  # chunks 0 to 2 are a hole
    partial, found = resumed(tmp_path)
    assert found == [3]
    assert finish_rest(partial, found) == DATA


def file_system_has_holes(folder: Path) -> bool:
    probe = folder / "probe"
    with probe.open("wb") as handle:
        handle.seek(4 * CHUNK)
        handle.write(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) != 0
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_holes_are_not_even_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not file_system_has_holes(tmp_path):
        pytest.skip("this file system does not report holes")
    kept(tmp_path, [3])
    reads: list[int] = []
    real_pread = os.pread

    def recording(fd: int, length: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", recording)
    partial, found = resumed(tmp_path)
    assert found == [3]
    assert reads == [3 * CHUNK]
    partial.discard()


def test_a_temporary_file_longer_than_the_file_is_cut_and_resumed(tmp_path: Path) -> None:
    kept(tmp_path, [0, 4])
    with part_of(tmp_path).open("ab") as handle:
        handle.write(b"junk after the end" * 1000)
    partial, found = resumed(tmp_path)
    assert found == [0, 4]
    assert part_of(tmp_path).stat().st_size == len(DATA)
    assert finish_rest(partial, found) == DATA


def test_junk_where_the_last_chunk_belongs_is_cut_and_not_resumed(tmp_path: Path) -> None:
    kept(tmp_path, [0, 1, 2, 3])
    with part_of(tmp_path).open("ab") as handle:
        handle.write(bytes(len(DATA)))  # zeros over the last chunk and beyond
    partial, found = resumed(tmp_path)
    assert found == [0, 1, 2, 3]
    assert part_of(tmp_path).stat().st_size == len(DATA)
    assert finish_rest(partial, found) == DATA


ZEROS_INSIDE = chunks()[0] + bytes(2 * CHUNK) + chunks()[3] + bytes(100)  # 1, 2, 4: zeros


def test_chunks_of_zeros_resume(tmp_path: Path) -> None:
    kept(tmp_path, list(range(5)), ZEROS_INSIDE)
    partial, found = resumed(tmp_path, ZEROS_INSIDE)
    assert found == [0, 1, 2, 3, 4]
    assert partial.finish("out.bin").read_bytes() == ZEROS_INSIDE


def test_a_hole_where_zeros_belong_still_gives_the_file(tmp_path: Path) -> None:
    """Whether a never-written chunk of zeros counts as found depends on the file system
    reporting holes; either way the bytes are right."""
    kept(tmp_path, [0, 3], ZEROS_INSIDE)
    partial, found = resumed(tmp_path, ZEROS_INSIDE)
    assert {0, 3} <= set(found) <= {0, 1, 2, 3}
    assert finish_rest(partial, found, ZEROS_INSIDE) == ZEROS_INSIDE


def test_a_temporary_file_of_another_manifest_resumes_nothing(tmp_path: Path) -> None:
    """Bytes that match no chunk hash (another file's, say) are all fetched again."""
    other = random.Random(12).randbytes(len(DATA))
    kept(tmp_path, list(range(5)), other)
    partial, found = resumed(tmp_path)
    assert found == []
    assert finish_rest(partial, found) == DATA


@settings(max_examples=40, deadline=None)
@given(
    first=st.lists(st.integers(0, 4), unique=True),
    rest=st.randoms(use_true_random=False),
)
def test_resume_then_writes_in_any_order_give_the_file_and_its_hash(
    first: list[int], rest: random.Random
) -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        kept(folder, first)
        partial, found = resumed(folder)
        assert found == sorted(first)
        missing = [index for index in range(5) if index not in found]
        rest.shuffle(missing)
        parts = chunks()
        for index in missing:
            partial.write(index, parts[index])
        assert partial.finish("out.bin").read_bytes() == DATA  # finish checks completeness


def test_resume_checks_between_chunks_and_can_be_stopped(tmp_path: Path) -> None:
    kept(tmp_path, list(range(5)))
    partial = new_partial(tmp_path)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        partial.resume(check)
    assert len(calls) == 2
    partial.keep()
    partial, found = resumed(tmp_path)  # nothing was lost by the interruption
    assert found == [0, 1, 2, 3, 4]
    partial.discard()


# --- one download per file and folder -------------------------------------------------------


def test_a_second_download_of_the_same_file_is_refused(tmp_path: Path) -> None:
    first = new_partial(tmp_path)
    first.write(0, chunks()[0])
    with pytest.raises(StorageError) as refused:
        new_partial(tmp_path)
    assert str(refused.value) == (
        f"another `sfs-peer get` is downloading this file into {tmp_path}"
    )
    write_all(first, skip=frozenset({0}))  # the first goes on undisturbed
    assert first.finish("out.bin").read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_the_same_file_may_be_downloaded_again_once_kept(tmp_path: Path) -> None:
    first = new_partial(tmp_path)
    first.write(1, chunks()[1])
    first.keep()
    second, found = resumed(tmp_path)
    assert found == [1]
    assert finish_rest(second, found) == DATA


def test_the_same_file_may_be_downloaded_again_once_discarded(tmp_path: Path) -> None:
    first = new_partial(tmp_path)
    first.write(1, chunks()[1])
    first.discard()
    second, found = resumed(tmp_path)
    assert found == []
    assert finish_rest(second, found) == DATA


def test_another_files_download_is_left_alone(tmp_path: Path) -> None:
    other = partial_path(tmp_path, OTHER_ID)
    other.write_bytes(b"another file's download")
    partial = new_partial(tmp_path)
    assert partial.path != other
    write_all(partial)
    assert partial.finish("out.bin").read_bytes() == DATA
    assert other.read_bytes() == b"another file's download"


def test_two_files_download_into_one_folder_at_once(tmp_path: Path) -> None:
    other_data = DATA[::-1]
    one = new_partial(tmp_path)
    two = PartialFile(tmp_path, OTHER_ID, manifest_of(other_data))
    for index, (mine, theirs) in enumerate(zip(chunks(), chunks(other_data), strict=True)):
        one.write(index, mine)
        two.write(index, theirs)
    assert one.finish("one").read_bytes() == DATA
    assert two.finish("two").read_bytes() == other_data


def test_without_locks_a_second_download_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that cannot lock (some network mounts): downloading still works."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    first = new_partial(tmp_path)
    write_all(first)
    first.keep()
    second, found = resumed(tmp_path)
    assert found == [0, 1, 2, 3, 4]
    assert second.finish("out.bin").read_bytes() == DATA


def test_a_temporary_file_removed_before_it_is_locked_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another download may finish (and unlink the file) between our open and our lock:
    the file we locked is then no longer the one with the name."""
    real_flock = fcntl.flock
    locked: list[int] = []

    def raced(fd: int, operation: int) -> None:
        locked.append(os.fstat(fd).st_ino)
        if len(locked) == 1:
            part_of(tmp_path).unlink()  # what the other download does
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", raced)
    partial = new_partial(tmp_path)
    assert len(locked) == 2
    assert partial.path.stat().st_ino == locked[1]
    write_all(partial)
    assert partial.finish("out.bin").read_bytes() == DATA


def test_a_temporary_file_that_keeps_disappearing_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_flock = fcntl.flock

    def vanishing(fd: int, operation: int) -> None:
        part_of(tmp_path).unlink()
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", vanishing)
    before = open_descriptors()
    with pytest.raises(StorageError, match="keeps disappearing"):
        new_partial(tmp_path)
    assert open_descriptors() == before
    assert list(tmp_path.iterdir()) == []


# --- what is in the way is refused, never written through -----------------------------------


def refused(folder: Path) -> StorageError:
    """The error of opening this download where something is in the way; no descriptor
    may stay open, and opening must not block."""
    before = open_descriptors()
    with pytest.raises(StorageError) as error:
        new_partial(folder)
    assert open_descriptors() == before
    return error.value


def test_a_symlink_in_the_way_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    mode = mode_of(victim)
    part_of(tmp_path).symlink_to(victim)
    refused(tmp_path)
    assert part_of(tmp_path).is_symlink()
    assert part_of(tmp_path).readlink() == victim
    assert victim.read_bytes() == b"precious"
    assert mode_of(victim) == mode


def test_a_dangling_symlink_in_the_way_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "created"
    target.parent.mkdir()
    part_of(tmp_path).symlink_to(target)
    refused(tmp_path)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_hard_link_in_the_way_is_refused(tmp_path: Path) -> None:
    """A hard link to some other file of the user's: writing there would change it."""
    other = tmp_path / "other"
    other.write_bytes(b"precious")
    os.link(other, part_of(tmp_path))
    error = refused(tmp_path)
    assert str(error) == (
        f"{part_of(tmp_path)} is in the way and is not a partial download of this user; "
        "move it elsewhere"
    )
    assert other.read_bytes() == b"precious"
    assert other.stat().st_nlink == 2


class Hung(Exception):
    pass


def _hung(signum: int, frame: FrameType | None) -> None:
    raise Hung


def test_a_fifo_in_the_way_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(part_of(tmp_path))
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        error = refused(tmp_path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert "is in the way" in str(error)
    assert stat.S_ISFIFO(part_of(tmp_path).lstat().st_mode)


def test_a_folder_in_the_way_is_refused(tmp_path: Path) -> None:
    part_of(tmp_path).mkdir()
    (part_of(tmp_path) / "inside").write_bytes(b"mine")
    refused(tmp_path)
    assert (part_of(tmp_path) / "inside").read_bytes() == b"mine"


def test_another_users_file_in_the_way_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a shared folder, someone else may plant a file under our temporary name."""
    part_of(tmp_path).write_bytes(b"theirs")
    someone_else = os.getuid() + 1
    monkeypatch.setattr(os, "getuid", lambda: someone_else)
    error = refused(tmp_path)
    assert "is not a partial download of this user" in str(error)
    assert part_of(tmp_path).read_bytes() == b"theirs"


def test_refusal_leaves_the_way_open_once_cleared(tmp_path: Path) -> None:
    os.mkfifo(part_of(tmp_path))
    refused(tmp_path)
    part_of(tmp_path).unlink()
    partial, found = resumed(tmp_path)
    assert found == []
    assert finish_rest(partial, found) == DATA


# --- names and permissions ------------------------------------------------------------------


def finished(folder: Path, name: str, data: bytes = DATA) -> Path:
    partial = new_partial(folder, data)
    write_all(partial, data)
    return partial.finish(name)


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


def test_a_symlink_at_the_final_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out.bin").symlink_to(victim)
    assert finished(tmp_path, "out.bin") == tmp_path / "out (1).bin"
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "out.bin").is_symlink()


def test_partial_file_is_private_and_final_file_follows_umask(
    tmp_path: Path, umask_022: None
) -> None:
    partial = new_partial(tmp_path)
    assert mode_of(partial.path) == 0o600
    write_all(partial)
    assert mode_of(partial.path) == 0o600
    target = partial.finish("out.bin")
    assert mode_of(target) == 0o644


def test_final_file_follows_a_stricter_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        target = finished(tmp_path, "out.bin")
    finally:
        os.umask(previous)
    assert mode_of(target) == 0o640


def test_a_name_taken_at_the_last_moment_is_not_replaced(tmp_path: Path) -> None:
    partial = new_partial(tmp_path)
    write_all(partial)
    (tmp_path / "out.bin").write_bytes(b"created while we downloaded")
    target = partial.finish("out.bin")
    assert target.name == "out (1).bin"
    assert (tmp_path / "out.bin").read_bytes() == b"created while we downloaded"


def test_a_numbered_name_still_fits(tmp_path: Path) -> None:
    long_name = "x" * 251 + ".bin"
    (tmp_path / long_name).write_bytes(b"taken")
    partial = new_partial(tmp_path)
    write_all(partial)
    target = partial.finish(long_name)
    assert target.name.endswith(" (1).bin")
    assert len(target.name.encode()) <= 255
    assert target.read_bytes() == DATA


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


def test_finish_records_the_stamp_of_the_file_it_named(tmp_path: Path) -> None:
    """Taken after the link and the unlink of the temporary name (both move ctime), so a
    seeded copy is served without re-hashing until it changes (see sfs.peer.stamps)."""
    partial = new_partial(tmp_path)
    write_all(partial)
    target = partial.finish("out.bin")
    assert partial.stamp == stamp_of(target.stat())
