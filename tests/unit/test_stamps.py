"""sfs.peer.stamps and their use: the holder skips the SHA-256 of a chunk only while the
file's stamp (device, inode, size, mtime, ctime) is the one recorded when it was shared,
and refuses the file once it is not."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from pathlib import Path

import pytest

from sfs.common import crypto
from sfs.common.tree_hash import blake3_256
from sfs.peer.reads import read_chunk
from sfs.peer.registry import Share, ShareRegistry
from sfs.peer.stamps import FileStamp, decode_stamp, stamp_of
from sfs.peer.transfer import ChangedSinceShared, ChunkJob, HolderService, ReadFailure, Unchanged

CONTENT = bytes(range(256)) * 64  # 16 KiB


def shared(path: Path, stamp: FileStamp | None) -> Share:
    return Share("a" * 32, path, path.name, len(CONTENT), b"", b"", None, [], 0, stamp=stamp)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(CONTENT)
    return path


def test_a_stamp_round_trips_and_junk_reads_as_none() -> None:
    stamp = FileStamp(1, 2, 3, 4_000_000_001, 5_000_000_002)
    assert decode_stamp(stamp.encode()) == stamp
    for junk in (None, "", "[1, 2]", '["1", 2, 3, 4, 5]', "[1, 2, 3, 4, true]", "{}"):
        assert decode_stamp(junk) is None


def test_unchanged_file_is_read_without_a_hash(source: Path) -> None:
    share = shared(source, stamp_of(source.stat()))
    assert read_chunk(share, 4096, 4096) == Unchanged(CONTENT[4096:8192])


def test_without_a_stamp_the_bytes_are_returned_for_hashing(source: Path) -> None:
    """A share recorded before stamps existed: every chunk is hashed, as before."""
    assert read_chunk(shared(source, None), 0, 10) == CONTENT[:10]


def rewrite_same_size(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.write(b"\xff")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(rewrite_same_size, id="rewritten in place, same size"),
        pytest.param(lambda p: p.write_bytes(CONTENT + b"x"), id="grown"),
        pytest.param(lambda p: os.utime(p), id="touched"),
        pytest.param(lambda p: p.chmod(0o600), id="chmod"),
    ],
)
def test_any_change_to_the_file_refuses_it(source: Path, change: object) -> None:
    share = shared(source, stamp_of(source.stat()))
    time.sleep(0.01)  # past the file system's timestamp granularity
    change(source)  # type: ignore[operator]
    with pytest.raises(ChangedSinceShared):
        read_chunk(share, 0, 4096)


def test_mtime_set_back_does_not_hide_a_change(source: Path) -> None:
    """`touch -d` can restore the old mtime after a write; ctime it cannot."""
    before = source.stat()
    share = shared(source, stamp_of(before))
    time.sleep(0.01)
    rewrite_same_size(source)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert source.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(ChangedSinceShared):
        read_chunk(share, 0, 4096)


def test_a_file_replaced_by_a_copy_is_refused(source: Path, tmp_path: Path) -> None:
    """Same bytes, same size, mtime copied: another inode."""
    share = shared(source, stamp_of(source.stat()))
    copy = tmp_path / "copy"
    copy.write_bytes(CONTENT)
    before = source.stat()
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    copy.replace(source)
    with pytest.raises(ChangedSinceShared):
        read_chunk(share, 0, 4096)


def holder_read(share: Share, reader: object) -> tuple[object, list[tuple[Share, bool]]]:
    failed: list[tuple[Share, bool]] = []
    service = HolderService(
        None,  # type: ignore[arg-type]  # reads need no identity
        lambda _: share,
        lambda name, bundle: None,
        reader,  # type: ignore[arg-type]
        on_failed_read=lambda s, changed: failed.append((s, changed)),
    )
    job = ChunkJob(
        b"c",
        b"t" * 16,
        0,
        share,
        0,
        4096,
        blake3_256(CONTENT[:4096]),
        b"ad",
        crypto.ChunkCipher(crypto.TransferSecret.generate()),
    )
    return service.read(job), failed


def test_the_holder_refuses_a_changed_file_as_changed(source: Path) -> None:
    """Told to the requester and the log as before, and marked `changed`, so a seeded
    copy is checked (`SeedKeeper`)."""
    share = shared(source, stamp_of(source.stat()))
    time.sleep(0.01)
    rewrite_same_size(source)
    outcome, _ = holder_read(share, read_chunk)
    assert isinstance(outcome, ReadFailure)
    assert outcome.changed
    assert outcome.to_requester == "data.bin changed on the holder since it was shared"
    assert "changed since it was shared; run share again" in outcome.to_log


def test_plain_bytes_are_still_hashed_and_a_short_read_always_refused(source: Path) -> None:
    share = shared(source, None)
    outcome, _ = holder_read(share, lambda s, o, n: b"\0" * n)
    assert isinstance(outcome, ReadFailure) and outcome.changed
    outcome, _ = holder_read(share, lambda s, o, n: Unchanged(CONTENT[: n - 1]))
    assert isinstance(outcome, ReadFailure) and outcome.changed
    outcome, _ = holder_read(share, lambda s, o, n: Unchanged(CONTENT[:n]))
    assert isinstance(outcome, bytes)


def test_bytes_changed_under_an_unchanged_stamp_are_never_sent(source: Path) -> None:
    """Writes through a shared mmap can change a page without touching mtime or ctime
    until writeback: an unchanged stamp must not stand in for the manifest's hash."""
    share = shared(source, stamp_of(source.stat()))
    changed = bytes(b ^ 1 for b in CONTENT)
    outcome, _ = holder_read(share, lambda s, o, n: Unchanged(changed[o : o + n]))
    assert isinstance(outcome, ReadFailure) and outcome.changed


def test_the_registry_keeps_the_stamp(tmp_path: Path, source: Path) -> None:
    stamp = stamp_of(source.stat())
    registry = ShareRegistry(tmp_path / "shares.db")
    registry.add(shared(source, stamp))
    registry.add(dataclasses.replace(shared(source, None), file_id="b" * 32))
    assert registry.get("a" * 32) == shared(source, stamp)
    assert registry.get("b" * 32).stamp is None  # type: ignore[union-attr]
    registry.close()


def test_a_registry_from_before_stamps_is_migrated(tmp_path: Path, source: Path) -> None:
    """Its shares have no stamp (hashed as before); new ones get one."""
    path = tmp_path / "shares.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE shares (file_id TEXT PRIMARY KEY, path TEXT NOT NULL, name TEXT NOT NULL,"
        " size INTEGER NOT NULL, manifest BLOB NOT NULL, signature BLOB NOT NULL, access TEXT,"
        " keywords TEXT NOT NULL, shared_at INTEGER NOT NULL, owner TEXT,"
        " grant_signature BLOB NOT NULL DEFAULT x'')"
    )
    old.execute(
        "INSERT INTO shares VALUES (?, ?, 'data.bin', 1, x'', x'', NULL, '[]', 0, NULL, x'')",
        ("c" * 32, str(source)),
    )
    old.commit()
    old.close()
    registry = ShareRegistry(path)
    assert registry.get("c" * 32).stamp is None  # type: ignore[union-attr]
    registry.add(shared(source, stamp_of(source.stat())))
    assert registry.get("a" * 32).stamp == stamp_of(source.stat())  # type: ignore[union-attr]
    registry.close()
