"""A man in the middle on the peer channel, against real processes.

alice serves a five-chunk file and advertises the port of a `MitmProxy` in front of
her real one, so bob's `get` goes through it. Peer transport encryption is off, so the
proxy can read the ZMTP frames (the broker link keeps CurveZMQ). Each test rewrites the
holder -> receiver stream in one way, then checks the exit code and the exact one-line
error of `sfs-peer get`, and what is left in bob's download folder: nothing new when
the attack struck before any chunk was verified, else a `.part` file holding verified
chunks only, from which the next `get` fetches exactly the rest. A clean `get` through
the proxy still gives the original bytes.

Which product check stops each attack is said next to each test.

Two attacks leave a transfer open at alice until it idles out (120 s): a swallowed
offer (bob never learns its id, so sends no `finish`) and a cut connection. alice
allows 4 open transfers per user, so more such tests in this module would lock bob out.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sfs.common import protocol
from sfs.common.manifest import DEFAULT_CHUNK_SIZE
from tests.adversarial.mitm import (
    Message,
    MitmProxy,
    Policy,
    Recorder,
    Replay,
    Rewrite,
    Swap,
    Truncate,
    chunk_index,
    envelope_of,
    flip_bit,
    is_offer,
    on_chunk,
)
from tests.harness import Cluster, Peer, Result, one_line_error, snapshot

SIZE = 4 * DEFAULT_CHUNK_SIZE + 300_000  # chunks 0-4, the last one short
NAME = "dataset.bin"
HASTY_TIMEOUT = 2  # seconds a download missing a chunk waits, in the attacks that need it

AUTH_FAILED = "chunk {} from alice failed authentication (tampered?)"
ANOTHER_TRANSFER = "alice sent a chunk of another transfer"


@dataclass
class World:
    cluster: Cluster
    proxy: MitmProxy
    data_proxy: MitmProxy  # the data connection: the chunks
    alice: Peer
    bob: Peer
    hasty_bob: Peer  # bob with a short `timeout`, for the attacks that end in one
    file_id: str
    content: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def get(self, policy: Policy, *args: str, hasty: bool = False) -> Result:
        """bob downloads the file while `policy` rewrites what alice sends: on the control
        connection (after the first connection of a `get`, which fetches the index pages)
        and on the data connection, where the chunks come."""
        self.proxy.use(policy, skip=1)
        self.data_proxy.use(policy)
        return (self.hasty_bob if hasty else self.bob).run("get", self.file_id, *args)


def _listen_port(config: Path) -> int:
    found = re.search(r"^listen: tcp://127\.0\.0\.1:(\d+)$", config.read_text(), re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def _with_timeout(peer: Peer, seconds: int) -> Peer:
    """The same user, from a copy of its config with another `timeout` (the harness
    writes one already, and a second copy of a YAML key is no override to count on)."""
    config = peer.config.with_name(f"{peer.name}-timeout-{seconds}.yaml")
    text, count = re.subn(
        r"^timeout: .*$", f"timeout: {seconds}", peer.config.read_text(), flags=re.M
    )
    assert count == 1
    config.write_text(text)
    return Peer(peer.cluster, peer.name, config, peer.password)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with (
        Cluster(transport_encryption=False) as cluster,
        MitmProxy() as proxy,
        MitmProxy() as data_proxy,
    ):
        cluster.start_broker()
        alice = cluster.add_peer(
            "alice",
            advertise=f"tcp://127.0.0.1:{proxy.port}",
            data_listen=f"tcp://127.0.0.2:{data_proxy.port}",
        )
        proxy.start(_listen_port(alice.config))
        data_proxy.start(data_proxy.port, "127.0.0.2")
        alice.serve()
        bob = cluster.add_peer("bob")
        content = os.urandom(SIZE)
        source = cluster.root / NAME
        source.write_bytes(content)
        file_id = alice.share(source)
        # First contact: alice answers `busy` until she has bob's key from the broker.
        # Past it, every test sees the same stream: an offer, then the chunks.
        bob.run("get", file_id, "--out", str(cluster.root / "first-contact")).check()
        hasty = _with_timeout(bob, HASTY_TIMEOUT)
        yield World(cluster, proxy, data_proxy, alice, bob, hasty, file_id, content)
        assert proxy.errors == data_proxy.errors == []


# --- checks -----------------------------------------------------------------------------


def assert_still_serving(world: World, folder: Path) -> None:
    """Broker and holder are up, and a clean `get` gives the original bytes."""
    result = world.get(Policy(), "--out", str(folder), "--json").check()
    got = result.json()
    assert Path(got["path"]).read_bytes() == world.content
    assert world.alice.server is not None and world.alice.server.alive()
    assert "Traceback" not in world.alice.server.output()
    assert world.cluster.broker is not None and world.cluster.broker.alive()


def assert_refused(
    world: World,
    policy: Policy,
    exit_code: int,
    message: str,
    tmp_path: Path,
) -> None:
    """The download ends with `message` before any chunk, and leaves nothing behind."""
    before = snapshot(world.bob.download_dir)
    result = world.get(policy)
    assert policy.fired == 1, "the attack never happened"
    assert (result.returncode, one_line_error(result)) == (exit_code, f"error: {message}")
    assert snapshot(world.bob.download_dir) == before
    assert_still_serving(world, tmp_path / "clean")


def verified_chunks(partial: bytes, content: bytes) -> dict[int, int]:
    """The chunks of `partial` that hold the right bytes: index -> length."""
    found = {}
    for offset in range(0, len(content), DEFAULT_CHUNK_SIZE):
        chunk = content[offset : offset + DEFAULT_CHUNK_SIZE]
        if partial[offset : offset + len(chunk)] == chunk:
            found[offset // DEFAULT_CHUNK_SIZE] = len(chunk)
    return found


def assert_cut_short(
    world: World, policy: Policy, message: str, exit_code: int = 5, hasty: bool = True
) -> None:
    """The download ends with `message` (after a timeout, by default), keeping only
    verified chunks, and the next `get` fetches exactly the rest."""
    folder = world.bob.download_dir
    before = snapshot(folder)
    result = world.get(policy, hasty=hasty)
    assert policy.fired == 1, "the attack never happened"
    kept = re.escape(f"error: {message}") + (
        r" \(([0-9.]+) MiB of [0-9.]+ MiB kept: run the same get again to resume\)"
    )
    assert result.returncode == exit_code
    assert re.fullmatch(kept, one_line_error(result))
    partial = f".sfs-{world.file_id}.part"
    assert set(snapshot(folder)) - set(before) == {partial}
    on_disk = verified_chunks((folder / partial).read_bytes(), world.content)
    assert on_disk, "nothing was kept"

    resumed = world.get(Policy(), "--json").check().json()
    assert resumed["chunks_resumed"] == len(on_disk)
    assert resumed["bytes"] == SIZE - sum(on_disk.values())  # only what was missing
    assert Path(resumed["path"]).read_bytes() == world.content
    Path(resumed["path"]).unlink()
    assert snapshot(folder) == before


def assert_tampering_stopped(world: World, policy: Policy, exit_code: int, message: str) -> None:
    """A bad chunk drops alice, the only holder: the download stops at once, keeping
    the chunks verified before it (nothing unverified), and the next `get` resumes."""
    assert_cut_short(world, policy, message, exit_code, hasty=False)


def record_transfer(world: World, folder: Path) -> Recorder:
    """A clean transfer, every message alice sent kept for replay."""
    recorder = Recorder()
    world.get(recorder, "--out", str(folder)).check()
    return recorder


def _payload(change: Callable[[bytes], bytes]) -> Callable[[Message], Message]:
    return lambda message: [message[0], change(message[1])]


def _header(change: Callable[[bytes], bytes]) -> Callable[[Message], Message]:
    return lambda message: [change(message[0]), message[1]]


def test_the_policies_see_what_they_expect(world: World, tmp_path: Path) -> None:
    """The stream the attacks rely on: one offer, the data connection's `attached`, then
    chunks 0-4 in request order."""
    recorder = record_transfer(world, tmp_path)
    assert is_offer(recorder.messages[0])
    assert envelope_of(recorder.messages[1]).op == "attached"
    assert [chunk_index(message) for message in recorder.messages[2:]] == [0, 1, 2, 3, 4]
    assert all(len(message) == 2 for message in recorder.messages[2:])


# --- bit flips --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [lambda payload: len(payload) // 2, lambda payload: len(payload) - 1],
    ids=["ciphertext", "gcm-tag"],
)
def test_bit_flip_in_a_chunk_payload(world: World, where: Callable[[bytes], int]) -> None:
    """Stopped by the AES-GCM tag (`ChunkCipher.open`)."""
    flip = Rewrite(on_chunk(2), _payload(lambda payload: flip_bit(payload, where(payload))))
    assert_tampering_stopped(world, flip, 3, AUTH_FAILED.format(2))


def _index_plus_one(header: bytes) -> bytes:
    """Chunk 2's header saying 3: one bit apart, re-encoded to be sure where it is."""
    body = envelope_of([header]).body
    changed = protocol.encode("chunk", protocol.ChunkHeader(body["transfer_id"], 3))
    difference = int.from_bytes(header, "big") ^ int.from_bytes(changed, "big")
    assert len(changed) == len(header) and difference.bit_count() == 1
    return changed


