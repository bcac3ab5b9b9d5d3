"""Holders without sockets: a real `HolderService` answering over in-memory channels.

`MemoryDialer` is the dialer a `Connector` uses for `DirectHint`s in these tests: each
endpoint names a `MemoryHolder`, and each dial opens a new in-memory channel to it, served
by a thread of its own (a connection, as a ROUTER sees one). A holder can be told to go
silent, to hang up, or to forge chunks, from a given chunk on.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable
from pathlib import Path

from sfs.common import protocol
from sfs.common.errors import TransportError
from sfs.common.manifest import MIN_CHUNK_SIZE, file_id_of
from sfs.common.tree_hash import blake3_256
from sfs.peer.channel import Channel, Interrupt, MemoryChannel, memory_pair
from sfs.peer.hints import DirectHint, Hint, RelayHint
from sfs.peer.keys import Identity
from sfs.peer.registry import Share
from sfs.peer.transfer import ChunkJob, HolderService
from tests.trees import file_tree

CHUNK = MIN_CHUNK_SIZE
_HANG_UP: list[bytes] = []  # a reply, by identity: close the connection instead


def share_of(owner: Identity, data: bytes) -> Share:
    """`data`, shared by `owner` with everyone, in chunks of `CHUNK`."""
    tree = file_tree(data, CHUNK, owner=owner.username, owner_fp=owner.fingerprint)
    encoded, pages = tree.header_bytes, tree.packed_pages
    return Share(
        file_id_of(encoded),
        Path("/nonexistent"),  # never read: the holders read `data` from memory
        "data.bin",
        len(data),
        encoded,
        owner.sign(encoded),
        None,
        [],
        0,
        pages=pages,
    )


def lookup_of(
    owner: Identity, share: Share, holders: list[protocol.Holder]
) -> protocol.LookupResult:
    return protocol.LookupResult(
        share.file_id,
        owner.username,
        owner.bundle,
        share.manifest,
        share.signature,
        holders,
        None,
        owner.sign(protocol.grant_payload(share.file_id, None)),
    )


class MemoryHolder:
    """`identity` serving `share` (whose bytes are `data`) through a `HolderService`.

    `check_requester` runs as the service's requester check (raise `Refused` to answer
    busy, say). From the `silent_from`-th chunk reply on (counted from 0 over all of
    its connections) the holder answers nothing more; from `hang_up_from` on it closes
    the connection instead; chunks whose index is in `forge` are other bytes sealed under
    the real transfer key. `before_chunk(n)` runs before the n-th chunk reply.
    `let_down` is set when it first withholds a chunk or hangs up; `closed`, when a
    connection it served chunks on has ended (not the one that only sent the index)."""

    def __init__(
        self,
        identity: Identity,
        share: Share,
        data: bytes,
        check_requester: Callable[[str, object], None] | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.identity = identity
        self._endpoint = endpoint or f"memory://{identity.username}"
        self.share = share
        self.data = data
        self.silent_from: int | None = None
        self.hang_up_from: int | None = None
        self.forge_from: int | None = None
        self.let_down = threading.Event()
        self.closed = threading.Event()
        self.before_chunk: Callable[[int], None] | None = None
        self.chunks_sent = 0
        self.frames_seen = 0
        self.service = HolderService(
            identity,
            lambda file_id: share if file_id == share.file_id else None,
            check_requester or (lambda requester, bundle: None),
            self._read,
        )
        self._lock = threading.Lock()  # the service is not thread-safe; connections are
        self._forged: dict[int, bytes] = {}

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def holder(self) -> protocol.Holder:
        return protocol.Holder(self.identity.username, self.endpoint, self.identity.bundle)

    def _read(self, share: Share, offset: int, length: int) -> bytes:
        index = offset // CHUNK
        if index in self._forged:
            return self._forged[index]
        return self.data[offset : offset + length]

    def serve(self, channel: MemoryChannel, connection: bytes) -> None:
        """Answer what arrives on `channel` until the other end closes it."""
        chunks_before = self.chunks_sent
        try:
            while True:
                frames = channel.receive(60)
                if frames is None:
                    continue
                reply = self._answer(connection, frames[-1])
                if reply is None:
                    continue
                if reply is _HANG_UP:
                    channel.close()
                    return
                if reply:
                    channel.send(reply)
        except TransportError:  # the download closed its end
            pass
        finally:
            if self.chunks_sent != chunks_before or self.let_down.is_set():
                self.closed.set()

    def _answer(self, connection: bytes, frame: bytes) -> list[bytes] | None:
        with self._lock:
            self.frames_seen += 1
            answer = self.service.receive(connection, None, frame)
            if not isinstance(answer, ChunkJob):
                return answer
            sent = self.chunks_sent
            if self.silent_from is not None and sent >= self.silent_from:
                self.let_down.set()
                return None
            if self.hang_up_from is not None and sent >= self.hang_up_from:
                self.let_down.set()
                return _HANG_UP
            if self.forge_from is not None and sent >= self.forge_from:
                real = self.data[answer.offset : answer.offset + answer.length]
                forged = bytes([real[0] ^ 1]) + real[1:]
                self._forged[answer.index] = forged
                # The service seals only what matches its manifest: let it match the forgery.
                answer = dataclasses.replace(answer, chunk_hash=blake3_256(forged))
            self.chunks_sent += 1
        if self.before_chunk is not None:
            self.before_chunk(sent)
        with self._lock:
            return self.service.complete(answer, self.service.read(answer))


class MemoryDialer:
    """Opens in-memory channels to `MemoryHolder`s by endpoint. An endpoint in `mute`
    accepts the channel and never reads from it; one not listed cannot be reached; one
    in `gates` opens only once its event is set (calling `interrupt` meanwhile, as a
    slow connection would)."""

    def __init__(self, *holders: MemoryHolder) -> None:
        self.holders = {holder.endpoint: holder for holder in holders}
        self.mute: set[str] = set()
        self.gates: dict[str, threading.Event] = {}
        self.dialed: list[str] = []
        self._ids = itertools.count()
        self._threads: list[threading.Thread] = []
        self._kept: list[MemoryChannel] = []  # the far ends of mute channels

    def dial(
        self, holder: protocol.Holder, hint: Hint, timeout: float, interrupt: Interrupt
    ) -> Channel:
        assert isinstance(hint, (DirectHint, RelayHint))  # a relay is one more hop, in memory
        self.dialed.append(hint.endpoint)
        gate = self.gates.get(hint.endpoint)
        while gate is not None and not gate.wait(0.05):
            interrupt()
        near, far = memory_pair(hint.endpoint)
        if hint.endpoint in self.mute:
            self._kept.append(far)
            return near
        target = self.holders.get(hint.endpoint)
        if target is None:
            raise TransportError(f"no answer from {hint.endpoint} within {timeout:g} s")
        thread = threading.Thread(
            target=target.serve, args=(far, b"conn-%d" % next(self._ids)), daemon=True
        )
        thread.start()
        self._threads.append(thread)
        return near

    def join(self) -> None:
        """Wait for every serving thread: each ends when the download closes its end."""
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive(), "a download left a channel open"
