"""End-to-end transfers between real peers over loopback, and every way they must fail."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from sfs.broker import service
from sfs.common import crypto, protocol
from sfs.common.errors import (
    IntegrityError,
    ProtocolError,
    RemoteError,
    StorageError,
    TransportError,
    TrustError,
    UsageError,
)
from sfs.common.identity import KeyBundle
from sfs.common.manifest import DEFAULT_CHUNK_SIZE, file_id_of, verify_manifest
from sfs.peer.download import DownloadInterrupted, DownloadResult, OwnerOffline
from sfs.peer.node import AlreadyDownloaded, Peer
from sfs.peer.registry import Share
from sfs.peer.session import NotLoggedIn
from sfs.peer.share import build_manifest
from sfs.peer.transfer import Attached, HolderService
from sfs.peer.tree_scan import build_tree
from tests.harness import free_port
from tests.integration.conftest import Network

MiB = 1024 * 1024


def write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def alice_shares_with_bob(network: Network, tmp_path: Path, size: int) -> tuple[Peer, Peer, Share]:
    """alice serves a random `size`-byte data.bin shared with everyone; bob is registered."""
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    write(tmp_path / "data.bin", size)
    return alice, bob, alice.share(tmp_path / "data.bin")


def count_holder_frames(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every frame any holder in this process receives."""
    seen: list[bytes] = []
    original = HolderService.handle

    def spy(self: HolderService, connection: bytes, key: bytes | None, frame: bytes) -> list[bytes]:
        seen.append(frame)
        return original(self, connection, key, frame)

    monkeypatch.setattr(HolderService, "handle", spy)
    return seen


@pytest.mark.parametrize(
    "size",
    [0, 1, 1000, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE + 1, 3 * MiB + 12345],
    ids=["empty", "one-byte", "small", "exactly-one-chunk", "one-chunk-plus-one", "multi-chunk"],
)
def test_round_trip(network: Network, tmp_path: Path, size: int) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    data = write(tmp_path / "original.bin", size)
    share = alice.share(tmp_path / "original.bin", keywords=["Test"])

    result = bob.get(share.file_id)

    assert result.path == bob.config.download_dir / "original.bin"
    assert result.path.read_bytes() == data
    assert result.holders == (["alice"] if size else [])  # an empty file has no chunks
    assert (result.bytes_fetched, result.chunks_resumed) == (size, 0)
    assert leftovers(bob.config.download_dir) == ["original.bin"]  # no .part file left


def test_second_download_is_already_there_unless_forced(network: Network, tmp_path: Path) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    write(tmp_path / "notes.txt", 100)
    share = alice.share(tmp_path / "notes.txt")
    first = bob.get(share.file_id)
    again = bob.get(share.file_id)
    assert isinstance(again, AlreadyDownloaded) and again.path == first.path
    second = bob.get(share.file_id, force=True)
    assert first.path.name == "notes.txt"
    assert second.path.name == "notes (1).txt"
    assert first.path.read_bytes() == second.path.read_bytes()


def test_a_different_file_under_the_name_is_not_already_there(
    network: Network, tmp_path: Path
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    data = write(tmp_path / "notes.txt", 100)
    share = alice.share(tmp_path / "notes.txt")
    bob.config.download_dir.mkdir(parents=True)
    (bob.config.download_dir / "notes.txt").write_bytes(bytes(100))  # same size, other bytes
    result = bob.get(share.file_id)
    assert isinstance(result, DownloadResult)
    assert result.path.name == "notes (1).txt" and result.path.read_bytes() == data


def test_getting_ones_own_file_is_refused(network: Network, tmp_path: Path) -> None:
    alice = network.add("alice", serve=True)
    write(tmp_path / "notes.txt", 100)
    share = alice.share(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="your own file"):
        alice.get(share.file_id)
    assert not alice.config.download_dir.exists()


def test_download_into_another_folder(network: Network, tmp_path: Path) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    data = write(tmp_path / "a.bin", 5000)
    share = alice.share(tmp_path / "a.bin")
    result = bob.get(share.file_id, out=tmp_path / "elsewhere" / "deep")
    assert result.path == tmp_path / "elsewhere" / "deep" / "a.bin"
    assert result.path.read_bytes() == data


def test_holder_serves_several_requesters_at_once(network: Network, tmp_path: Path) -> None:
    alice = network.add("alice", serve=True)
    requesters = [network.add(name) for name in ("bob", "carol", "dave")]
    data = write(tmp_path / "big.bin", 6 * MiB)
    share = alice.share(tmp_path / "big.bin")
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def fetch(peer: Peer) -> None:
        own = Peer(peer.config)  # one Peer per thread, as one process per user
        try:
            results[peer.config.username] = own.get(share.file_id).path.read_bytes()
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=fetch, args=(p,)) for p in requesters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert results == {"bob": data, "carol": data, "dave": data}


