"""`upload_rate` in the peer config: `serve` sends the chunks of all its transfers
together at most that fast. Only lower bounds on time are checked: load cannot make a
capped transfer faster, so they cannot flake."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from sfs.common.config import MIN_UPLOAD_RATE
from sfs.peer.node import Peer
from sfs.peer.pacing import UploadPacer
from tests.integration.conftest import Network

MiB = 1024 * 1024
RATE = MIN_UPLOAD_RATE  # 128 KiB/s: a 1 MiB chunk every 8 s


def patient(peer: Peer) -> Peer:
    """A Peer of its own for a thread (SQLite connections stay in theirs) that waits for
    capped chunks, seconds apart, longer than the tests' 3 s."""
    return Peer(dataclasses.replace(peer.config, timeout=60))


def test_the_cap_holds_for_all_transfers_together(network: Network, tmp_path: Path) -> None:
    """Two downloads of 1 MiB (one 1 MiB chunk each) at once through one 128 KiB/s cap.
    The bucket holds at most a second's worth and lets one chunk go into debt, so the
    second chunk leaves at least (1 MiB - 128 KiB) / 128 KiB/s = 7 s after the first; a
    cap per transfer would let both chunks go at once."""
    alice = network.add("alice", serve=True, upload_rate=RATE)
    assert alice.config.upload_rate == RATE
    downloaders = [network.add(name) for name in ("bob", "carol")]
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(MiB))
    share = alice.share(source)
    failures: list[BaseException] = []

    def fetch(peer: Peer) -> None:
        own = patient(peer)
        try:
            own.get(share.file_id)
        except BaseException as exc:
            failures.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=fetch, args=(peer,)) for peer in downloaders]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    elapsed = time.monotonic() - started
    assert not failures, failures
    for peer in downloaders:
        assert (peer.config.download_dir / "data.bin").read_bytes() == source.read_bytes()
    assert elapsed >= (MiB - RATE) / RATE


def test_the_cap_is_off_by_default(network: Network) -> None:
    alice = network.add("alice")
    assert alice.config.upload_rate == 0
    assert not UploadPacer(alice.config.upload_rate).enabled
