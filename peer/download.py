"""The download engine: checks what the broker says, then pulls the file from every
online holder at once over DEALER -> ROUTER, several chunk requests in flight each,
verifying each chunk against the owner's signed manifest whoever sent it.

Order of checks (DESIGN section 5): the owner's pinned fingerprint, the manifest
signature and the file id are verified before any holder is contacted; when one fails,
nothing is touched. Nothing unverified ever reaches the disk, let alone the final path.

A download ends when its last chunk is verified, whatever the other holders are doing.
When a holder fails (silence, a refusal, a chunk that does not verify), it is dropped and
the others take over its chunks; a holder that has not answered its hello within
`hello_timeout` while others deliver is set aside the same way. When no holder is left,
the verified chunks stay, and the next `get` of the same file into the same folder
fetches only the rest; so do they on Ctrl-C. A local storage error, or a whole file that
does not match its signed hash, removes the temporary file.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from sfs.common import crypto, protocol
from sfs.common.codec import from_wire
from sfs.common.errors import (
    IntegrityError,
    ProtocolError,
    RemoteError,
    SfsError,
    StorageError,
    TransportError,
    TrustError,
)
from sfs.common.manifest import MAX_CHUNK_SIZE, Manifest, file_id_of, verify_manifest
from sfs.common.protocol import ErrorCode
from sfs.peer.keys import Identity
from sfs.peer.partial import PartialFile, safe_filename
from sfs.peer.pins import PinStore
from sfs.peer.transfer import ChunkPlan, ReceiverLink

DownloadProgress = Callable[[int, int, int], None]  # (bytes done, total, holders sending)

_MAX_PEER_FRAME = MAX_CHUNK_SIZE + 64 * 1024
_POLL_SLICE_MS = 100
# How long a finished download waits for the holders' threads to close their sockets:
# they notice the stop within a poll slice. The caller may destroy the zmq context next.
_JOIN_GRACE = 2.0

log = logging.getLogger("sfs.peer")


class OwnerOffline(SfsError):
    exit_code = 6


@dataclass(frozen=True)
class DownloadResult:
    file_id: str
    path: Path
    size: int
    sha256: str
    seconds: float
    holders: list[str]  # those that sent chunks
    bytes_fetched: int  # over the network; the rest was resumed from an earlier attempt
    chunks_resumed: int
    seeding: bool = False  # this peer now serves its copy too


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


class DownloadInterrupted(SfsError):
    """A download stopped part way; its verified chunks stay for the next `get`."""

    def __init__(self, cause: SfsError, kept: int, total: int) -> None:
        super().__init__(
            f"{cause} ({_mib(kept)} of {_mib(total)} kept: run the same get again to resume)"
        )
        self.exit_code = cause.exit_code
        self.cause = cause


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _keep_verified(partial: PartialFile, plan: ChunkPlan) -> bool:
    """Stop, keeping the temporary file if it holds verified chunks; whether it does."""
    if plan.bytes_done or partial.found:
        partial.keep()
        return True
    partial.discard()
    return False


def _open_chunk(link: ReceiverLink, header: protocol.ChunkHeader, ciphertext: bytes) -> bytes:
    """`link.open_chunk`, naming the holder when the GCM tag fails."""
    try:
        return link.open_chunk(header, ciphertext)
    except IntegrityError as exc:
        if not crypto.same_bytes(header.transfer_id, link.transfer_id):
            raise  # another transfer's chunk: the message names the holder already
        raise IntegrityError(
            f"chunk {header.index} from {link.holder_name} failed authentication (tampered?)"
        ) from exc


# Which error explains a failed download best, when several holders failed differently:
# evidence of tampering first, then local trouble, then the holders' answers, then silence.
_RANK: tuple[type[SfsError], ...] = (
    IntegrityError,
    TrustError,
    StorageError,
    ProtocolError,
    RemoteError,
    TransportError,
)


def _most_telling(errors: list[SfsError]) -> SfsError:
    def rank(error: SfsError) -> int:
        return next((i for i, kind in enumerate(_RANK) if isinstance(error, kind)), len(_RANK))

    return min(errors, key=rank)


# What the holders or the network can cause. Whoever failed, the chunks verified so far
# stay: each was checked against the owner's signed manifest before it was written.
_HOLDER_FAILURES = (IntegrityError, TrustError, ProtocolError, RemoteError, TransportError)


class _Stopped(Exception):
    """The download is over (complete, a local failure, or Ctrl-C)."""


class _SetAside(Exception):
    """This holder has not answered its hello in time while others deliver."""


@dataclass
class _Download:
    """What the holders' threads share; `lock` guards the plan and the partial file."""

    file_id: str
    lookup: protocol.LookupResult
    manifest: Manifest
    plan: ChunkPlan
    partial: PartialFile
    progress: DownloadProgress | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    complete: threading.Event = field(default_factory=threading.Event)  # last chunk verified
    errors: list[SfsError] = field(default_factory=list)
    delivered: dict[str, int] = field(default_factory=dict)  # holder -> chunks received
    active: int = 0  # holders sending chunks right now

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.plan.bytes_done, self.manifest.size, self.active)