# --- a bad chunk drops its holder; with none left, only verified chunks stay -------------


def sealing(monkeypatch: pytest.MonkeyPatch, change: Callable[[int, bytes], bytes]) -> None:
    """Every holder in this process seals `change(index, plaintext)` instead: a modified
    holder, whose chunks are authentic under the real transfer key."""
    real_seal = crypto.ChunkCipher.seal

    def seal(self: crypto.ChunkCipher, index: int, plaintext: bytes, data: bytes) -> bytes:
        return real_seal(self, index, change(index, plaintext), data)

    monkeypatch.setattr(crypto.ChunkCipher, "seal", seal)


def kept_chunks(bob: Peer, share: Share, data: bytes) -> int:
    """How many chunks bob's `.part` file holds; each must be the shared file's (the
    rest are never-written zeros)."""
    (partial,) = leftovers(bob.config.download_dir)
    assert partial == f".sfs-{share.file_id}.part"
    kept = (bob.config.download_dir / partial).read_bytes()
    found = 0
    for offset in range(0, len(kept), DEFAULT_CHUNK_SIZE):
        chunk = kept[offset : offset + DEFAULT_CHUNK_SIZE]
        if chunk == data[offset : offset + DEFAULT_CHUNK_SIZE]:
            found += 1
        else:
            assert chunk.count(0) == len(chunk), f"unverified bytes kept at {offset}"
    return found


def test_tampered_ciphertext_stops_and_keeps_only_verified_chunks(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 3 * MiB)
    real_seal = crypto.ChunkCipher.seal

    def flip_chunk_one(self: crypto.ChunkCipher, index: int, plaintext: bytes, ad: bytes) -> bytes:
        sealed = real_seal(self, index, plaintext, ad)
        return bytes([sealed[0] ^ 1]) + sealed[1:] if index == 1 else sealed

    monkeypatch.setattr(crypto.ChunkCipher, "seal", flip_chunk_one)
    with pytest.raises(DownloadInterrupted, match="chunk 1 from alice failed authentication") as e:
        bob.get(share.file_id)
    assert isinstance(e.value.cause, IntegrityError) and e.value.exit_code == 3
    assert kept_chunks(bob, share, (tmp_path / "data.bin").read_bytes()) >= 1


