"""Failures in the middle of a download, with real processes: the holder dies, the
receiver dies, the download folder fills up or cannot be written at all.

Each must end with one clear line and the documented exit code, leave no final file,
and leave the holder serving. A download cut short (the holder gone, the receiver
killed or interrupted) keeps its verified chunks in its hidden `.part` file, and the
next `get` fetches exactly the missing ones. A full or unusable folder keeps nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import (
    Cluster,
    Peer,
    Result,
    command_for,
    one_line_error,
    snapshot,
    wait_for_partial,
)

MiB = 1024 * 1024
BIG_SIZE = 64 * MiB
CHUNK = MiB  # the manifest's chunk size for files this small


@dataclass
class World:
    cluster: Cluster
    alice: Peer
    bob: Peer  # window: 1, so that a download takes a while
    carol: Peer
    big_id: str
    big_sha256: str
    small_id: str
    small: bytes


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob", window=1)
        carol = cluster.add_peer("carol")
        big, digest = cluster.root / "big.bin", hashlib.sha256()
        with big.open("wb") as out:
            for _ in range(BIG_SIZE // MiB):
                block = os.urandom(MiB)
                digest.update(block)
                out.write(block)
        small = os.urandom(100_000)
        (cluster.root / "small.bin").write_bytes(small)

        def share(name: str) -> str:
            args = ("share", str(cluster.root / name), "--json")
            return str(alice.run(*args).check().json()["file_id"])

        big_id, small_id = share("big.bin"), share("small.bin")
        yield World(cluster, alice, bob, carol, big_id, digest.hexdigest(), small_id, small)


def start_get(
    peer: Peer,
    file_id: str,
    *extra: str,
    preexec_fn: Callable[[], None] | None = None,
    argv: list[str] | None = None,
) -> subprocess.Popen[str]:
    """`sfs-peer get` in the background (`argv`: run this instead of `sfs-peer`)."""
    return subprocess.Popen(
        [*(argv or command_for("sfs-peer")), "get", file_id, *extra, "--config", str(peer.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=peer.cluster.root,
        preexec_fn=preexec_fn,
    )


def finish(popen: subprocess.Popen[str], timeout: float = 60) -> Result:
    """Wait for a background command; its result."""
    out, err = popen.communicate(timeout=timeout)
    assert isinstance(popen.args, list)
    return Result([str(arg) for arg in popen.args], popen.returncode, out, err)


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".sfs-*.part")) if folder.exists() else []


def endpoint_of(peer: Peer) -> str:
    for line in peer.config.read_text().splitlines():
        if line.startswith("listen: "):
            return line.removeprefix("listen: ")
    raise AssertionError("no listen line")


def serves_others(world: World, peer: Peer) -> None:
    """alice's holder is up, logged no traceback, and `peer` downloads from it."""
    assert world.alice.server is not None and world.alice.server.alive()
    assert "Traceback" not in world.alice.server.output()
    got = peer.run("get", world.small_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == world.small


# --- a process dies ---------------------------------------------------------------------


def assert_resumes(world: World, peer: Peer) -> None:
    """`peer`'s next `get` of the big file fetches exactly the chunks its `.part` file
    lacks, and gives the right file; the folder is then cleaned for the next test."""
    (partial,) = partial_files(peer.download_dir)
    assert partial.name == f".sfs-{world.big_id}.part"
    source = world.cluster.root / "big.bin"
    verified = 0
    with partial.open("rb") as kept, source.open("rb") as original:
        while block := original.read(CHUNK):
            verified += kept.read(CHUNK) == block
    assert verified > 0, "nothing was kept"

    got = peer.run("get", world.big_id, "--json").check().json()
    assert got["chunks_resumed"] == verified
    assert got["bytes"] == BIG_SIZE - verified * CHUNK  # not even one window more
    digest = hashlib.sha256()
    with Path(got["path"]).open("rb") as saved:
        while block := saved.read(MiB):
            digest.update(block)
    assert digest.hexdigest() == world.big_sha256
    assert partial_files(peer.download_dir) == []
    Path(got["path"]).unlink()  # keep the folder small for the next tests


def test_the_holder_dies_mid_transfer(world: World) -> None:
    """SIGKILL of alice's serve while bob downloads. Stopped by: the receiver's timeout
    on each chunk; the verified chunks are kept, and the next `get` resumes."""
    alice, bob = world.alice, world.bob
    before = snapshot(bob.download_dir)
    getting = start_get(bob, world.big_id)
    wait_for_partial(bob.download_dir, 2 * CHUNK)
    assert alice.server is not None
    log = alice.server.output()
    alice.server.kill()

    result = finish(getting)
    cut = f"error: alice at {endpoint_of(alice)} did not send the next chunk within 5 s"
    message = one_line_error(result)
    assert message.startswith(cut + " (")
    assert message.endswith(" of 64.0 MiB kept: run the same get again to resume)")
    assert result.returncode == 5
    assert set(snapshot(bob.download_dir)) - set(before) == {f".sfs-{world.big_id}.part"}
    assert "Traceback" not in log

    alice.serve()  # back up: the download resumes
    assert_resumes(world, bob)
    serves_others(world, bob)


def test_the_receiver_dies_mid_transfer(world: World) -> None:
    """SIGKILL of bob's `get`: it cannot clean up, but no final file may appear, the
    holder goes on serving, and the next `get` fetches only what is missing. Stopped
    by: the final name is only made once the whole file is verified; the `.part` file
    is trusted chunk by chunk, against the signed manifest."""
    bob = world.bob
    before = snapshot(bob.download_dir)
    getting = start_get(bob, world.big_id)
    wait_for_partial(bob.download_dir, 2 * CHUNK)
    getting.kill()
    assert getting.wait(10) == -signal.SIGKILL
    getting.communicate()

    assert set(snapshot(bob.download_dir)) - set(before) == {f".sfs-{world.big_id}.part"}
    serves_others(world, world.carol)
    assert_resumes(world, bob)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_receiver_is_interrupted_mid_transfer(world: World, sig: int) -> None:
    """Stopped by: the CLI turns both signals into a clean stop that tells the holder
    (`finish`) and keeps the verified chunks for the next `get`."""
    bob = world.bob
    before = snapshot(bob.download_dir)
    # Started the way a shell starts a background job: with SIGINT ignored.
    getting = start_get(bob, world.big_id, preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
    wait_for_partial(bob.download_dir, 2 * CHUNK)
    getting.send_signal(sig)

    result = finish(getting)
    part = bob.download_dir / f".sfs-{world.big_id}.part"
    assert one_line_error(result) == (
        f"error: interrupted; the verified chunks are kept in {part}:"
        f" run the same `sfs-peer get {world.big_id}` to resume"
    )
    assert result.returncode == 130
    assert set(snapshot(bob.download_dir)) - set(before) == {f".sfs-{world.big_id}.part"}
    serves_others(world, bob)
    assert_resumes(world, bob)


# --- the download folder ------------------------------------------------------------------


def file_size_limit(limit: int) -> Callable[[], None]:
    """For the child: files may not grow past `limit` (a write that would is cut short,
    the next one fails with EFBIG; Python ignores SIGXFSZ)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# Run `sfs-peer` with os.pwrite failing with ENOSPC once 3 MiB are written: a full
# disk, which cannot be made honestly without mounting a small file system.
_FULL_DISK = """
import errno, os, sys
written, real_pwrite = 0, os.pwrite
def pwrite(fd, data, offset):
    global written
    if written >= 3 * 1024 * 1024:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    written += len(data)
    return real_pwrite(fd, data, offset)
os.pwrite = pwrite
sys.argv[0] = "sfs-peer"
from sfs.peer.cli import main
main()
"""


@pytest.mark.parametrize("cause", ["size limit at a chunk", "size limit mid-chunk", "no space"])
def test_a_full_download_folder(world: World, cause: str) -> None:
    """Stopped by: the write error, turned into a `StorageError`; the download is
    cancelled and its temporary file removed."""
    bob = world.bob
    before = snapshot(bob.download_dir)
    if cause.startswith("size limit"):
        limit = 4 * MiB if cause == "size limit at a chunk" else 4 * MiB + MiB // 2
        getting = start_get(bob, world.big_id, preexec_fn=file_size_limit(limit))
        expected = (
            f"error: cannot write in {bob.download_dir}: the file is larger than this "
            "file system (or a size limit) allows"
        )
    else:
        getting = start_get(bob, world.big_id, argv=[sys.executable, "-c", _FULL_DISK])
        expected = f"error: no space left in {bob.download_dir}"

    result = finish(getting)
    assert one_line_error(result) == expected
    assert result.returncode == 1
    assert snapshot(bob.download_dir) == before
    serves_others(world, world.carol)


def refusal_of(folder: Path) -> str:
    """What creating a file in `folder` fails with, here and now (as root)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError as exc:
        return exc.strerror or ""
    os.close(fd)
    os.unlink(name)
    raise AssertionError(f"{folder} is writable")


@pytest.mark.parametrize("where", ["a regular file", "inside a regular file", "/sys", "/proc"])
def test_an_unwritable_download_folder(world: World, where: str) -> None:
    """Folders that even root cannot write in. Stopped by: creating the folder or the
    temporary file fails before the holder is contacted."""
    cluster, bob = world.cluster, world.bob
    blocker = cluster.root / "blocker"
    blocker.write_text("a file, not a folder\n")
    folder = {
        "a regular file": blocker,
        "inside a regular file": blocker / "downloads",
        "/sys": Path("/sys"),
        "/proc": Path("/proc/sfs-downloads"),
    }[where]
    expected = {
        "a regular file": f"error: cannot write in {folder}: that path is not a folder",
        "inside a regular file": f"error: cannot write in {folder}: that path is not a folder",
        "/sys": f"error: cannot write in {folder}: {refusal_of(folder)}",
        "/proc": f"error: cannot write in {folder}: {os.strerror(errno.ENOENT)}",
    }[where]
    config = cluster.root / "bob-elsewhere.yaml"
    config.write_text(
        bob.config.read_text().replace("download_dir: bob/downloads", f"download_dir: {folder}")
    )
    elsewhere = Peer(cluster, "bob", config, bob.password)
    before = snapshot(bob.download_dir)

    result = elsewhere.run("get", world.small_id)
    assert one_line_error(result) == expected
    assert result.returncode == 1
    assert blocker.read_text() == "a file, not a folder\n"
    assert not folder.exists() or folder in (blocker, Path("/sys"))
    assert snapshot(bob.download_dir) == before
    serves_others(world, bob)
