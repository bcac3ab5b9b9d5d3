"""Reading a holder's replies: whatever arrives, the error names the holder."""

from __future__ import annotations

import pytest

from sfs.common import protocol
from sfs.common.codec import pack
from sfs.common.errors import ProtocolError, RemoteError
from sfs.common.protocol import ErrorCode
from sfs.peer.download import read_chunk, read_reply

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
        pack({"v": 2, "op": "chunk", "rid": 0, "body": {}}),
        protocol.encode("error", None),  # an error reply without code or message
    ],
    ids=["not-msgpack", "not-an-envelope", "other-version", "error-without-body"],
)
def test_a_reply_that_does_not_parse_names_the_holder(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"^alice sent a malformed message \(.+\)$"):
        read_reply([frame, b"ciphertext"], "alice")


def test_a_chunk_header_that_does_not_fit_names_the_holder() -> None:
    frame = pack({"v": 1, "op": "chunk", "rid": 0, "body": {"transfer_id": TRANSFER_ID}})
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