def test_authentic_chunk_not_matching_manifest_convicts_its_holder(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A modified holder seals other content under the real transfer key: the signed
    manifest shows it, the message names the holder, and chunks 0-1 stay."""
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 2 * MiB + 10)
    sealing(monkeypatch, lambda index, plaintext: b"X" * 10 if index == 2 else plaintext)
    with pytest.raises(
        DownloadInterrupted,
        match=r"^chunk 2 from alice does not match the owner's signed manifest: alice's copy "
        r"may have changed since it was shared, or be forged \(",
    ) as stopped:
        bob.get(share.file_id)
    assert isinstance(stopped.value.cause, IntegrityError)
    assert kept_chunks(bob, share, (tmp_path / "data.bin").read_bytes()) == 2


def test_holder_does_not_send_content_changed_since_sharing(
    network: Network, tmp_path: Path
) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 2 * MiB)
    write(tmp_path / "data.bin", 2 * MiB)  # same size, new (secret) content
    with pytest.raises(RemoteError, match="changed on the holder since it was shared"):
        bob.get(share.file_id)
    assert leftovers(bob.config.download_dir) == []


def test_file_changed_at_holder_is_reported(network: Network, tmp_path: Path) -> None:
    """The file's stamp (size, mtime, ctime) changed: refused from the first chunk, even
    though chunk 0 is still the shared one, and nothing is left behind."""
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 2 * MiB)
    os.truncate(tmp_path / "data.bin", MiB + 5)  # the owner cut the file after sharing it
    with pytest.raises(RemoteError, match="changed on the holder since it was shared"):
        bob.get(share.file_id)
    assert leftovers(bob.config.download_dir) == []


def test_file_changed_at_holder_without_a_stamp_is_served_up_to_the_change(
    network: Network, tmp_path: Path
) -> None:
    """A share recorded before stamps existed: each chunk is hashed against the manifest,
    so chunk 0 is still sent and kept."""
    alice, bob, share = alice_shares_with_bob(network, tmp_path, 2 * MiB)
    recorded = alice.registry.get(share.file_id)
    assert recorded is not None and recorded.stamp is not None
    alice.registry.add(dataclasses.replace(recorded, stamp=None))
    data = (tmp_path / "data.bin").read_bytes()
    os.truncate(tmp_path / "data.bin", MiB + 5)
    with pytest.raises(DownloadInterrupted, match="changed on the holder since it was shared"):
        bob.get(share.file_id)
    assert kept_chunks(bob, share, data) == 1  # chunk 0 is still the shared one


# --- what the broker says is checked before any holder is contacted ---------------------


def test_forged_manifest_signature_refused_before_contacting_holder(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 1000)
    forged = bytes([share.signature[0] ^ 0xFF]) + share.signature[1:]
    network.broker.store._query(
        "UPDATE files SET signature = ? WHERE file_id = ?", (forged, share.file_id)
    )
    frames = count_holder_frames(monkeypatch)

    with pytest.raises(IntegrityError, match="tree header signature does not verify"):
        bob.get(share.file_id)
    assert frames == []
    assert leftovers(bob.config.download_dir) == []


def test_a_share_from_before_the_tree_manifest_is_refused_with_one_line(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version 1 manifest left in a broker's database by an older sfs: refused before
    any holder is contacted, with what to do."""
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    write(tmp_path / "old.bin", 1000)
    old = build_manifest(tmp_path / "old.bin", alice.identity, []).encode()
    grant = alice.identity.sign(protocol.grant_payload(file_id_of(old), None))

    def as_version_1(data: bytes, signature: bytes, bundle: KeyBundle) -> SimpleNamespace:
        """The broker as version 1 had it, with the kind and count a share row has now."""
        manifest = verify_manifest(data, signature, bundle)
        fields = ("owner", "name", "size", "keywords")
        return SimpleNamespace(**{f: getattr(manifest, f) for f in fields}, kind="file", files=1)

    with monkeypatch.context() as before_the_upgrade:
        before_the_upgrade.setattr(service, "verify_header", as_version_1)
        file_id = alice.broker.publish(alice._token(), old, alice.identity.sign(old), None, grant)
    frames = count_holder_frames(monkeypatch)
    with pytest.raises(ProtocolError) as refused:
        bob.get(file_id)
    assert str(refused.value) == (
        f"{file_id} was shared with an older sfs: its owner must share it again"
    )
    assert frames == []
    assert leftovers(bob.config.download_dir) == []


def test_manifest_swapped_by_broker_refused(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    write(tmp_path / "wanted.bin", 1000)
    write(tmp_path / "other.bin", 1000)
    wanted = alice.share(tmp_path / "wanted.bin")
    other = alice.share(tmp_path / "other.bin")
    # A validly signed manifest, but of another file: the file id gives it away.
    network.broker.store._query(
        "UPDATE files SET manifest = ?, signature = ? WHERE file_id = ?",
        (other.manifest, other.signature, wanted.file_id),
    )
    frames = count_holder_frames(monkeypatch)
    with pytest.raises(IntegrityError, match=f"not file {wanted.file_id}"):
        bob.get(wanted.file_id)
    assert frames == []


def test_substituted_owner_key_refused_by_pin(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    mallory = network.add("mallory")
    write(tmp_path / "data.bin", 1000)
    share = alice.share(tmp_path / "data.bin")
    bob.get(share.file_id)  # bob pins alice's key on first use
    # With her keys replaced, alice's own heartbeats are refused: stop her first.
    network.stop("alice")
    network.broker.store._query(  # the broker now hands out mallory's keys as alice's
        "UPDATE users SET rsa_public = ?, curve_public = ? WHERE username = 'alice'",
        (mallory.identity.bundle.rsa_public, b"\0" * 32),
    )
    frames = count_holder_frames(monkeypatch)
    with pytest.raises(TrustError) as refused:
        bob.get(share.file_id)
    message = str(refused.value)
    assert "the key of alice has changed" in message
    assert "sfs-peer trust alice" in message
    assert frames == []


# --- access, presence and account errors -------------------------------------------------


def test_holder_refuses_user_not_on_access_list_even_if_broker_lies(
    network: Network, tmp_path: Path
) -> None:
    alice = network.add("alice", serve=True)
    network.add("bob")
    carol = network.add("carol")
    write(tmp_path / "private.txt", 500)
    share = alice.share(tmp_path / "private.txt", to=["bob"])
    with pytest.raises(RemoteError, match="shared with you") as by_broker:
        carol.get(share.file_id)
    assert "broker" in str(by_broker.value)

    network.broker.store._query(  # a broker that lies about the access list
        "INSERT INTO access (file_id, user_id) SELECT ?, id FROM users WHERE username = 'carol'",
        (share.file_id,),
    )
    with pytest.raises(RemoteError, match=f"alice: file {share.file_id} is not shared with you"):
        carol.get(share.file_id)
    assert leftovers(carol.config.download_dir) == []


def test_owner_offline_gives_a_clear_message(network: Network, tmp_path: Path) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 100)
    network.stop("alice")  # says goodbye to the broker
    with pytest.raises(OwnerOffline, match="alice is offline"):
        bob.get(share.file_id)


def test_wrong_password_and_unknown_user(network: Network) -> None:
    bob = network.add("bob")
    with pytest.raises(RemoteError, match="wrong username or password") as wrong:
        bob.login("not-the-password")
    assert wrong.value.code == "unauthorized"
    bob.login("bob-password")  # the right one still works


def test_duplicate_username_refused(network: Network, tmp_path: Path) -> None:
    network.add("alice")
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    config = network.config("alice")
    impostor = Peer(
        dataclasses.replace(network.peers["alice"].config, data_dir=impostor_dir, path=config)
    )
    try:
        impostor.init()
        with pytest.raises(RemoteError, match="username 'alice' is taken") as taken:
            impostor.register("another-password")
        assert taken.value.code == "conflict"
    finally:
        impostor.close()


def test_a_session_the_broker_forgot_asks_to_log_in_again(network: Network) -> None:
    bob = network.add("bob")
    network.broker.store._query("DELETE FROM sessions")
    with pytest.raises(NotLoggedIn, match="run `sfs-peer login`"):
        bob.search()
    bob.login("bob-password")
    assert bob.search() == []


def test_unshare_stops_serving_first(network: Network, tmp_path: Path) -> None:
    alice, bob, share = alice_shares_with_bob(network, tmp_path, 10)
    alice.unshare(share.file_id)
    assert alice.shares() == []
    with pytest.raises(RemoteError, match="is shared with you"):
        bob.get(share.file_id)


def test_unknown_file_id(network: Network) -> None:
    bob = network.add("bob")
    with pytest.raises(RemoteError, match=r"no file 0{32} is shared with you"):
        bob.get("0" * 32)


# --- hostile file names ----------------------------------------------------------------


@pytest.mark.parametrize("hostile", ["../../escape.txt", "/etc/passwd", "..", "a/b"])
def test_hostile_share_name_is_refused(network: Network, tmp_path: Path, hostile: str) -> None:
    """An owner who signs a tree header named with a path: the broker refuses it (and a
    requester would too: `decode_header` is shared), so nothing is ever written."""
    alice = network.add("alice", serve=True)
    write(tmp_path / "payload.bin", 300)
    built = build_tree(tmp_path / "payload.bin", alice.identity, [])
    header_bytes = dataclasses.replace(built.header, name=hostile).encode()
    signature = alice.identity.sign(header_bytes)
    grant = alice.identity.sign(protocol.grant_payload(file_id_of(header_bytes), None))
    with pytest.raises(RemoteError, match="invalid share name"):
        alice.broker.publish(alice._token(), header_bytes, signature, None, grant)


# --- the requester's side fails: vanishing holders, full or unusable disks ---------------


def test_holder_that_stops_answering_mid_transfer_and_the_resume(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 3 * MiB + 5)
    original = HolderService._chunk

    def vanish_after_chunk_one(self: HolderService, request, connection):  # type: ignore[no-untyped-def]
        return original(self, request, connection) if request.index < 2 else []

    monkeypatch.setattr(HolderService, "_chunk", vanish_after_chunk_one)
    with pytest.raises(DownloadInterrupted) as interrupted:
        bob.get(share.file_id)
    assert isinstance(interrupted.value.cause, TransportError)
    assert interrupted.value.exit_code == TransportError.exit_code
    assert re.fullmatch(
        r"alice at tcp://127\.0\.0\.1:[0-9]+ did not send the next chunk within 3 s "
        r"\(2\.0 MiB of 3\.0 MiB kept: run the same get again to resume\)",
        str(interrupted.value),
    )
    # Only the verified chunks are kept, under a name that is not the file's.
    assert leftovers(bob.config.download_dir) == [f".sfs-{share.file_id}.part"]

    monkeypatch.setattr(HolderService, "_chunk", original)
    result = bob.get(share.file_id)
    assert result.path.read_bytes() == (tmp_path / "data.bin").read_bytes()
    assert (result.chunks_resumed, result.bytes_fetched) == (2, MiB + 5)
    assert leftovers(bob.config.download_dir) == ["data.bin"]


def test_full_disk_cancels_cleanly(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 3 * MiB)
    real_pwrite = os.pwrite

    def disk_full_at_chunk_two(fd: int, data: bytes, offset: int) -> int:
        if offset >= 2 * MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_full_at_chunk_two)
    with pytest.raises(StorageError, match="no space left in"):
        bob.get(share.file_id)
    assert leftovers(bob.config.download_dir) == []


def test_unusable_download_folder(network: Network, tmp_path: Path) -> None:
    _alice, bob, share = alice_shares_with_bob(network, tmp_path, 10)
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("in the way")
    with pytest.raises(StorageError, match="cannot write in"):
        bob.get(share.file_id, out=not_a_folder)
    assert not_a_folder.read_text() == "in the way"


@pytest.mark.parametrize(
    ("extra", "attaches"),
    [({}, 1), ({"data_listen": "off"}, 0)],
    ids=["data-connection", "data-listen-off"],
)
def test_chunks_travel_on_the_data_connection_unless_it_is_off(
    network: Network,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, object],
    attaches: int,
) -> None:
    attached: list[Attached] = []
    original = HolderService.receive_data

    def spy(self: HolderService, connection: bytes, frame: bytes) -> object:
        answer = original(self, connection, frame)
        if isinstance(answer, Attached):
            attached.append(answer)
        return answer

    monkeypatch.setattr(HolderService, "receive_data", spy)
    alice = network.add("alice", serve=True, **extra)
    bob = network.add("bob")
    data = write(tmp_path / "original.bin", 3 * MiB + 5)
    share = alice.share(tmp_path / "original.bin")
    assert bob.get(share.file_id).path.read_bytes() == data
    assert len(attached) == attaches


