"""sfs.peer.reads: the holder's file reads (regular files only, opened without waiting)
and the lanes that run them off the serving loop, one per file."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sfs.common import crypto
from sfs.peer import reads
from sfs.peer.reads import ReadLanes, read_chunk, read_pieces
from sfs.peer.registry import Share
from sfs.peer.transfer import ChunkJob, ChunkOutcome, NotRegularFile

WAIT = 10.0  # generous: only a failure waits this long


def share_at(path: Path, file_id: str = "a" * 32) -> Share:
    return Share(file_id, path, path.name, 0, b"", b"", None, [], 0)


def job(file_id: str, index: int) -> ChunkJob:
    secret = crypto.TransferSecret.generate()
    return ChunkJob(
        b"connection",
        b"t" * 16,
        index,
        share_at(Path("/nonexistent"), file_id),
        0,
        0,
        b"",
        b"",
        crypto.ChunkCipher(secret),
    )


def in_time(function: Callable[..., object], *args: object) -> object:
    """Run `function(*args)` in a thread; its result or exception, or fail after WAIT
    (a blocked open stays blocked in that daemon thread)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(function(*args))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert outcome, f"{function} blocked"
    return outcome[0]


# --- read_chunk ----------------------------------------------------------------------------


def test_a_regular_file_is_read_at_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert read_chunk(share_at(path), 250, 10) == bytes(range(250, 256)) + bytes(range(4))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    os.mkfifo(path)
    try:
        outcome = in_time(read_chunk, share_at(path), 0, 10)
    finally:  # an open that waits for a writer: be one (ENXIO if nobody waits)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(outcome, NotRegularFile)
    assert outcome.kind == "a FIFO"


@pytest.mark.parametrize("kind", ["directory", "character device"])
def test_anything_else_but_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "folder" if kind == "directory" else Path("/dev/null")
    if kind == "directory":
        path.mkdir()
    with pytest.raises(NotRegularFile) as refused:
        read_chunk(share_at(path), 0, 10)
    assert refused.value.kind == f"a {kind}"


def test_a_symlink_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"not shared")
    (tmp_path / "data.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError, match="symbolic links"):
        read_chunk(share_at(tmp_path / "data.bin"), 0, 10)


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_chunk(share_at(tmp_path / "gone.bin"), 0, 10)


# --- read_pieces (a folder share's chunk) ------------------------------------------------


def folder_share(tmp_path: Path) -> Share:
    folder = tmp_path / "shared"
    (folder / "docs" / "deep").mkdir(parents=True)
    (folder / "top.txt").write_bytes(b"top")
    (folder / "docs" / "deep" / "notes.txt").write_bytes(b"0123456789")
    return share_at(folder)


def test_a_folder_chunk_is_read_from_the_files_it_spans(tmp_path: Path) -> None:
    share = folder_share(tmp_path)
    pieces = (("top.txt", 1, 2), ("docs/deep/notes.txt", 0, 4), ("docs/deep/notes.txt", 8, 2))
    assert read_pieces(share, pieces) == b"op" + b"0123" + b"89"


@pytest.mark.parametrize("swapped", ["docs", "docs/deep"])
def test_a_folder_swapped_for_a_link_is_not_followed(tmp_path: Path, swapped: str) -> None:
    # The same bytes outside the tree: only the walk refuses them (the hash would pass).
    share = folder_share(tmp_path)
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "notes.txt").write_bytes(b"0123456789")
    (outside / "notes.txt").write_bytes(b"0123456789")
    inside = share.path / swapped
    inside.rename(tmp_path / "moved")
    inside.symlink_to(outside if swapped == "docs" else outside / "deep")
    with pytest.raises(OSError):
        read_pieces(share, (("docs/deep/notes.txt", 0, 10),))


def test_a_share_folder_swapped_for_a_link_is_not_followed(tmp_path: Path) -> None:
    share = folder_share(tmp_path)
    share.path.rename(tmp_path / "moved")
    share.path.symlink_to(tmp_path / "moved")
    with pytest.raises(OSError):
        read_pieces(share, (("top.txt", 0, 3),))