def _transfer_id_bit(header: bytes) -> bytes:
    return flip_bit(header, header.index(envelope_of([header]).body["transfer_id"]))


def _op_bit(header: bytes) -> bytes:
    return flip_bit(header, header.index(b"chunk") + 4)  # "chunk" -> "chunj"


def _map_size_bit(header: bytes) -> bytes:
    assert header[0] == 0x84  # a msgpack map of four: v, op, rid, body
    return flip_bit(header, 0)  # a map of five, one more than there is


@pytest.mark.parametrize(
    ("change", "exit_code", "message"),
    [
        # The index is in the nonce and the associated data: chunk 3's key stream and
        # tag do not open chunk 2's ciphertext.
        (_index_plus_one, 3, AUTH_FAILED.format(3)),
        # `ReceiverLink.open_chunk` compares the header's transfer id with the offer's.
        (_transfer_id_bit, 3, ANOTHER_TRANSFER),
        # `download.read_chunk` wants op "chunk"; a garbled header is malformed, not forged.
        (_op_bit, 1, "alice sent a malformed chunk"),
        # `protocol.decode_envelope`: not msgpack any more (`read_reply` names alice).
        (
            _map_size_bit,
            1,
            "alice sent a malformed message (malformed frame: not a valid msgpack document)",
        ),
    ],
    ids=["index", "transfer-id", "op", "msgpack"],
)
def test_bit_flip_in_a_chunk_header(
    world: World,
    change: Callable[[bytes], bytes],
    exit_code: int,
    message: str,
) -> None:
    flip = Rewrite(on_chunk(2), _header(change))
    assert_tampering_stopped(world, flip, exit_code, message)


