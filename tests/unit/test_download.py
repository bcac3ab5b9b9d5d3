"""The download engine: reading a holder's replies (whatever arrives, the error names the
holder), and `Downloader.fetch` against holders on loopback sockets that stall or send
bad chunks."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from sfs.common import crypto, protocol
from sfs.common.codec import pack
from sfs.common.errors import IntegrityError, ProtocolError, RemoteError
from sfs.common.manifest import MIN_CHUNK_SIZE
from sfs.common.protocol import ErrorCode
from sfs.peer.download import Downloader, DownloadInterrupted, read_chunk, read_reply
from sfs.peer.keys import Identity
from sfs.peer.pins import PinStore
from sfs.peer.registry import Share
from sfs.peer.transfer import HolderService
from tests.unit.memory_holders import lookup_of, share_of

TRANSFER_ID = bytes(range(16))


def chunk_frames(index: int = 2) -> list[bytes]:
    return [protocol.encode("chunk", protocol.ChunkHeader(TRANSFER_ID, index)), b"ciphertext"]


def test_a_chunk_reply_is_read() -> None:
    header, ciphertext = read_chunk(*read_reply(chunk_frames(), "alice"), "alice")
    assert (header.transfer_id, header.index, ciphertext) == (TRANSFER_ID, 2, b"ciphertext")


def test_a_one_frame_reply_has_no_payload() -> None:
    envelope, payload = read_reply([protocol.encode("finish", protocol.Finish(TRANSFER_ID))], "a")
    assert (envelope.op, payload) == ("finish", None)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x85" + chunk_frames()[0][1:],  # a msgpack map that claims one entry too many
        pack(["not", "an", "envelope"]),
        pack({"v": protocol.VERSION + 1, "op": "chunk", "rid": 0, "body": {}}),
        protocol.encode("error", None),  # an error reply without code or message
    ],
    ids=["not-msgpack", "not-an-envelope", "other-version", "error-without-body"],
)
def test_a_reply_that_does_not_parse_names_the_holder(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"^alice sent a malformed message \(.+\)$"):
        read_reply([frame, b"ciphertext"], "alice")


def test_a_chunk_header_that_does_not_fit_names_the_holder() -> None:
    frame = pack(
        {"v": protocol.VERSION, "op": "chunk", "rid": 0, "body": {"transfer_id": TRANSFER_ID}}
    )
    with pytest.raises(ProtocolError, match=r"^alice sent a malformed message \(chunk: .+\)$"):
        read_chunk(*read_reply([frame, b"ciphertext"], "alice"), "alice")


@pytest.mark.parametrize(
    "frames",
    [
        [protocol.encode("offer", None), b"ciphertext"],
        chunk_frames()[:1],
    ],
    ids=["wrong-op", "no-ciphertext"],
)
def test_a_chunk_of_the_wrong_shape_is_malformed(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError, match=r"^alice sent a malformed chunk$"):
        read_chunk(*read_reply(frames, "alice"), "alice")


def test_three_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="alice sent a frame of unexpected shape"):
        read_reply([*chunk_frames(), b"more"], "alice")


def test_an_error_reply_stays_a_remote_error() -> None:
    frame = protocol.encode_error(ErrorCode.NOT_FOUND, "unknown or expired transfer")
    with pytest.raises(RemoteError, match=r"^alice: unknown or expired transfer$") as refused:
        read_reply([frame], "alice")
    assert refused.value.code == ErrorCode.NOT_FOUND


# --- the engine against holders on loopback sockets ---------------------------------------
#
# `Downloader.fetch` with real zmq sockets (CurveZMQ off): each holder is a
# `HolderService` behind a ROUTER in a thread of its own, which a test can hold back
# before a chunk, or make seal other bytes. A holder that never answers is a TCP
# listener nobody accepts from.

DATA = random.Random(6).randbytes(7 * MIN_CHUNK_SIZE + 1000)  # chunks 0-7, the last short
CHUNKS = 8


@contextlib.contextmanager
def holder_on_loopback(
    identity: Identity,
    share: Share,
    context: zmq.Context[zmq.Socket[bytes]],
    before_chunk: Callable[[int], None] | None = None,
) -> Iterator[protocol.Holder]:
    """`identity` serving `share` (DATA) on a free port; `before_chunk(n)` runs before
    its n-th chunk reply (from 0)."""
    service = HolderService(
        identity,
        lambda file_id: share if file_id == share.file_id else None,
        lambda requester, bundle: None,
        lambda _share, offset, length: DATA[offset : offset + length],
    )
    bound, stop = threading.Event(), threading.Event()
    endpoint: list[str] = []

    def serve() -> None:
        sock = context.socket(zmq.ROUTER)
        sock.linger = 0
        endpoint.append(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
        bound.set()
        chunks = 0
        try:
            while not stop.is_set():
                if not sock.poll(50):
                    continue
                routing, *frames = sock.recv_multipart()
                reply = service.handle(routing, None, frames[-1])
                if reply and protocol.decode_envelope(reply[0]).op == "chunk":
                    if before_chunk is not None:
                        before_chunk(chunks)
                    chunks += 1
                if reply:
                    sock.send_multipart([routing, *reply])
        finally:
            sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert bound.wait(10)
    try:
        yield protocol.Holder(identity.username, endpoint[0], identity.bundle)
    finally:
        stop.set()
        thread.join(10)


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """A TCP port that completes the TCP handshake (the kernel's backlog) and nothing
    more: no ZMTP greeting, no answer, ever."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"


def downloader(
    bob: Identity, tmp_path: Path, context: zmq.Context[zmq.Socket[bytes]]
) -> Downloader:
    return Downloader(
        bob,
        PinStore(tmp_path / "pins.json"),
        context,
        window=1,
        timeout=60,
        transport_encryption=False,
        hello_timeout=0.3,
    )


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    made: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield made
    made.destroy(linger=0)


def test_a_silent_holder_is_set_aside_while_another_delivers(
    alice: Identity,
    bob: Identity,
    carol: Identity,
    tmp_path: Path,
    context: zmq.Context[zmq.Socket[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """alice sends chunk 0, then holds chunk 1 back until carol, who never answers her
    hello, has been set aside: the download neither waits for carol nor fails."""
    share = share_of(alice, DATA)
    set_aside = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("set carol aside"):
                set_aside.set()

    def hold_back(chunk: int) -> None:
        if chunk == 1:
            set_aside.wait(20)

    watch = Watch()
    logging.getLogger("sfs.peer").addHandler(watch)
    caplog.set_level(logging.INFO, "sfs.peer")
    try:
        with (
            holder_on_loopback(alice, share, context, hold_back) as from_alice,
            silent_endpoint() as nowhere,
        ):
            holders = [protocol.Holder("carol", nowhere, carol.bundle), from_alice]
            result = downloader(bob, tmp_path, context).fetch(
                share.file_id, lookup_of(alice, share, holders), tmp_path / "in"
            )
    finally:
        logging.getLogger("sfs.peer").removeHandler(watch)
    assert set_aside.is_set(), "carol was never set aside"
    assert result.holders == ["alice"]
    assert result.path.read_bytes() == DATA


@pytest.mark.parametrize(
    ("forged", "message"),
    [
        # Other bytes sealed under the real key: authentic, but not the owner's file.
        # The two workers check chunks 3 and after side by side: any of them is named.
        (
            True,
            r"chunk [3-7] from alice does not match the owner's signed manifest: alice's copy "
            r"may have changed since it was shared, or be forged",
        ),
        # The file's bytes with a bit of the GCM tag flipped: opened in order, chunk 3 first.
        (False, r"chunk 3 from alice failed authentication \(tampered\?\)"),
    ],
    ids=["forged", "tampered"],
)
def test_a_bad_chunk_from_the_last_holder_keeps_the_verified_ones(
    alice: Identity,
    bob: Identity,
    tmp_path: Path,
    context: zmq.Context[zmq.Socket[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    forged: bool,
    message: str,
) -> None:
    """alice sends chunks 0-2, then a bad chunk 3: she is dropped, and with nobody left
    the download stops, keeping chunks 0-2 (and nothing else) for the next attempt."""
    share = share_of(alice, DATA)
    real_seal = crypto.ChunkCipher.seal

    def seal(self: crypto.ChunkCipher, index: int, plaintext: bytes, data: bytes) -> bytes:
        if index < 3 or index >= 2**32:  # chunks 0-2, and the index pages
            return real_seal(self, index, plaintext, data)
        if forged:
            return real_seal(self, index, bytes([plaintext[0] ^ 1]) + plaintext[1:], data)
        sealed = real_seal(self, index, plaintext, data)
        return sealed[:-1] + bytes([sealed[-1] ^ 1])

    folder = tmp_path / "in"
    with monkeypatch.context() as patched:
        patched.setattr(crypto.ChunkCipher, "seal", seal)
        with (
            holder_on_loopback(alice, share, context) as from_alice,
            pytest.raises(DownloadInterrupted) as stopped,
        ):
            downloader(bob, tmp_path, context).fetch(
                share.file_id, lookup_of(alice, share, [from_alice]), folder
            )
    kept = 3 * MIN_CHUNK_SIZE
    kept_line = (
        f" ({kept / (1 << 20):.1f} MiB of {len(DATA) / (1 << 20):.1f} MiB kept: "
        "run the same get again to resume)"
    )
    assert re.fullmatch(message + re.escape(kept_line), str(stopped.value))
    assert isinstance(stopped.value.cause, IntegrityError)
    assert stopped.value.exit_code == IntegrityError.exit_code
    partial = folder / f".sfs-{share.file_id}.part"
    assert [path.name for path in folder.iterdir()] == [partial.name]
    assert partial.read_bytes() == DATA[:kept]  # only what verified

    with holder_on_loopback(alice, share, context) as from_alice:
        again = downloader(bob, tmp_path, context).fetch(
            share.file_id, lookup_of(alice, share, [from_alice]), folder
        )
    assert (again.chunks_resumed, again.bytes_fetched) == (3, len(DATA) - kept)
    assert again.path.read_bytes() == DATA
