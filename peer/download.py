"""The download engine: checks what the broker says, then pulls the file from a holder
over DEALER -> ROUTER with several chunk requests in flight, verifying each chunk.

Order of checks (DESIGN section 5): the owner's pinned fingerprint, the manifest
signature and the file id are verified before any holder is contacted. Any failure
cancels the transfer, removes the temporary file and raises; nothing unverified ever
reaches the final path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from sfs.common import crypto, protocol
from sfs.common.codec import from_wire
from sfs.common.errors import (
    IntegrityError,
    ProtocolError,
    RemoteError,
    SfsError,
    TransportError,
)
from sfs.common.manifest import MAX_CHUNK_SIZE, Manifest, file_id_of, verify_manifest
from sfs.common.protocol import ErrorCode
from sfs.peer.keys import Identity
from sfs.peer.partial import PartialFile, safe_filename
from sfs.peer.pins import PinStore
from sfs.peer.transfer import ChunkPlan, ReceiverLink

Progress = Callable[[int, int], None]  # (bytes done, total bytes)

_MAX_PEER_FRAME = MAX_CHUNK_SIZE + 64 * 1024


class OwnerOffline(SfsError):
    exit_code = 6


@dataclass(frozen=True)
class DownloadResult:
    file_id: str
    path: Path
    size: int
    sha256: str
    seconds: float
    holders: list[str]


def verify_lookup(file_id: str, lookup: protocol.LookupResult, pins: PinStore) -> Manifest:
    """Everything checked before a holder is contacted: that the manifest is the file
    id's, the owner's key against its pin, and the owner's signature over the manifest.
    A first-seen key is pinned only once everything holds."""
    if lookup.file_id != file_id or file_id_of(lookup.manifest) != file_id:
        raise IntegrityError(f"the broker returned a manifest that is not file {file_id}")
    pins.check(lookup.owner, lookup.owner_bundle, pin_new=False)
    manifest = verify_manifest(lookup.manifest, lookup.signature, lookup.owner_bundle)
    if manifest.owner != lookup.owner:
        raise IntegrityError("the manifest names a different owner than the broker reported")
    pins.check(lookup.owner, lookup.owner_bundle)
    return manifest


@contextlib.contextmanager
def _malformed_from(holder_name: str) -> Iterator[None]:
    """Name the holder in a decoding error: the user must learn who sent it."""
    try:
        yield
    except ProtocolError as exc:
        raise ProtocolError(f"{holder_name} sent a malformed message ({exc})") from exc


def read_reply(frames: list[bytes], holder_name: str) -> tuple[protocol.Envelope, bytes | None]:
    """A holder's reply: an envelope, and for a chunk the ciphertext after it. Raises
    `RemoteError` for an error reply and `ProtocolError` for anything malformed."""
    if len(frames) > 2:
        raise ProtocolError(f"{holder_name} sent a frame of unexpected shape")
    with _malformed_from(holder_name):
        envelope = protocol.decode_envelope(frames[0])
        protocol.raise_for_error(envelope, holder_name)
    return envelope, frames[1] if len(frames) == 2 else None


def read_chunk(
    envelope: protocol.Envelope, payload: bytes | None, holder_name: str
) -> tuple[protocol.ChunkHeader, bytes]:
    if envelope.op != "chunk" or payload is None:
        raise ProtocolError(f"{holder_name} sent a malformed chunk")
    with _malformed_from(holder_name):
        return from_wire(protocol.ChunkHeader, envelope.body, "chunk"), payload


class Downloader:
    def __init__(
        self,
        identity: Identity,
        pins: PinStore,
        context: zmq.Context[zmq.Socket[bytes]],
        window: int = 8,
        timeout: float = 10.0,
        transport_encryption: bool = True,
    ) -> None:
        self._identity = identity
        self._pins = pins
        self._context = context
        self._window = window
        self._timeout_ms = int(timeout * 1000)
        self._encrypt = transport_encryption

    def fetch(
        self,
        file_id: str,
        lookup: protocol.LookupResult,
        folder: Path,
        progress: Progress | None = None,
    ) -> DownloadResult:
        started = time.monotonic()
        manifest = verify_lookup(file_id, lookup, self._pins)
        if not lookup.holders:
            raise OwnerOffline(
                f"{lookup.owner} is offline: nobody is serving {manifest.name} right now; "
                f"try again when {lookup.owner} runs `sfs-peer serve`"
            )
        holder = lookup.holders[0]
        if holder.username == lookup.owner and not crypto.same_bytes(
            holder.bundle.fingerprint(), lookup.owner_bundle.fingerprint()
        ):
            raise IntegrityError("the broker gave two different keys for the owner")
        self._pins.check(holder.username, holder.bundle)

        partial = PartialFile(folder, file_id, manifest.size, manifest.chunk_size)
        try:
            link = ReceiverLink(
                self._identity, file_id, manifest, lookup.manifest, holder.username, holder.bundle
            )
            self._pull(link, holder, manifest, partial, progress)
            name = safe_filename(manifest.name, fallback=file_id)
            path = partial.finish(manifest.sha256, name)
        except BaseException:
            partial.discard()
            raise
        return DownloadResult(
            file_id,
            path,
            manifest.size,
            manifest.sha256.hex(),
            time.monotonic() - started,
            [holder.username],
        )

    def _socket(self, holder: protocol.Holder) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = _MAX_PEER_FRAME
        if self._encrypt:
            sock.curve_serverkey = holder.bundle.curve_z85()
            sock.curve_secretkey = self._identity.curve_secret_z85
            sock.curve_publickey = self._identity.curve_public_z85
        try:
            sock.connect(holder.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(
                f"cannot connect to {holder.username} at {holder.endpoint}: {exc}"
            ) from exc
        return sock

    def _pull(
        self,
        link: ReceiverLink,
        holder: protocol.Holder,
        manifest: Manifest,
        partial: PartialFile,
        progress: Progress | None,
    ) -> None:
        sock = self._socket(holder)
        try:
            link.accept_offer(self._handshake(sock, link, holder))

            plan = ChunkPlan(manifest, self._window)
            try:
                self._request(sock, link, plan)
                while not plan.complete:
                    reply = self._receive(sock, holder, "send the next chunk")
                    header, ciphertext = read_chunk(*reply, holder.username)
                    plaintext = link.open_chunk(header, ciphertext)
                    plan.accept(header.index, plaintext)
                    partial.write(header.index, plaintext)
                    if progress is not None:
                        progress(plan.bytes_done, manifest.size)
                    self._request(sock, link, plan)
            finally:
                # Done or cancelled: either way the holder can forget the transfer.
                with contextlib.suppress(zmq.Again):
                    finish = protocol.Finish(link.transfer_id)
                    sock.send(protocol.encode("finish", finish), flags=zmq.NOBLOCK)
        finally:
            sock.close(linger=100)

    def _handshake(
        self, sock: zmq.Socket[bytes], link: ReceiverLink, holder: protocol.Holder
    ) -> protocol.Offer:
        """Say hello until the holder offers the file; `busy` (the holder is checking
        our key with the broker, say) means: ask again shortly, until the timeout."""
        deadline = time.monotonic() + self._timeout_ms / 1000
        hello = protocol.encode("hello", link.hello())
        pause = 0.05
        while True:
            sock.send(hello)
            try:
                envelope, _ = self._receive(sock, holder, "answer the request")
                break
            except RemoteError as exc:
                if exc.code != ErrorCode.BUSY or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        if envelope.op != "offer":
            raise ProtocolError(f"{holder.username} sent {envelope.op[:40]!r}, not an offer")
        with _malformed_from(holder.username):
            return from_wire(protocol.Offer, envelope.body, "offer")

    def _request(self, sock: zmq.Socket[bytes], link: ReceiverLink, plan: ChunkPlan) -> None:
        for index in plan.next_requests():
            sock.send(protocol.encode("get", link.request(index)))

    def _receive(
        self, sock: zmq.Socket[bytes], holder: protocol.Holder, doing: str
    ) -> tuple[protocol.Envelope, bytes | None]:
        if not sock.poll(self._timeout_ms):
            raise TransportError(
                f"{holder.username} at {holder.endpoint} did not {doing} within "
                f"{self._timeout_ms // 1000} s"
            )
        return read_reply(sock.recv_multipart(), holder.username)