# --- missing chunks ---------------------------------------------------------------------


def _no_chunk_in_time(world: World) -> str:
    endpoint = f"tcp://127.0.0.1:{world.proxy.port}"
    return f"alice at {endpoint} did not send the next chunk within {HASTY_TIMEOUT} s"


def test_a_dropped_chunk(world: World, tmp_path: Path) -> None:
    """The download cannot complete without chunk 2, and the wait for it has a limit
    (the poll timeout in `Downloader._receive`)."""
    drop = Rewrite(on_chunk(2), lambda message: None)
    assert_cut_short(world, drop, _no_chunk_in_time(world))


def test_a_stream_cut_mid_transfer(world: World, tmp_path: Path) -> None:
    """The offer, `attached` and chunks 0 and 1 get through, then the connection closes
    and new ones are refused; as for a dropped chunk, the receive timeout ends the download."""
    cut = Truncate(keep=4)
    assert_cut_short(world, cut, _no_chunk_in_time(world))


# --- a data connection that does not serve (issue 12) ----------------------------------


def test_an_attach_left_unanswered_leaves_the_chunks_on_control(
    world: World, tmp_path: Path
) -> None:
    """No `attached` (a full data port, an older holder): within ATTACH_ANSWER_WAIT the
    requester asks for the chunks on the control connection instead."""
    unanswered = Rewrite(lambda message: envelope_of(message).op == "attached", lambda _: None)
    got = world.get(unanswered, "--out", str(tmp_path), "--json").check().json()
    assert unanswered.fired == 1
    assert Path(got["path"]).read_bytes() == world.content


