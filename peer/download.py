"""The download engine: checks what the broker says, then pulls the file from every
online holder at once, several chunk requests in flight each, verifying each chunk
against the owner's signed manifest whoever sent it.

Each holder gets a thread that opens a channel to it (`Connector`, from the holder's
connection hints) and runs a `ReceiverSession` over it; this module is what the holders
share: the chunk plan, the file being written, progress, and who failed how.

Order of checks (DESIGN section 5): the owner's pinned fingerprint, the manifest
signature and the file id are verified before any holder is contacted; when one fails,
nothing is touched. Nothing unverified ever reaches the disk, let alone the final path.

A download ends when its last chunk is verified, whatever the other holders are doing.
When a holder fails (silence, a refusal, a chunk that does not verify), it is dropped and
the others take over its chunks; a holder that has not answered its hello within
`hello_timeout` while others deliver is set aside the same way. When no holder is left,
the verified chunks stay, and the next `get` of the same file into the same folder
fetches only the rest; so do they on Ctrl-C. A local storage error removes a file's
temporary file, and keeps a folder's staging tree (`tree_staging`: its files are the
download).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from sfs.common import crypto, protocol
from sfs.common.codec import from_wire, unpack
from sfs.common.errors import (
    IntegrityError,
    ProtocolError,
    RemoteError,
    SfsError,
    StorageError,
    TransportError,
    TrustError,
)
from sfs.common.manifest import file_id_of
from sfs.common.tree import FILE, FOLDER, Entry, TreeHeader, verify_header
from sfs.common.tree_index import IndexReader, TreeIndex
from sfs.peer.channel import Channel, RelayChannel
from sfs.peer.connect import (
    Connector,
    DataDialer,
    ZmqDataDialer,
    on_holder_host,
    zmq_connector,
)
from sfs.peer.direct_writes import ChunkBuffers
from sfs.peer.files_done import FilesDone
from sfs.peer.hints import hints_of
from sfs.peer.keys import Identity
from sfs.peer.partial import PartialFile, safe_filename
from sfs.peer.pins import PinStore
from sfs.peer.receiver import Offered, ReceiverSession, Sealed, SetAside, malformed_from
from sfs.peer.receiver import read_chunk as read_chunk  # re-exported: replies are read there
from sfs.peer.receiver import read_reply as read_reply
from sfs.peer.stamps import FileStamp
from sfs.peer.transfer import ChunkPlan, ReceiverLink
from sfs.peer.tree_staging import StagingTree

# (bytes done, total, the names of the holders sending chunks now)
# (bytes done, bytes wanted, holders sending now, (files whole, files wanted))
DownloadProgress = Callable[[int, int, list[str], tuple[int, int]], None]

_POLL_SLICE = 0.1  # seconds: how soon a holder's thread notices that the download stopped
# How long a finished download waits for the holders' threads to close their channels:
# they notice the stop within a poll slice. The caller may destroy the zmq context next.
_JOIN_GRACE = 2.0
# Threads that hash and write the chunks of a download, beside the holders' threads that
# receive and open them: SHA-256 and pwrite release the GIL, so both cores work. Two:
# the cores of the machine measured (docs/PERFORMANCE.md).
CHUNK_WORKERS = 2
_WRITE_SLICE = 0.002  # seconds: the wait for a reply while only writes are pending
# How long the holder has to answer a data connection's attach; a data port kept full
# by others must not cost more than this before the chunks are asked on the control one.
ATTACH_ANSWER_WAIT = 2.0
# Chunks arrived and not yet stored, beyond the window: one per worker, and the one the
# receiving thread stores itself when no worker is free.
_STORING = CHUNK_WORKERS + 1

log = logging.getLogger("sfs.peer")


class OwnerOffline(SfsError):
    exit_code = 6


@dataclass(frozen=True)
class DownloadResult:
    file_id: str
    path: Path
    size: int
    chunks: int  # each checked against its BLAKE3 hash in the owner-signed tree
    seconds: float
    holders: list[str]  # those that sent chunks
    bytes_fetched: int  # over the network; the rest was resumed from an earlier attempt
    chunks_resumed: int
    seeding: bool = False  # this peer now serves its copy too
    files: int = 1  # files in the share (a folder share holds many)
    files_resumed: int = 0  # files whole from an earlier attempt's chunks alone
    stamp: FileStamp | None = None  # the file as linked into place (see `stamps`)
    # holder -> the way its channel went (`tcp://...` direct, `relay tcp://...`)
    paths: dict[str, str] = field(default_factory=dict)


OLDER_SHARE = "{} was shared with an older sfs: its owner must share it again"


def verify_lookup(file_id: str, lookup: protocol.LookupResult, pins: PinStore) -> TreeHeader:
    """Everything checked before a holder is contacted: that the tree header is the file
    id's, the owner's key against its pin, and the owner's signature over the header.
    A first-seen key is pinned only once everything holds."""
    if lookup.file_id != file_id or file_id_of(lookup.manifest) != file_id:
        raise IntegrityError(f"the broker returned a manifest that is not file {file_id}")
    pins.check(lookup.owner, lookup.owner_bundle, pin_new=False)
    if _is_version_1(lookup.manifest):
        raise ProtocolError(OLDER_SHARE.format(file_id))
    header = verify_header(lookup.manifest, lookup.signature, lookup.owner_bundle)
    if header.owner != lookup.owner:
        raise IntegrityError("the manifest names a different owner than the broker reported")
    pins.check(lookup.owner, lookup.owner_bundle)
    return header


def _is_version_1(manifest: bytes) -> bool:
    """A version 1 file manifest (brokers keep those from before the upgrade)."""
    try:
        value = unpack(manifest)
    except ProtocolError:
        return False
    return isinstance(value, dict) and value.get("version") == 1


class DownloadInterrupted(SfsError):
    """A download stopped part way; its verified chunks stay for the next `get`."""

    def __init__(
        self, cause: SfsError, kept: int, total: int, files: FilesDone | None = None
    ) -> None:
        whole = f", {files.done:,} of {files.total:,} files whole" if files else ""
        super().__init__(
            f"{cause} ({_mib(kept)} of {_mib(total)} kept{whole}: run the same get again to resume)"
        )
        self.exit_code = cause.exit_code
        self.cause = cause


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


Storage = PartialFile | StagingTree  # a file share's, a folder share's


def _keep_verified(partial: Storage, plan: ChunkPlan) -> bool:
    """Stop, keeping the temporary file if it holds verified chunks; whether it does."""
    if plan.bytes_done or partial.found:
        partial.keep()
        return True
    partial.discard()
    return False


def _stopped_on_storage(partial: Storage, exc: StorageError) -> StorageError:
    """A full disk, say. A file's temporary file is removed; a folder's staging tree is
    kept (its files are the download: a folder may be large, and freeing some space is
    the usual way out)."""
    if isinstance(partial, PartialFile):
        partial.discard()
        return exc
    partial.keep()
    return StorageError(f"{exc}; the verified chunks are kept: run the same get again to resume")


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


@dataclass
class _Download:
    """What the holders' threads share; `lock` guards the plan and the partial file."""

    file_id: str
    lookup: protocol.LookupResult
    manifest: TreeIndex
    plan: ChunkPlan
    partial: Storage
    progress: DownloadProgress | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    complete: threading.Event = field(default_factory=threading.Event)  # last chunk verified
    errors: list[SfsError] = field(default_factory=list)
    workers: ThreadPoolExecutor | None = None  # hash and write chunks
    delivered: dict[str, int] = field(default_factory=dict)  # holder -> chunks received
    sending: set[str] = field(default_factory=set)  # holders sending chunks right now
    paths: dict[str, str] = field(default_factory=dict)  # holder -> its channel's address
    total: int = -1  # bytes of the chunks wanted; -1: all of them
    files: FilesDone | None = None
    # Where chunks are decrypted, to be written from without a copy (`direct_writes`):
    # in the hands of the workers and the receiving threads at once, at most.
    buffers: ChunkBuffers = field(default_factory=lambda: ChunkBuffers(0, 0))

    def report(self) -> None:
        if self.progress is not None:
            total = self.manifest.size if self.total < 0 else self.total
            files = (self.files.done, self.files.total) if self.files else (0, 0)
            self.progress(self.plan.bytes_done, total, sorted(self.sending), files)

    def verified(self, index: int, resumed: bool = False) -> None:
        """A chunk verified on disk (written now, or `resumed` from an earlier attempt);
        under `lock`, or before the holders' threads start."""
        if index in self.plan.have or index in self.plan.excluded:
            return
        if self.files is not None:
            self.files.chunk_done(index)
        if resumed:
            self.plan.adopt(index)
        else:
            self.plan.done(index)

    def open(self, sealed: Sealed) -> bytes | memoryview:
        """Decrypt a chunk into one of `buffers` (new bytes if none is free); the caller
        gives it back once the chunk is stored or refused."""
        buffer = self.buffers.take()
        try:
            plaintext = sealed.open(buffer)
        except BaseException:
            if buffer is not None:
                self.buffers.give(buffer)
            raise
        if buffer is not None and not (
            isinstance(plaintext, memoryview) and plaintext.obj is buffer.obj
        ):
            self.buffers.give(buffer)  # too long for it: decrypted into new bytes
        return plaintext

    def store(self, holder_name: str, index: int, plaintext: bytes | memoryview) -> None:
        """Check a chunk against the owner's signed manifest and write it. The hash and
        the write run outside `lock` (the partial file has its own), so holders' threads
        verify chunks side by side: hashlib and pwrite release the GIL."""
        with self.lock:
            if index not in self.plan.in_flight:
                raise IntegrityError(
                    f"chunk {index} from {holder_name} arrived without being requested"
                )
        try:
            self.partial.write(index, plaintext)
        except IntegrityError as exc:  # authentic from this holder, yet not the file
            raise IntegrityError(
                f"chunk {index} from {holder_name} does not match the owner's signed "
                f"manifest: {holder_name}'s copy may have changed since it was shared, "
                "or be forged"
            ) from exc
        with self.lock:
            self.verified(index)
            self.delivered[holder_name] += 1
            self.report()