def test_a_data_endpoint_that_cannot_be_reached_leaves_chunks_on_control(
    network: Network, tmp_path: Path
) -> None:
    """The offer names the data port at `advertise`'s host, where nothing listens (the
    port is bound on another loopback address): the download goes on without it."""
    alice = network.add("alice", serve=True, data_listen=f"tcp://127.0.0.2:{free_port()}")
    bob = network.add("bob")
    data = write(tmp_path / "original.bin", 2 * MiB)
    share = alice.share(tmp_path / "original.bin")
    assert bob.get(share.file_id).path.read_bytes() == data


# --- folders ----------------------------------------------------------------------------


def make_folder(root: Path) -> Path:
    """Nested folders, an empty one, an executable, a relative link, non-ASCII names,
    an empty file, and a file over a chunk long."""
    tree = root / "course"
    (tree / "week 1" / "slides").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "week 1" / "notes.txt").write_text("notes\n")
    (tree / "week 1" / "slides" / "çàfé ☕.pdf").write_bytes(os.urandom(DEFAULT_CHUNK_SIZE + 7))
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "zero").write_bytes(b"")
    (tree / "latest").symlink_to("week 1/notes.txt")
    return tree


def snapshot_tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    found: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            found[rel] = ("folder", info.st_mode & 0o777, "")
        else:
            found[rel] = ("file", info.st_mode & 0o777, path.read_bytes())
    return found