def test_a_data_connection_silent_after_attach_leaves_the_chunks_on_control(
    world: World, tmp_path: Path
) -> None:
    """Attached, then no chunk (a holder that lost it, a cut link): the chunks asked
    there go back to the plan and are asked on the control connection; the download
    completes instead of failing with "did not send the next chunk"."""
    silent = Rewrite(lambda message: chunk_index(message) is not None, lambda _: None)
    world.proxy.use(Policy())
    world.data_proxy.use(silent)
    result = world.hasty_bob.run("get", world.file_id, "--out", str(tmp_path), "--json")
    got = result.check().json()
    assert silent.fired >= 1
    assert Path(got["path"]).read_bytes() == world.content


# --- reordering -------------------------------------------------------------------------


def test_two_chunks_swapped_still_give_the_exact_file(world: World, tmp_path: Path) -> None:
    """Whole, authentic messages out of order are not tampering: each chunk names its
    index, which its nonce and associated data bind it to, and it is written at that
    index's offset. So the right outcome is the original file, byte for byte (the
    file is complete and every chunk verified before the rename), and nothing else in the folder."""
    out = tmp_path / "reordered"
    swap = Swap(1, 2)
    world.get(swap, "--out", str(out), "--json").check()
    assert swap.fired == 1
    assert snapshot(out) == {NAME: world.sha256}
    assert_still_serving(world, tmp_path / "clean")


def test_payloads_swapped_between_two_chunks(world: World) -> None:
    """Chunk 1's header with chunk 2's ciphertext: the nonce and associated data are
    chunk 1's, so the GCM tag fails."""
    swap = Swap(1, 2, payloads=True)
    assert_tampering_stopped(world, swap, 3, AUTH_FAILED.format(1))


# --- replays ----------------------------------------------------------------------------


def test_an_offer_replayed_from_an_earlier_transfer(world: World, tmp_path: Path) -> None:
    """The old offer is alice's and for bob and this file, and bob can unwrap its key;
    only the requester nonce it echoes (`ReceiverLink.accept_offer`) is a stale one."""
    earlier = record_transfer(world, tmp_path / "earlier")
    replay = Rewrite(is_offer, lambda message: earlier.first(is_offer))
    assert_refused(
        world, replay, 3, "the offer from alice is not for this request (replayed?)", tmp_path
    )


@pytest.mark.parametrize(
    ("payload_only", "message"),
    [
        # The header names the earlier transfer: `ReceiverLink.open_chunk`.
        (False, ANOTHER_TRANSFER),
        # Under this transfer's header, the ciphertext is under another key: GCM tag.
        (True, AUTH_FAILED.format(2)),
    ],
    ids=["whole-message", "payload-only"],
)
def test_a_chunk_replayed_from_another_transfer(
    world: World, tmp_path: Path, payload_only: bool, message: str
) -> None:
    earlier = record_transfer(world, tmp_path / "earlier").first(on_chunk(2))

    def replayed(current: Message) -> Message:
        return [current[0], earlier[1]] if payload_only else earlier

    assert_tampering_stopped(world, Rewrite(on_chunk(2), replayed), 3, message)


@pytest.mark.parametrize(
    ("payload_only", "message"),
    [
        # Chunk 1 again, authentic: only chunks in flight from alice are accepted.
        (False, "chunk 1 from alice arrived without being requested"),
        # Chunk 1's ciphertext under chunk 2's header: the GCM tag.
        (True, AUTH_FAILED.format(2)),
    ],
    ids=["whole-message", "payload-only"],
)
def test_a_chunk_replayed_at_another_index(world: World, payload_only: bool, message: str) -> None:
    replay = Replay(1, 2, payload_only=payload_only)
    assert_tampering_stopped(world, replay, 3, message)