def test_a_fifo_in_a_folder_share_is_refused_without_waiting(tmp_path: Path) -> None:
    share = folder_share(tmp_path)
    os.mkfifo(share.path / "fifo")
    try:
        outcome = in_time(read_pieces, share, (("fifo", 0, 3),))
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(share.path / "fifo", os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(outcome, NotRegularFile)


def test_a_folder_chunk_closes_every_descriptor_it_opened(tmp_path: Path) -> None:
    share = folder_share(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        read_pieces(share, (("top.txt", 0, 3), ("docs/deep/notes.txt", 0, 10)))
    with pytest.raises(OSError):
        read_pieces(share, (("top.txt", 0, 3), ("docs/missing/x", 0, 1)))
    assert len(os.listdir("/proc/self/fd")) == before


# --- ReadLanes -----------------------------------------------------------------------------


class Reads:
    """A read function whose reads of `stuck` files wait for `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stuck: set[str] = set()
        self.started = threading.Semaphore(0)

    def __call__(self, job: ChunkJob) -> ChunkOutcome:
        self.started.release()
        if job.share.file_id in self.stuck:
            self.release.wait(WAIT)
        return f"{job.share.file_id[0]}{job.index}".encode()


@pytest.fixture
def work() -> Iterator[Reads]:
    reads_ = Reads()
    yield reads_
    reads_.release.set()


def collect(lanes: ReadLanes, count: int) -> list[bytes]:
    """The outcomes of the next `count` finished reads, waiting on `wakeup_fd`."""
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {got} finished"
        select.select([lanes.wakeup_fd], [], [], left)
        got += [outcome for _, outcome in lanes.finished() if isinstance(outcome, bytes)]
    return got


def test_a_file_whose_read_hangs_stalls_only_its_own_lane(work: Reads) -> None:
    work.stuck.add("s" * 32)
    lanes = ReadLanes(work)
    try:
        assert lanes.submit(job("s" * 32, 0))
        assert work.started.acquire(timeout=WAIT)  # the stuck read is under way
        assert lanes.submit(job("s" * 32, 1))
        for index in range(3):
            assert lanes.submit(job("f" * 32, index))
        assert collect(lanes, 3) == [b"f0", b"f1", b"f2"]  # in order, within a lane
        work.release.set()
        assert collect(lanes, 2) == [b"s0", b"s1"]
    finally:
        lanes.close()


def test_a_lane_refuses_more_than_its_limit_of_waiting_reads(
    work: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads, "MAX_WAITING_PER_LANE", 3)
    work.stuck.add("s" * 32)
    lanes = ReadLanes(work)
    try:
        assert all(lanes.submit(job("s" * 32, index)) for index in range(3))
        assert not lanes.submit(job("s" * 32, 3))
        assert lanes.submit(job("f" * 32, 0))  # other files are not affected
        assert collect(lanes, 1) == [b"f0"]
    finally:
        lanes.close()


def test_idle_lanes_end_and_close_closes_the_wakeup_pipe(
    work: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads, "LANE_LINGER", 0.05)
    lanes = ReadLanes(work)
    for file_id in ("a" * 32, "b" * 32):
        assert lanes.submit(job(file_id, 0))
    assert sorted(collect(lanes, 2)) == [b"a0", b"b0"]
    deadline = time.monotonic() + WAIT
    while lanes.lanes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lanes.lanes == 0
    fd = lanes.wakeup_fd
    lanes.close()
    assert lanes.wakeup_fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_leaves_the_pipe_to_a_read_that_is_still_running(work: Reads) -> None:
    work.stuck.add("s" * 32)
    lanes = ReadLanes(work)
    assert lanes.submit(job("s" * 32, 0))
    assert work.started.acquire(timeout=WAIT)
    lanes.close()
    assert lanes.wakeup_fd != -1  # the stuck lane may still write to it
    work.release.set()
    deadline = time.monotonic() + WAIT
    while lanes.lanes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lanes.lanes == 0
    assert lanes.wakeup_fd == -1