def test_a_folder_round_trip_byte_for_byte(network: Network, tmp_path: Path) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    source = make_folder(tmp_path)
    share = alice.share(source)
    assert share.name == "course"

    result = bob.get(share.file_id)

    assert isinstance(result, DownloadResult)
    assert result.path == bob.config.download_dir / "course"
    assert snapshot_tree(result.path) == snapshot_tree(source)
    mtime = (source / "week 1" / "notes.txt").stat().st_mtime_ns
    assert (result.path / "week 1" / "notes.txt").stat().st_mtime_ns == mtime
    assert leftovers(bob.config.download_dir) == ["course"]  # no staging, no .part
    assert result.files == 4

    # The same tree there already: said, nothing fetched.
    again = bob.get(share.file_id)
    assert isinstance(again, AlreadyDownloaded)
    assert again.path == result.path

    # Another folder of that name: the tree goes to "course (1)".
    (result.path / "zero").write_bytes(b"changed")
    third = bob.get(share.file_id)
    assert isinstance(third, DownloadResult)
    assert third.path == bob.config.download_dir / "course (1)"
    assert snapshot_tree(third.path) == snapshot_tree(source)


def six_files(tmp_path: Path) -> Path:
    """6 files of 0.6 MiB: 4 chunks, most spanning two files."""
    source = tmp_path / "data"
    source.mkdir()
    for number in range(6):
        (source / f"part-{number}.bin").write_bytes(os.urandom(600_000))
    return source