class Downloader:
    def __init__(
        self,
        identity: Identity,
        pins: PinStore,
        context: zmq.Context[zmq.Socket[bytes]],
        window: int = 8,
        timeout: float = 10.0,
        transport_encryption: bool = True,
        hello_timeout: float = 2.0,
    ) -> None:
        """`window`: chunk requests in flight per holder; `timeout`: the longest wait for
        any answer; `hello_timeout`: how long a holder may leave its hello unanswered
        while others deliver, before it is set aside."""
        self._identity = identity
        self._pins = pins
        self._context = context
        self._window = window
        self._timeout = timeout
        self._encrypt = transport_encryption
        self._hello_timeout = hello_timeout

    def fetch(
        self,
        file_id: str,
        lookup: protocol.LookupResult,
        folder: Path,
        progress: DownloadProgress | None = None,
    ) -> DownloadResult:
        started = time.monotonic()
        manifest = verify_lookup(file_id, lookup, self._pins)
        holders = self._usable_holders(lookup, manifest)
        partial = PartialFile(folder, file_id, manifest)
        plan = ChunkPlan(manifest, self._window)
        download = _Download(file_id, lookup, manifest, plan, partial, progress)
        try:
            for index in partial.resume():
                plan.adopt(index)
            download.report()
            if not plan.complete:
                self._pull_from(holders, download)
        except _HOLDER_FAILURES as exc:  # no holder left: gone, convicted or refusing
            if not _keep_verified(partial, plan):
                raise
            raise DownloadInterrupted(exc, plan.bytes_done, manifest.size) from exc
        except KeyboardInterrupt:  # perhaps while resume() reads what an earlier try kept
            _keep_verified(partial, plan)
            raise
        except BaseException:  # a full disk, or a bug: start afresh next time
            partial.discard()
            raise
        try:
            path = partial.finish(safe_filename(manifest.name, fallback=file_id))
        except KeyboardInterrupt:  # every chunk is verified
            partial.keep()
            raise
        except BaseException:  # the whole-file hash, or the disk: start afresh next time
            partial.discard()
            raise
        for error in download.errors:
            if isinstance(error, IntegrityError):  # a holder worth knowing about
                log.warning("%s; the other holders sent that chunk", error)
        return DownloadResult(
            file_id,
            path,
            manifest.size,
            manifest.sha256.hex(),
            time.monotonic() - started,
            [name for name, chunks in download.delivered.items() if chunks],
            plan.bytes_done - plan.bytes_resumed,
            plan.resumed,
        )

    def _usable_holders(
        self, lookup: protocol.LookupResult, manifest: Manifest
    ) -> list[protocol.Holder]:
        """The online holders whose keys pass their pins (pinning new ones); not us."""
        usable, refused = [], []
        for holder in lookup.holders:
            if holder.username == self._identity.username:
                continue
            if holder.username == lookup.owner and not crypto.same_bytes(
                holder.bundle.fingerprint(), lookup.owner_bundle.fingerprint()
            ):
                raise IntegrityError("the broker gave two different keys for the owner")
            try:
                self._pins.check(holder.username, holder.bundle)
            except TrustError as exc:  # one substituted key must not stop the others
                refused.append(exc)
                continue
            usable.append(holder)
        if refused and not usable:
            raise refused[0]
        if not usable:
            raise OwnerOffline(
                f"{lookup.owner} is offline: nobody is serving {manifest.name} right now; "
                f"try again when {lookup.owner} runs `sfs-peer serve`"
            )
        return usable

    def _pull_from(self, holders: list[protocol.Holder], download: _Download) -> None:
        """Pull the missing chunks from every holder at once, one thread each; the
        survivors take over the chunks of a holder that fails. Returns as soon as the
        last chunk is verified, without waiting for holders that are still silent."""
        threads = [
            threading.Thread(
                target=self._holder_thread,
                args=(holder, download),
                name=f"download-{holder.username}",
                daemon=True,
            )
            for holder in holders
        ]
        for thread in threads:
            thread.start()
        try:
            # In slices, so that Ctrl-C gets through.
            while not download.complete.wait(0.1):
                if download.stop.is_set() or not any(t.is_alive() for t in threads):
                    break
        finally:
            # Done, failed or Ctrl-C: tell the threads, and let each close its own socket
            # (zmq sockets are not thread-safe, and the caller may destroy the context).
            download.stop.set()
            deadline = time.monotonic() + _JOIN_GRACE
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        with download.lock:  # a thread past its grace may still record a failure
            complete, errors = download.plan.complete, list(download.errors)
        if not complete:
            raise (
                _most_telling(errors)
                if errors
                else TransportError("every holder stopped before the download was complete")
            )

    def _holder_thread(self, holder: protocol.Holder, download: _Download) -> None:
        mine: set[int] = set()  # chunks asked of this holder and not yet received
        try:
            self._pull(holder, download, mine)
        except _Stopped:
            pass
        except _SetAside:
            log.info(
                "set %s aside: no answer to its hello within %g s while others deliver",
                holder.username,
                self._hello_timeout,
            )
        except SfsError as exc:  # this holder is dropped; the others go on
            with download.lock:
                download.errors.append(exc)
            if isinstance(exc, StorageError):  # local trouble: no holder can help
                download.stop.set()
        except BaseException as exc:  # a bug: end the download, report it as such
            with download.lock:
                download.errors.append(SfsError(f"internal error while downloading: {exc!r}"))
            download.stop.set()
        finally:
            with download.lock:
                download.plan.release(mine)

    def _pull(self, holder: protocol.Holder, download: _Download, mine: set[int]) -> None:
        sock = self._socket(holder)
        link = ReceiverLink(
            self._identity,
            download.file_id,
            download.manifest,
            download.lookup.manifest,
            holder.username,
            holder.bundle,
        )
        try:
            link.accept_offer(self._handshake(sock, link, holder, download))
            with download.lock:
                download.active += 1
                download.delivered.setdefault(holder.username, 0)
            try:
                self._receive_chunks(sock, link, holder, download, mine)
            finally:
                with download.lock:
                    download.active -= 1
        finally:
            # Done or cancelled: either way the holder can forget the transfer.
            if link.transfer_id:
                with contextlib.suppress(zmq.Again):
                    finish = protocol.Finish(link.transfer_id)
                    sock.send(protocol.encode("finish", finish), flags=zmq.NOBLOCK)
            sock.close(linger=100)

    def _receive_chunks(
        self,
        sock: zmq.Socket[bytes],
        link: ReceiverLink,
        holder: protocol.Holder,
        download: _Download,
        mine: set[int],
    ) -> None:
        plan, partial = download.plan, download.partial
        while True:
            with download.lock:
                if plan.complete:
                    download.complete.set()
                    return
                wanted = plan.claim(self._window - len(mine))
            for index in wanted:
                sock.send(protocol.encode("get", link.request(index)))
            mine.update(wanted)
            if not mine:  # the rest is on its way from others; one may yet fail
                self._sleep(download.stop, 0.05)
                continue
            reply = self._reply(sock, holder, "send the next chunk", download.stop)
            header, ciphertext = read_chunk(*reply, holder.username)
            name = holder.username
            if header.index not in mine:
                raise IntegrityError(
                    f"chunk {header.index} from {name} arrived without being requested"
                )
            plaintext = _open_chunk(link, header, ciphertext)
            with download.lock:
                try:
                    plan.check(header.index, plaintext)
                except IntegrityError as exc:  # authentic from this holder, yet not the file
                    raise IntegrityError(
                        f"chunk {header.index} from {name} does not match the owner's signed "
                        f"manifest: {name}'s copy may have changed since it was shared, or be "
                        "forged"
                    ) from exc
                partial.write(header.index, plaintext)
                plan.done(header.index)
                download.delivered[holder.username] += 1
                download.report()
            mine.discard(header.index)

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

    def _handshake(
        self,
        sock: zmq.Socket[bytes],
        link: ReceiverLink,
        holder: protocol.Holder,
        download: _Download,
    ) -> protocol.Offer:
        """Say hello until the holder offers the file; `busy` (the holder is checking
        our key with the broker, say) means: ask again shortly, until the timeout.
        Raises `_SetAside` once `hello_timeout` has passed without an offer while
        another holder delivers: this one must not hold the others up."""
        started = time.monotonic()
        deadline = started + self._timeout

        def set_aside() -> None:
            if time.monotonic() - started > self._hello_timeout and download.active:
                raise _SetAside

        hello = protocol.encode("hello", link.hello())
        pause = 0.05
        while True:
            sock.send(hello)
            try:
                envelope, _ = self._reply(
                    sock, holder, "answer the request", download.stop, set_aside
                )
                break
            except RemoteError as exc:
                if exc.code != ErrorCode.BUSY or time.monotonic() + pause > deadline:
                    raise
            set_aside()
            self._sleep(download.stop, pause)
            pause = min(pause * 2, 1.0)
        if envelope.op != "offer":
            raise ProtocolError(f"{holder.username} sent {envelope.op[:40]!r}, not an offer")
        with _malformed_from(holder.username):
            return from_wire(protocol.Offer, envelope.body, "offer")

    def _reply(
        self,
        sock: zmq.Socket[bytes],
        holder: protocol.Holder,
        doing: str,
        stop: threading.Event,
        between: Callable[[], None] | None = None,
    ) -> tuple[protocol.Envelope, bytes | None]:
        """The holder's next reply, waiting at most the timeout, in short slices so that
        a stop is noticed soon; `between` runs after each empty slice (and may raise)."""
        deadline = time.monotonic() + self._timeout
        while not sock.poll(_POLL_SLICE_MS):
            if stop.is_set():
                raise _Stopped
            if between is not None:
                between()
            if time.monotonic() > deadline:
                raise TransportError(
                    f"{holder.username} at {holder.endpoint} did not {doing} within "
                    f"{self._timeout:g} s"
                )
        return read_reply(sock.recv_multipart(), holder.username)

    @staticmethod
    def _sleep(stop: threading.Event, seconds: float) -> None:
        if stop.wait(seconds):
            raise _Stopped
