"""Holders that misbehave while others serve, against real processes.

- A stuck holder: a seeder frozen with SIGSTOP, or an account that `hold`s the file and
  advertises an endpoint that accepts connections and never answers. The broker lists
  it as online, so every download says hello to it. Stopped by: the download ends when
  its last chunk is verified, and a holder that has not answered its hello within
  `hello_timeout` while others deliver is set aside.
- A forging seeder: mallory downloaded the file and serves it with a patched `sfs-peer`
  that seals other bytes under the real transfer key, so every GCM tag is good and only
  the owner's signed manifest shows the forgery. Stopped by: the manifest check convicts
  mallory alone; the chunks verified from the others stay in the `.part` file.

The broker's `presence_ttl` is long here, so that a frozen seeder stays listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, Peer, Result, command_for, one_line_error, wait_for_partial

MiB = 1 << 20
CHUNK = MiB  # the manifest's chunk size for files of these sizes
PEER_TIMEOUT = 60  # long: a stuck holder must not make a download wait for it
HELLO_TIMEOUT = 1


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def with_timeout(peer: Peer, seconds: int) -> None:
    """Rewrite the harness's `timeout` line of `peer`'s config in place."""
    text, count = re.subn(
        r"^timeout: .*$", f"timeout: {seconds}", peer.config.read_text(), flags=re.M
    )
    assert count == 1
    peer.config.write_text(text)


class BlackHole:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                self._held.append(self._listener.accept()[0])

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._listener.close()
        for held in self._held:
            held.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker(presence_ttl=600)
        yield running


def timed_get(peer: Peer, file_id: str) -> tuple[Result, float]:
    started = time.monotonic()
    result = peer.run("get", file_id, "--json", timeout=3 * PEER_TIMEOUT)
    return result, time.monotonic() - started


@pytest.mark.parametrize("stuck", ["frozen seeder", "black-hole endpoint"])
def test_a_stuck_holder_does_not_hold_up_a_download(cluster: Cluster, stuck: str) -> None:
    alice = cluster.add_peer("alice", serve=True)
    source = cluster.root / "data.bin"
    expected = make_file(source, 8 * MiB)
    file_id = alice.share(source)

    hole = BlackHole()
    try:
        if stuck == "frozen seeder":
            bob = cluster.add_peer("bob")
        else:  # bob holds the file, and tells the broker to send everyone to the hole
            bob = cluster.add_peer("bob", advertise=f"tcp://127.0.0.1:{hole.port}")
        assert bob.run("get", file_id, "--json").check().json()["seeding"] is True
        seeder = bob.serve()
        if stuck == "frozen seeder":
            seeder.popen.send_signal(signal.SIGSTOP)
        try:
            carol = cluster.add_peer("carol", hello_timeout=HELLO_TIMEOUT)
            with_timeout(carol, PEER_TIMEOUT)
            result, seconds = timed_get(carol, file_id)
        finally:
            if stuck == "frozen seeder":
                seeder.popen.send_signal(signal.SIGCONT)
        if stuck == "black-hole endpoint":
            assert hole.connections > 0, "nobody tried the listed endpoint"
    finally:
        hole.close()

    got = result.check().json()
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == expected
    assert got["holders"] == ["alice"]
    # Without the fix carol waits out the whole 60 s timeout for bob's answer.
    assert seconds < PEER_TIMEOUT / 2, f"the download took {seconds:.1f} s"


# Run `sfs-peer` with every chunk it seals changed first: a holder that encrypts forged
# bytes under the real transfer key, which only the signed manifest can catch.
_FORGER = """
import sys
from sfs.common import crypto
real_seal = crypto.ChunkCipher.seal
def seal(self, index, plaintext, associated_data):
    return real_seal(self, index, bytes([plaintext[0] ^ 1]) + plaintext[1:], associated_data)
crypto.ChunkCipher.seal = seal
sys.argv[0] = "sfs-peer"
from sfs.peer.cli import main
main()
"""


def verified_and_empty(partial: Path, source: Path) -> tuple[int, int]:
    """How many chunks of `partial` hold the source's bytes, and how many hold zeros
    (never written); anything else is a chunk that should not be there."""
    verified = empty = 0
    with partial.open("rb") as kept, source.open("rb") as original:
        while block := original.read(CHUNK):
            on_disk = kept.read(CHUNK)
            if on_disk == block:
                verified += 1
            elif on_disk.count(0) == len(on_disk):
                empty += 1
            else:
                raise AssertionError("the .part file holds a chunk that is not the source's")
    return verified, empty


def test_a_forging_seeder_does_not_wipe_progress(cluster: Cluster) -> None:
    """mallory forges every chunk; alice is killed mid-download, so no holder is left.
    bob keeps every chunk alice sent (all verified) and nothing of mallory's, is told
    who forged, and his next `get` (alice back, mallory still forging) fetches only the
    rest, from alice."""
    size = 64 * MiB
    alice = cluster.add_peer("alice", serve=True)
    source = cluster.root / "big.bin"
    expected = make_file(source, size)
    file_id = alice.share(source)
    mallory = cluster.add_peer("mallory")
    assert mallory.run("get", file_id, "--json").check().json()["seeding"] is True
    cluster.start(
        "mallory-serve",
        [sys.executable, "-c", _FORGER, "serve", "--config", str(mallory.config)],
        ready="serving on",
    )

    bob = cluster.add_peer("bob", window=1)  # one chunk at a time: slow enough to cut
    getting = subprocess.Popen(
        [*command_for("sfs-peer"), "get", file_id, "--config", str(bob.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cluster.root,
    )
    wait_for_partial(bob.download_dir, 4 * CHUNK)
    assert alice.server is not None
    alice.server.kill()
    out, err = getting.communicate(timeout=120)
    result = Result([str(arg) for arg in getting.args], getting.returncode, out, err)

    message = one_line_error(result)
    assert re.fullmatch(
        r"error: chunk \d+ from mallory does not match the owner's signed manifest: "
        r"mallory's copy may have changed since it was shared, or be forged "
        r"\([0-9.]+ MiB of 64\.0 MiB kept: run the same get again to resume\)",
        message,
    ), message
    assert result.returncode == 3
    partial = bob.download_dir / f".sfs-{file_id}.part"
    assert [path.name for path in bob.download_dir.iterdir()] == [partial.name]
    verified, _ = verified_and_empty(partial, source)
    assert verified > 0, "nothing was kept"

    alice.serve()
    got = bob.run("get", file_id, "--json").check().json()
    assert got["chunks_resumed"] == verified
    assert got["bytes"] == size - verified * CHUNK
    assert got["holders"] == ["alice"]
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == expected
    assert sorted(path.name for path in bob.download_dir.iterdir()) == ["big.bin"]