def interrupted_after_two_chunks(
    monkeypatch: pytest.MonkeyPatch, bob: Peer, file_id: str
) -> Callable[[], None]:
    """bob's `get` of the folder stops after chunks 0 and 1 (the holder refuses the rest;
    bob asks one chunk at a time, so 0 and 1 are in before 2 is asked); returns what lets
    the holder serve everything again."""
    original = HolderService._chunk

    def refuse_after_chunk_one(self: HolderService, request, connection):  # type: ignore[no-untyped-def]
        if request.index >= 2:
            raise protocol.Refused(protocol.ErrorCode.BUSY, "not now")
        return original(self, request, connection)

    monkeypatch.setattr(HolderService, "_chunk", refuse_after_chunk_one)
    with pytest.raises(DownloadInterrupted):
        bob.get(file_id)
    return lambda: monkeypatch.setattr(HolderService, "_chunk", original)


def disk_use(root: Path) -> int:
    return sum(path.lstat().st_blocks * 512 for path in root.rglob("*"))


def test_an_interrupted_folder_get_keeps_verified_chunks_across_files(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob", window=1)
    source = six_files(tmp_path)
    share = alice.share(source)
    serve_all = interrupted_after_two_chunks(monkeypatch, bob, share.file_id)
    # The files themselves are the partial storage: no `.part` stream beside them, and
    # no more on disk than the chunks verified (one copy).
    staging = bob.config.download_dir / f".sfs-{share.file_id}.tree"
    assert leftovers(bob.config.download_dir) == [staging.name]
    assert staging.stat().st_mode & 0o777 == 0o700
    assert {p.name for p in staging.iterdir()} <= {p.name for p in source.iterdir()}
    assert disk_use(staging) <= 2 * MiB + 64 * 1024

    serve_all()
    result = bob.get(share.file_id)
    assert isinstance(result, DownloadResult)
    assert (result.chunks_resumed, result.bytes_fetched) == (2, 3_600_000 - 2 * MiB)
    assert snapshot_tree(result.path) == snapshot_tree(source)
    assert leftovers(bob.config.download_dir) == ["data"]


def test_a_byte_changed_in_the_staging_tree_is_fetched_again(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob", window=1)
    source = six_files(tmp_path)
    share = alice.share(source)
    serve_all = interrupted_after_two_chunks(monkeypatch, bob, share.file_id)
    kept = bob.config.download_dir / f".sfs-{share.file_id}.tree" / "part-0.bin"
    with kept.open("r+b") as opened:  # chunk 0: the first MiB, in part-0.bin and part-1.bin
        opened.seek(1000)
        byte = opened.read(1)
        opened.seek(1000)
        opened.write(bytes([byte[0] ^ 1]))

    serve_all()
    result = bob.get(share.file_id)
    assert isinstance(result, DownloadResult)
    assert (result.chunks_resumed, result.bytes_fetched) == (1, 3_600_000 - MiB)
    assert snapshot_tree(result.path) == snapshot_tree(source)


def test_a_symlink_planted_in_the_staging_tree_is_refused_not_followed(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob", window=1)
    source = six_files(tmp_path)
    share = alice.share(source)
    serve_all = interrupted_after_two_chunks(monkeypatch, bob, share.file_id)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    planted = bob.config.download_dir / f".sfs-{share.file_id}.tree" / "part-3.bin"
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)

    serve_all()
    with pytest.raises(StorageError) as refused:
        bob.get(share.file_id)
    assert "part-3.bin" in str(refused.value) and "\n" not in str(refused.value)
    assert victim.read_bytes() == b"precious"
    assert not (bob.config.download_dir / "data").exists()
    assert planted.is_symlink()  # left for the user to look at, never written through


def test_a_full_disk_keeps_the_folder_for_resume(
    network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob", window=1)
    source = six_files(tmp_path)
    share = alice.share(source)
    pwrite = os.pwrite
    budget = [2]

    def full_after_two(fd: int, data: bytes, offset: int) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= 1
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_after_two)
    with pytest.raises(StorageError) as full:
        bob.get(share.file_id)
    assert str(full.value).startswith("no space left in")
    assert "run the same get" in str(full.value) and "\n" not in str(full.value)
    staging = bob.config.download_dir / f".sfs-{share.file_id}.tree"
    assert leftovers(bob.config.download_dir) == [staging.name]

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = bob.get(share.file_id)
    assert isinstance(result, DownloadResult)
    assert snapshot_tree(result.path) == snapshot_tree(source)
    assert leftovers(bob.config.download_dir) == ["data"]


def test_a_folder_comes_from_the_owner_and_a_seeder_at_once(
    network: Network, tmp_path: Path
) -> None:
    alice = network.add("alice", serve=True)
    source = make_folder(tmp_path)
    share = alice.share(source)
    bob = network.add("bob", serve=True)
    seeded = bob.get(share.file_id)
    assert isinstance(seeded, DownloadResult) and seeded.seeding
    carol = network.add("carol", window=1)
    result = carol.get(share.file_id)
    assert isinstance(result, DownloadResult)
    assert snapshot_tree(result.path) == snapshot_tree(source)
    assert set(result.holders) <= {"alice", "bob"}


def test_get_include_fetches_only_the_chosen_paths(network: Network, tmp_path: Path) -> None:
    alice = network.add("alice", serve=True)
    bob = network.add("bob")
    source = make_folder(tmp_path)
    share = alice.share(source)

    result = bob.get(share.file_id, include=["week 1/slides", "*.sh"])

    assert isinstance(result, DownloadResult)
    got = snapshot_tree(result.path)
    assert set(got) == {"run.sh", "week 1", "week 1/slides", "week 1/slides/çàfé ☕.pdf"}
    whole = snapshot_tree(source)
    assert all(got[path] == whole[path] for path in got if got[path][0] == "file")
    assert result.files == 2
    assert result.bytes_fetched < DEFAULT_CHUNK_SIZE * 3  # not the whole stream
    assert not result.seeding
    with pytest.raises(UsageError, match="nothing in course matches nothing-here"):
        bob.get(share.file_id, include=["nothing-here"])