class Downloader:
    def __init__(
        self,
        identity: Identity,
        pins: PinStore,
        context: zmq.Context[zmq.Socket[bytes]] | None,
        window: int = 8,
        timeout: float = 10.0,
        transport_encryption: bool = True,
        hello_timeout: float = 2.0,
        connector: Connector | None = None,
        clock: Callable[[], float] = time.monotonic,
        data_dialer: DataDialer | None = None,
    ) -> None:
        """`window`: chunk requests in flight per holder; `timeout`: the longest wait for
        a connection or any answer; `hello_timeout`: how long a holder may leave its
        hello unanswered while others deliver, before it is set aside. `connector`
        turns holders into channels: by default direct zmq connections in `context`.
        `data_dialer` opens the data connections offers name (by default zmq in
        `context`); without one, chunks travel on the control channel."""
        if data_dialer is None and context is not None:
            data_dialer = ZmqDataDialer(context)
        if connector is None:
            if context is None:
                raise ValueError("a Downloader needs a zmq context or a connector")
            connector = zmq_connector(context, identity, transport_encryption, timeout)
        self._identity = identity
        self._pins = pins
        self._connector = connector
        self._data_dialer = data_dialer
        self._window = window
        self._timeout = timeout
        self._hello_timeout = hello_timeout
        self._clock = clock

    def fetch_index(self, file_id: str, lookup: protocol.LookupResult) -> TreeIndex:
        """The share's index from the first holder that serves it whole, each page checked
        against the signed header and the whole tree against the path rules before it is
        returned. A holder whose pages do not check out is not asked again."""
        header = verify_lookup(file_id, lookup, self._pins)
        errors: list[SfsError] = []
        holders = list(self._usable_holders(lookup, header))
        for place, holder in enumerate(holders):
            # A holder that does not answer its hello within `hello_timeout` is passed over
            # while others are left to ask; the last one gets the whole `timeout`.
            others_left = place < len(holders) - 1
            try:
                return self._index_from(holder, file_id, lookup, header, others_left)
            except SetAside:
                errors.append(
                    TransportError(
                        f"{holder.username} did not answer within {self._hello_timeout:g} s"
                    )
                )
            except IntegrityError as exc:
                if str(exc).startswith("unsafe tree"):  # the owner's own tree: nobody can help
                    raise
                errors.append(exc)
            except (TrustError, ProtocolError, RemoteError, TransportError) as exc:
                errors.append(exc)
        raise _most_telling(errors)

    def _index_from(
        self,
        holder: protocol.Holder,
        file_id: str,
        lookup: protocol.LookupResult,
        header: TreeHeader,
        others_left: bool,
    ) -> TreeIndex:
        link = ReceiverLink(
            self._identity, file_id, header, lookup.manifest, holder.username, holder.bundle
        )
        session = ReceiverSession(
            link, self._window, self._timeout, self._hello_timeout, self._clock()
        )
        reader = IndexReader(header)

        def interrupt() -> None:
            session.expire(self._clock(), others_left)

        channel = self._connector.connect(holder, hints_of(holder), interrupt)
        try:
            channel.send(session.connected(channel.address, self._clock()))
            while session.room == 0:  # until the offer
                now = self._clock()
                for frames in session.due(now):
                    channel.send(frames)
                reply = channel.receive(session.wait(now, others_left))
                if reply is None:
                    session.expire(self._clock(), others_left)
                    continue
                session.receive(reply, self._clock())
            wanted = reader.wanted()
            ahead = 0  # pages asked for and not yet received
            for kind, index in wanted[: self._window]:
                channel.send([protocol.encode("page", link.page_request(kind, index))])
                ahead += 1
            asked = ahead
            while ahead:
                reply = channel.receive(self._timeout)
                if reply is None:
                    raise TransportError(
                        f"{holder.username} did not send the share's index within "
                        f"{self._timeout:g} s"
                    )
                envelope, payload = read_reply(reply, holder.username)
                if envelope.op != "page" or payload is None:
                    raise ProtocolError(f"{holder.username} sent a malformed index page")
                with malformed_from(holder.username):
                    page_header = from_wire(protocol.PageHeader, envelope.body, "page")
                page = link.open_page(page_header, payload)
                if (page_header.kind, page_header.index) not in wanted:
                    raise IntegrityError(f"{holder.username} sent a page nobody asked for")
                try:
                    reader.add(page_header.kind, page_header.index, page)
                except IntegrityError as exc:
                    raise IntegrityError(f"{holder.username}: {exc}") from exc
                ahead -= 1
                if asked < len(wanted):
                    kind, index = wanted[asked]
                    channel.send([protocol.encode("page", link.page_request(kind, index))])
                    asked, ahead = asked + 1, ahead + 1
        finally:
            goodbye = session.finish()
            if goodbye is not None:
                with contextlib.suppress(TransportError):
                    channel.send(goodbye)
            channel.close()
        return reader.finish()

    def fetch(
        self,
        file_id: str,
        lookup: protocol.LookupResult,
        folder: Path,
        progress: DownloadProgress | None = None,
        tree: TreeIndex | None = None,
        chosen: set[int] | None = None,
    ) -> DownloadResult:
        """Download the share into `folder`; `tree`: its index, if fetched already;
        `chosen`: of a folder share, only these entries (`TreeIndex.matching`)."""
        started = time.monotonic()
        if tree is None:
            tree = self.fetch_index(file_id, lookup)
        manifest = tree
        holders = self._usable_holders(lookup, manifest.header)
        partial: Storage = (
            StagingTree(folder, file_id, manifest, chosen)
            if manifest.kind == FOLDER
            else PartialFile(folder, file_id, manifest)
        )
        wanted = None if chosen is None else manifest.chunks_of_entries(chosen)
        excluded = frozenset(() if wanted is None else set(range(manifest.chunk_count)) - wanted)
        plan = ChunkPlan(manifest, self._window, excluded=excluded)
        download = _Download(file_id, lookup, manifest, plan, partial, progress)
        download.buffers = ChunkBuffers(manifest.chunk_size, 2 * (CHUNK_WORKERS + 2))
        if wanted is not None:
            download.total = sum(manifest.chunk_length(index) for index in wanted)
        chosen_files: list[Entry] = []
        file_numbers: list[int] = []  # of the chosen files, among the share's files
        file_number = 0
        for number, entry in enumerate(manifest.entries):
            if entry.kind != FILE:
                continue
            if chosen is None or number in chosen:
                chosen_files.append(entry)
                file_numbers.append(file_number)
            file_number += 1
        download.files = FilesDone(manifest.chunks, None if chosen is None else file_numbers)
        empty = download.files.done  # whole without a chunk: not resumed
        try:
            for index in partial.resume():
                download.verified(index, resumed=True)
            files_resumed = download.files.done - empty
            download.report()
            if not plan.complete:
                self._pull_from(holders, download)
        except _HOLDER_FAILURES as exc:  # no holder left: gone, convicted or refusing
            if not _keep_verified(partial, plan):
                raise
            files = download.files if manifest.kind == FOLDER else None
            raise DownloadInterrupted(exc, plan.bytes_done, manifest.size, files) from exc
        except KeyboardInterrupt:  # perhaps while resume() reads what an earlier try kept
            _keep_verified(partial, plan)
            raise
        except StorageError as exc:
            raise _stopped_on_storage(partial, exc) from exc
        except BaseException:  # a bug: start afresh next time
            partial.discard()
            raise
        try:
            if isinstance(partial, StagingTree):
                path = partial.finish()
            else:
                path = partial.finish(safe_filename(manifest.name, fallback=file_id))
        except KeyboardInterrupt:  # every chunk is verified
            partial.keep()
            raise
        except StorageError as exc:
            raise _stopped_on_storage(partial, exc) from exc
        except BaseException:  # chunks missing (a bug): start afresh next time
            partial.discard()
            raise
        for error in download.errors:
            if isinstance(error, IntegrityError):  # a holder worth knowing about
                log.warning("%s; the other holders sent that chunk", error)
        return DownloadResult(
            file_id,
            path,
            sum(entry.size for entry in chosen_files),
            manifest.chunk_count - len(excluded),
            time.monotonic() - started,
            [name for name, chunks in download.delivered.items() if chunks],
            plan.bytes_done - plan.bytes_resumed,
            plan.resumed,
            stamp=partial.stamp,
            paths={n: a for n, a in download.paths.items() if download.delivered.get(n)},
            files=len(chosen_files),
            files_resumed=files_resumed,
        )

    def _usable_holders(
        self, lookup: protocol.LookupResult, manifest: TreeHeader
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
        download.workers = ThreadPoolExecutor(CHUNK_WORKERS, thread_name_prefix="chunks")
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
            # Done, failed or Ctrl-C: tell the threads, and let each close its own channel
            # (zmq sockets are not thread-safe, and the caller may destroy the context).
            download.stop.set()
            deadline = time.monotonic() + _JOIN_GRACE
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            # Each holder's thread waited for its chunks' writes; none is left but those
            # of a thread past its grace, which must not outlive the partial file.
            download.workers.shutdown(wait=True)
        with download.lock:  # a thread past its grace may still record a failure
            complete, errors = download.plan.complete, list(download.errors)
        if not complete:
            raise (
                _most_telling(errors)
                if errors
                else TransportError("every holder stopped before the download was complete")
            )

    def _holder_thread(self, holder: protocol.Holder, download: _Download) -> None:
        session: ReceiverSession | None = None
        try:
            link = ReceiverLink(
                self._identity,
                download.file_id,
                download.manifest.header,
                download.lookup.manifest,
                holder.username,
                holder.bundle,
            )
            session = ReceiverSession(
                link,
                self._window,
                self._timeout,
                self._hello_timeout,
                self._clock(),
                storing=_STORING,
            )
            self._pull(holder, session, download)
        except _Stopped:
            pass
        except SetAside:
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
            if session is not None:
                with download.lock:
                    download.plan.release(set(session.mine))

    def _pull(self, holder: protocol.Holder, session: ReceiverSession, download: _Download) -> None:
        def interrupt() -> None:  # while connecting
            if download.stop.is_set():
                raise _Stopped
            session.expire(self._clock(), bool(download.sending))

        channel = self._connector.connect(holder, hints_of(holder), interrupt)
        with download.lock:
            download.paths[holder.username] = channel.address
        data: list[Channel] = []  # the data connection, once opened

        def open_data() -> Channel:
            """Where chunks travel: the data connection the offer named (through the
            relay's data port for a relayed holder: the offer's endpoint is the holder's
            own address, unreachable behind its NAT), or this one."""
            if isinstance(channel, RelayChannel):
                opened = self._open_relay_data(channel, session, interrupt)
            else:
                opened = self._open_data(session, interrupt)
            if opened is None:
                log.debug("chunks from %s on the control connection", holder.username)
                return channel
            log.debug("chunks from %s on the data connection %s", holder.username, opened.address)
            data.append(opened)
            return opened

        try:
            channel.send(session.connected(channel.address, self._clock()))
            self._converse(channel, session, download, open_data)
        finally:
            # Done or cancelled: either way the holder can forget the transfer.
            goodbye = session.finish()
            if goodbye is not None:
                with contextlib.suppress(TransportError):
                    channel.send(goodbye)
            for opened in data:
                opened.close()
            channel.close()

    def _open_data(self, session: ReceiverSession, interrupt: Callable[[], None]) -> Channel | None:
        """The data connection for the offered transfer, attached; None when the offer
        named none or none opens (the chunks then come on the control connection)."""
        if self._data_dialer is None:
            return None
        for offered in session.data_hints:
            endpoint = on_holder_host(session.address, offered)
            if endpoint is None:
                continue
            try:
                opened = self._data_dialer.dial(endpoint, self._timeout, interrupt)
            except TransportError as exc:
                log.info("%s: no data connection (%s); chunks come the other way", endpoint, exc)
                continue
            try:
                opened.send(session.attach())
                self._await_attached(opened, session, interrupt)
            except (TransportError, ProtocolError, RemoteError) as exc:
                log.info(
                    "%s: data connection not attached (%s); chunks come the other way",
                    endpoint,
                    exc,
                )
                opened.close()
                continue
            return opened
        return None

    def _await_attached(
        self, opened: Channel, session: ReceiverSession, interrupt: Callable[[], None]
    ) -> None:
        """The holder's `attached` answer, within `ATTACH_ANSWER_WAIT`: without it (a
        full or squatted data port, an older holder) the chunks are asked elsewhere."""
        deadline = self._clock() + min(ATTACH_ANSWER_WAIT, self._timeout)
        while (reply := opened.receive(0.1)) is None:
            interrupt()
            if self._clock() > deadline:
                raise TransportError("no answer to the attach")
        if len(reply) != 1:
            raise ProtocolError("not an answer to an attach")
        envelope = protocol.decode_envelope(bytes(reply[0]))
        protocol.raise_for_error(envelope, "the holder's data port")
        if envelope.op != "attached":
            raise ProtocolError(f"{envelope.op[:40]!r} instead of an answer to the attach")
        answer = from_wire(protocol.DataAttached, envelope.body, "attached")
        if answer.transfer_id != session.transfer_id:
            raise ProtocolError("an answer to another transfer's attach")

    def _open_relay_data(
        self, channel: RelayChannel, session: ReceiverSession, interrupt: Callable[[], None]
    ) -> Channel | None:
        """The data connection through the relay's data port: its ticket first (the relay
        answers), then the transfer's attach, end to end to the holder. None if the relay
        offered none or refused it (the chunks then come on the circuit)."""
        if self._data_dialer is None or channel.data_leg is None or not session.data_hints:
            return None
        endpoint, ticket = channel.data_leg
        try:
            opened = self._data_dialer.dial(endpoint, self._timeout, interrupt)
        except TransportError as exc:
            log.info("%s: no data leg (%s); chunks come on the circuit", endpoint, exc)
            return None
        try:
            opened.send([ticket])
            deadline = self._clock() + self._timeout
            while (reply := opened.receive(0.2)) is None:
                interrupt()
                if self._clock() > deadline:
                    raise TransportError(f"relay {endpoint} did not answer the data ticket")
            if len(reply) != 1:
                raise ProtocolError("not an answer to a data ticket")
            protocol.raise_for_error(protocol.decode_envelope(bytes(reply[0])), f"relay {endpoint}")
            opened.send(session.attach(answer=False))
        except (TransportError, ProtocolError, RemoteError) as exc:
            log.info("%s: no data leg (%s); chunks come on the circuit", endpoint, exc)
            opened.close()
            return None
        return opened

    def _converse(
        self,
        channel: Channel,
        session: ReceiverSession,
        download: _Download,
        open_data: Callable[[], Channel],
    ) -> None:
        """Run `session` over `channel` until the download is complete or this holder
        fails (an exception); once the offer is in, chunks travel on `open_data()`."""
        plan, name = download.plan, session.holder_name
        control = channel
        receiving = False
        chunk_came = False  # on the data connection: until then, it may yet fail
        # Chunks handed to the workers, and their outcomes (index, the error if any).
        writing = 0
        written: queue.SimpleQueue[tuple[int, BaseException | None]] = queue.SimpleQueue()

        def collect(block: bool) -> None:
            nonlocal writing
            while writing:
                try:
                    index, error = written.get(block=block)
                except queue.Empty:
                    return
                writing -= 1
                if error is not None:
                    raise error
                session.stored(index)

        try:
            while True:
                collect(block=False)
                now = self._clock()
                if receiving:
                    with download.lock:
                        if plan.complete:
                            download.complete.set()
                            return
                        wanted = plan.claim(session.room)
                    for frames in session.ask(wanted, now):
                        channel.send(frames)
                    if not session.mine:  # the rest is on its way from others; one may yet fail
                        self._sleep(download.stop, 0.05)
                        continue
                for frames in session.due(now):
                    channel.send(frames)
                # In short slices, so that a stop is noticed soon; shorter while all that
                # is awaited is a write (its place in the window frees when it is done).
                awaited = _WRITE_SLICE if writing >= len(session.mine) else _POLL_SLICE
                reply = channel.receive(min(awaited, session.wait(now)))
                if download.stop.is_set():
                    raise _Stopped
                if reply is None:
                    try:
                        session.expire(self._clock(), bool(download.sending))
                    except TransportError as exc:
                        if channel is control or chunk_came:
                            raise
                        # Attached, then silent or closed before its first chunk: those
                        # asked go back to the plan, to be asked on the control connection.
                        log.info("%s; chunks come on the control connection", exc)
                        channel = control
                        with download.lock:
                            plan.release(set(session.recall()))
                    continue
                event = session.take(reply, self._clock())
                if isinstance(event, Sealed):
                    chunk_came = True
                    assert download.workers is not None
                    # Opened here: AES-GCM is about 1% of the work, and so a forged
                    # chunk is named before any chunk after it arrives.
                    plaintext = download.open(event)
                    collect(block=False)
                    if writing < CHUNK_WORKERS:
                        writing += 1
                        download.workers.submit(
                            self._store, download, name, event.index, plaintext, written
                        )
                    else:  # no worker free: store it here, once the next ones are asked
                        with download.lock:
                            wanted = plan.claim(session.room)
                        for frames in session.ask(wanted, self._clock()):
                            channel.send(frames)
                        try:
                            download.store(name, event.index, plaintext)
                        finally:
                            download.buffers.give(plaintext)
                        session.stored(event.index)
                elif isinstance(event, Offered):
                    channel = open_data()
                    receiving = True
                    with download.lock:
                        download.sending.add(name)
                        download.delivered.setdefault(name, 0)
                        download.report()
        finally:
            # The chunks in the workers' hands are stored or refused before this holder's
            # claims go back to the plan: another holder must not be sent for them too.
            while writing:
                index, error = written.get()
                writing -= 1
                if error is None:
                    session.stored(index)
            if receiving:
                with download.lock:
                    download.sending.discard(name)
                    download.report()

    @staticmethod
    def _store(
        download: _Download,
        name: str,
        index: int,
        plaintext: bytes | memoryview,
        written: queue.SimpleQueue[tuple[int, BaseException | None]],
    ) -> None:
        """In a worker: check a chunk against the manifest and write it (hashlib and
        pwrite release the GIL); the outcome goes back to the holder's thread."""
        try:
            download.store(name, index, plaintext)
        except BaseException as exc:  # the holder's thread raises it
            written.put((index, exc))
        else:
            written.put((index, None))
        finally:
            download.buffers.give(plaintext)

    @staticmethod
    def _sleep(stop: threading.Event, seconds: float) -> None:
        if stop.wait(seconds):
            raise _Stopped
