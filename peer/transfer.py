"""The transfer protocol's two roles, free of sockets and files (DESIGN section 5).

Receiver: `ReceiverLink` speaks to one holder: it makes the signed hello, checks the
signed offer, unwraps the transfer key and opens each index page and chunk. `ChunkPlan`
decides which chunks to ask for next (several in flight) and checks every chunk against
the owner's signed tree (its BLAKE3 hash in the checked index), whichever holder sent it.

Holder: `HolderService` answers hellos with signed offers, page requests with sealed
index pages and chunk requests with sealed chunks, for the shares in the local share
registry and only to users on their access list. It reads file bytes through an
injected function, so tests can run it without a disk or a socket.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sfs.common import crypto, protocol
from sfs.common.errors import IntegrityError, ProtocolError, SfsError, TrustError
from sfs.common.identity import KeyBundle
from sfs.common.manifest import manifest_digest
from sfs.common.protocol import ErrorCode, Refused
from sfs.common.tree import FOLDER, TreeHeader
from sfs.common.tree_hash import blake3_256
from sfs.common.tree_index import Pages, TreeIndex, index_of, unpack_pages
from sfs.peer.keys import Identity
from sfs.peer.registry import Share

log = logging.getLogger("sfs.peer")

# --- receiver ---------------------------------------------------------------------------


class ReceiverLink:
    """One transfer from one holder, from the receiving side."""

    def __init__(
        self,
        identity: Identity,
        file_id: str,
        header: TreeHeader,
        manifest_bytes: bytes,
        holder_name: str,
        holder_bundle: KeyBundle,
    ) -> None:
        self._identity = identity
        self._file_id = file_id
        self._header = header
        self._digest = manifest_digest(manifest_bytes)
        self.holder_name = holder_name
        self._holder_bundle = holder_bundle
        self._nonce = crypto.random_bytes(32)
        self._cipher: crypto.ChunkCipher | None = None
        self.transfer_id = b""
        self.data_hints: list[str] = []  # where the offer says to open the data connection
        self._attach: protocol.Attach | None = None

    def hello(self) -> protocol.Hello:
        unsigned = protocol.Hello(
            self._file_id,
            self._identity.username,
            self._identity.bundle,
            self._nonce,
            self._holder_bundle.fingerprint(),
            b"",
        )
        signature = self._identity.sign(protocol.hello_payload(unsigned))
        return dataclasses.replace(unsigned, signature=signature)

    def accept_offer(self, offer: protocol.Offer) -> None:
        """Check that the offer is signed by the holder and bound to this very hello,
        then unwrap the transfer key. Raises `IntegrityError` otherwise."""
        crypto.verify(
            self._holder_bundle.rsa_key(),
            offer.signature,
            protocol.offer_payload(offer),
            f"offer from {self.holder_name}",
        )
        bound = (
            offer.file_id == self._file_id
            and crypto.same_bytes(offer.requester_fp, self._identity.fingerprint)
            and crypto.same_bytes(offer.requester_nonce, self._nonce)
            and crypto.same_bytes(offer.manifest_digest, self._digest)
            and crypto.same_bytes(offer.holder_fp, self._holder_bundle.fingerprint())
        )
        if not bound:
            raise IntegrityError(
                f"the offer from {self.holder_name} is not for this request (replayed?)"
            )
        secret = crypto.TransferSecret.from_bytes(
            crypto.unwrap(self._identity.signing_key, offer.wrapped_secret)
        )
        self._cipher = crypto.ChunkCipher(secret)
        self.transfer_id = offer.transfer_id
        if offer.data and len(offer.data_ticket) == DATA_TICKET_SIZE:
            self.data_hints = list(offer.data)
            proof = crypto.attach_proof(secret.key, offer.transfer_id, offer.data_ticket)
            self._attach = protocol.Attach(offer.transfer_id, proof)

    def attach(self) -> protocol.Attach:
        """The first message on the data connection the offer named."""
        if self._attach is None:
            raise ProtocolError(f"{self.holder_name} offered no data connection")
        return self._attach

    def request(self, index: int) -> protocol.ChunkRequest:
        return protocol.ChunkRequest(self.transfer_id, index)

    def open_chunk(
        self,
        header: protocol.ChunkHeader,
        ciphertext: bytes | memoryview,
        into: memoryview | None = None,
    ) -> bytes | memoryview:
        """Decrypt a chunk (into `into`, if it is long enough); the AEAD binds it to this
        transfer, file, index and count."""
        if self._cipher is None:
            raise ProtocolError(f"{self.holder_name} sent a chunk before any offer")
        if not crypto.same_bytes(header.transfer_id, self.transfer_id):
            raise IntegrityError(f"{self.holder_name} sent a chunk of another transfer")
        associated = protocol.chunk_associated_data(
            self.transfer_id, self._file_id, header.index, self._header.chunk_count
        )
        if into is None:
            return self._cipher.open(header.index, ciphertext, associated)
        return self._cipher.open_into(header.index, ciphertext, associated, into)

    def page_request(self, kind: str, index: int) -> protocol.PageRequest:
        return protocol.PageRequest(self.transfer_id, kind, index)

    def open_page(self, header: protocol.PageHeader, ciphertext: bytes | memoryview) -> bytes:
        """Decrypt an index page; checking it against the signed header is the caller's."""
        if self._cipher is None:
            raise ProtocolError(f"{self.holder_name} sent a page before any offer")
        if not crypto.same_bytes(header.transfer_id, self.transfer_id):
            raise IntegrityError(f"{self.holder_name} sent a page of another transfer")
        associated = protocol.page_associated_data(
            self.transfer_id, self._file_id, header.kind, header.index
        )
        nonce_index = protocol.page_nonce_index(header.kind, header.index)
        try:
            return self._cipher.open(nonce_index, ciphertext, associated)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{header.kind} page {header.index} from {self.holder_name} failed "
                "authentication (tampered?)"
            ) from exc


@dataclass
class ChunkPlan:
    """Which chunks are still needed, which are on their way, which are verified.

    One plan serves every holder of a download: each claims chunks for its own window,
    and a holder that fails releases its claims for the others. Not thread-safe: the
    caller serialises access."""

    manifest: TreeIndex
    window: int
    have: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)
    bytes_done: int = 0
    resumed: int = 0  # chunks found verified from an earlier attempt
    bytes_resumed: int = 0
    excluded: frozenset[int] = frozenset()  # not wanted (`get --include`)
    _next: int = 0
    _released: list[int] = field(default_factory=list)  # to claim again, lowest first

    @property
    def complete(self) -> bool:
        return len(self.have) == self.manifest.chunk_count - len(self.excluded)

    def adopt(self, index: int) -> None:
        """A chunk already on disk and verified there: never ask for it."""
        if index in self.excluded:
            return
        self.in_flight.discard(index)
        if index in self._released:
            self._released.remove(index)
        if index not in self.have:
            self.have.add(index)
            self.bytes_done += self.manifest.chunk_length(index)
            self.bytes_resumed += self.manifest.chunk_length(index)
            self.resumed += 1

    def next_requests(self) -> list[int]:
        """Indexes to request now, keeping at most `window` in flight in all."""
        return self.claim(self.window - len(self.in_flight))

    def claim(self, count: int) -> list[int]:
        """Up to `count` chunks nobody has asked for yet, released ones first."""
        wanted: list[int] = []
        chunks = self.manifest.chunk_count
        while len(wanted) < count and self._released:
            wanted.append(self._released.pop(0))
        while len(wanted) < count and self._next < chunks:
            if self._next not in self.have and self._next not in self.excluded:
                wanted.append(self._next)
            self._next += 1
        self.in_flight.update(wanted)
        return wanted

    def release(self, indexes: set[int]) -> None:
        """Claims a holder will not deliver (it failed): others may claim them."""
        returned = indexes & self.in_flight
        self.in_flight -= returned
        self._released = sorted({*self._released, *returned})

    def check(self, index: int, plaintext: bytes) -> None:
        """Check a decrypted chunk against the signed tree; raises `IntegrityError`."""
        if index not in self.in_flight:
            raise IntegrityError(f"chunk {index} arrived without being requested")
        expected = self.manifest.chunk_hash(index)
        if len(plaintext) != self.manifest.chunk_length(index) or not crypto.same_bytes(
            blake3_256(plaintext), expected
        ):
            raise IntegrityError(f"chunk {index} does not match the owner's signed manifest")

    def done(self, index: int) -> None:
        """A checked chunk is safely written."""
        self.in_flight.discard(index)
        self.have.add(index)
        self.bytes_done += self.manifest.chunk_length(index)

    def accept(self, index: int, plaintext: bytes) -> None:
        """`check`, then `done` (for callers that store the chunk in between)."""
        self.check(index, plaintext)
        self.done(index)


# --- holder -----------------------------------------------------------------------------

# A transfer nobody asked a chunk of for this long is forgotten: a requester that stopped
# reading (or died without `finish`) gives its slot back. Downloads ask continuously.
TRANSFER_IDLE_TIMEOUT = 30.0
MAX_TRANSFERS = 64
MAX_TRANSFERS_PER_REQUESTER = 4  # per user, whatever number of connections they open
DATA_TICKET_SIZE = 32
_INDEXES_KEPT = 16  # checked indexes of shares served lately
# Transfers ended by a failed read whose late requests get the same reason.
FAILED_TRANSFERS_KEPT = MAX_TRANSFERS


@dataclass(frozen=True)
class Unchanged:
    """Bytes read from a file whose stamp (see `stamps`) is still the one recorded when
    it was shared: they are the bytes the manifest hashes, so hashing them again is
    skipped. A reader that cannot tell returns plain bytes, which are hashed."""

    data: bytes


class NotRegularFile(SfsError):
    """What stands at a share's path now is not a regular file (a FIFO, a directory...).
    Raised by a `ChunkReader`; `kind` says what it is, for the holder's log."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"not a regular file ({kind})")
        self.kind = kind


class ChangedSinceShared(SfsError):
    """The file's stamp is not the one recorded when it was shared (written, touched,
    replaced): raised by a `ChunkReader`, and the file is not served."""


# (share, offset, length) -> the bytes there
ChunkReader = Callable[[Share, int, int], bytes | Unchanged]
# (folder share, (path in the tree, offset, length) of each piece) -> the chunk's bytes
PiecesReader = Callable[[Share, tuple[tuple[str, int, int], ...]], bytes]
RequesterCheck = Callable[[str, KeyBundle], None]  # raises SfsError to refuse
# Told of a share that could not be served from its path; True: its content changed.
FailedRead = Callable[[Share, bool], None]


@dataclass
class _Outgoing:
    share: Share
    manifest: TreeIndex
    pages: Pages
    cipher: crypto.ChunkCipher
    requester: str
    connection: bytes
    last_active: float
    attach_proof: bytes = b""  # what `attach` must show; b"": no data connection offered
    data_connection: bytes | None = None  # the one data connection attached to it


@dataclass(frozen=True)
class Attached:
    """A data connection proved it belongs to `transfer_id` and is now bound to it."""

    transfer_id: bytes
    answer: bool = False  # the requester asked for `attached`


class AttachRefused(SfsError):
    """A data connection's first message was not a valid `attach`: it gets no reply
    and its server closes it."""


@dataclass(frozen=True)
class ChunkJob:
    """The file I/O of one chunk request: read, check against the manifest, seal.
    `HolderService.read` does it and touches no other state, so a server can run it off
    its loop (`PeerServer` does: one slow or stuck file must not stop the other shares)."""

    connection: bytes
    transfer_id: bytes
    index: int
    share: Share
    offset: int
    length: int
    chunk_hash: bytes
    associated: bytes
    cipher: crypto.ChunkCipher
    # A folder share: (path in the tree, offset, length) of each file's part of the chunk.
    pieces: tuple[tuple[str, int, int], ...] = ()

    @property
    def lane(self) -> str:
        """Reads of one file wait for each other; reads of other files do not."""
        return self.share.file_id


@dataclass(frozen=True)
class ReadFailure:
    """Why a chunk could not be sent: what the requester is told, what the log says."""

    to_requester: str
    to_log: str
    changed: bool = False  # the bytes are there but are not the ones shared


ChunkOutcome = bytes | ReadFailure  # the sealed chunk, or why there is none


class HolderService:
    """Answers requesters. `handle` never raises: refusals become error replies and
    frames that cannot be parsed are answered with bad_request.

    A chunk request is answered in three steps, so that the file I/O can run elsewhere:
    `receive` checks it and returns a `ChunkJob`, `read` does the I/O (in any thread),
    and `complete` turns the outcome into the reply. `handle` does all three at once."""

    def __init__(
        self,
        identity: Identity,
        lookup_share: Callable[[str], Share | None],
        check_requester: RequesterCheck,
        read_chunk: ChunkReader,
        clock: Callable[[], float] = time.monotonic,
        on_failed_read: FailedRead | None = None,
        read_pieces: PiecesReader | None = None,
    ) -> None:
        self._identity = identity
        self._lookup_share = lookup_share
        self._check_requester = check_requester
        self._read_chunk = read_chunk
        if read_pieces is None:  # the holder side only: not imported on a get's path
            from sfs.peer.reads import read_pieces as read_from_tree

            read_pieces = read_from_tree
        self._read_pieces: PiecesReader = read_pieces
        self._clock = clock
        self._on_failed_read = on_failed_read
        self._transfers: dict[bytes, _Outgoing] = {}
        self._data_hints: list[str] = []
        self._indexes: dict[str, tuple[TreeIndex, Pages]] = {}  # file id -> checked index
        # Transfers a failed read ended: their connections and what the requester was told.
        self._failed: OrderedDict[bytes, tuple[tuple[bytes, bytes | None], str]] = OrderedDict()

    def offer_data(self, hints: list[str]) -> None:
        """Name the data endpoint(s) in offers from now on (the server calls it once it
        listens there); with none, chunks travel on the control connection."""
        self._data_hints = list(hints)

    def transfer_alive(self, transfer_id: bytes) -> bool:
        return transfer_id in self._transfers

    def receive_data(self, connection: bytes, frame: bytes) -> list[bytes] | ChunkJob | Attached:
        """One frame from a data connection. `connection` must not collide with control
        connections' ids (the server prefixes it). Before it is attached, only a valid
        `attach` is taken: anything else raises `AttachRefused` (no reply: the server
        closes the connection). Once attached, chunk requests for its transfer become
        `ChunkJob`s, as on the control connection."""
        self.expire_idle()
        attached = any(o.data_connection == connection for o in self._transfers.values())
        try:
            envelope = protocol.decode_envelope(frame)
            request = protocol.decode_body(envelope, protocol.DATA_REQUESTS)
        except ProtocolError as exc:
            if not attached:
                raise AttachRefused(f"not an attach ({exc})") from exc
            return [protocol.encode_refusal(exc)]
        if isinstance(request, protocol.Attach):
            return self._attach_data(request, connection, attached)
        if not attached:
            raise AttachRefused("a chunk request before attach")
        assert isinstance(request, protocol.ChunkRequest)
        try:
            return self._chunk(request, connection)
        except Refused as exc:
            return [protocol.encode_error(exc.code, str(exc))]

    def _attach_data(self, request: protocol.Attach, connection: bytes, attached: bool) -> Attached:
        outgoing = self._transfers.get(request.transfer_id)
        if attached:
            raise AttachRefused("a second attach on one connection")
        if outgoing is None or not outgoing.attach_proof:
            raise AttachRefused("attach to an unknown or expired transfer")
        if not crypto.same_bytes(request.proof, outgoing.attach_proof):
            raise AttachRefused("attach with a wrong proof")
        if outgoing.data_connection is not None:  # a replay, seen on the wire
            raise AttachRefused("attach to a transfer that has its data connection")
        outgoing.data_connection = connection
        outgoing.last_active = self._clock()
        log.info("%s attached a data connection for %s", outgoing.requester, outgoing.share.name)
        return Attached(request.transfer_id, request.answer)

    @property
    def active_transfers(self) -> int:
        return len(self._transfers)

    def handle(self, connection: bytes, client_key: bytes | None, frame: bytes) -> list[bytes]:
        """Answer one frame from `connection` (its routing id), reading any chunk right
        here. Returns the reply frames (none for `finish`)."""
        answer = self.receive(connection, client_key, frame)
        if isinstance(answer, ChunkJob):
            return self.complete(answer, self.read(answer))
        return answer

    def receive(
        self, connection: bytes, client_key: bytes | None, frame: bytes
    ) -> list[bytes] | ChunkJob:
        """Answer one frame, except the file I/O of a chunk request: that is returned as
        a `ChunkJob`, to `read` and then `complete`."""
        self.expire_idle()
        try:
            envelope = protocol.decode_envelope(frame)
            request = protocol.decode_body(envelope, protocol.PEER_REQUESTS)
            if isinstance(request, protocol.Hello):
                return [protocol.encode("offer", self._hello(request, connection, client_key))]
            if isinstance(request, protocol.ChunkRequest):
                return self._chunk(request, connection)
            if isinstance(request, protocol.PageRequest):
                return self._page(request, connection)
            if isinstance(request, protocol.Finish):
                self._finish(request, connection)
            return []
        except ProtocolError as exc:
            return [protocol.encode_refusal(exc)]
        except (IntegrityError, TrustError) as exc:  # a hello that does not prove who sent it
            return [protocol.encode_error(ErrorCode.FORBIDDEN, str(exc))]
        except Refused as exc:
            return [protocol.encode_error(exc.code, str(exc))]
        except SfsError as exc:  # a local problem (storage, say): details stay here
            log.error("could not answer a requester: %s", exc)
            return [protocol.encode_error(ErrorCode.INTERNAL, "the holder could not do that")]
        except Exception:
            log.exception("bug while answering a requester")
            return [protocol.encode_error(ErrorCode.INTERNAL, "the holder hit an internal error")]

    def expire_idle(self) -> None:
        deadline = self._clock() - TRANSFER_IDLE_TIMEOUT
        for transfer_id in [t for t, o in self._transfers.items() if o.last_active < deadline]:
            del self._transfers[transfer_id]

    def _hello(
        self, hello: protocol.Hello, connection: bytes, client_key: bytes | None
    ) -> protocol.Offer:
        if not crypto.same_bytes(hello.holder_fp, self._identity.fingerprint):
            raise Refused(ErrorCode.BAD_REQUEST, "this hello is addressed to another holder")
        if client_key is not None and client_key != hello.bundle.curve_public:
            raise Refused(ErrorCode.FORBIDDEN, "the connection's key is not the requester's")
        crypto.verify(
            hello.bundle.rsa_key(), hello.signature, protocol.hello_payload(hello), "hello"
        )
        # Who is asking comes first: strangers learn nothing about what is shared here.
        self._check_requester(hello.requester, hello.bundle)
        share = self._lookup_share(hello.file_id)
        if share is None:
            raise Refused(ErrorCode.NOT_FOUND, f"file {hello.file_id} is not shared here")
        if not share.allows(hello.requester):
            log.info("refused %s: %s is not shared with them", hello.requester, hello.file_id)
            raise Refused(ErrorCode.FORBIDDEN, f"file {hello.file_id} is not shared with you")
        tree, pages = self._index_of(share)
        self._make_room_for(hello.requester)

        secret = crypto.TransferSecret.generate()
        transfer_id = crypto.random_bytes(16)
        ticket = crypto.random_bytes(DATA_TICKET_SIZE) if self._data_hints else b""
        unsigned = protocol.Offer(
            transfer_id=transfer_id,
            file_id=hello.file_id,
            wrapped_secret=crypto.wrap(hello.bundle.rsa_key(), secret.to_bytes()),
            requester_fp=hello.bundle.fingerprint(),
            requester_nonce=hello.nonce,
            manifest_digest=manifest_digest(share.manifest),
            holder_fp=self._identity.fingerprint,
            signature=b"",
            data=list(self._data_hints),
            data_ticket=ticket,
        )
        offer = dataclasses.replace(
            unsigned, signature=self._identity.sign(protocol.offer_payload(unsigned))
        )
        self._transfers[offer.transfer_id] = _Outgoing(
            share,
            tree,
            pages,
            crypto.ChunkCipher(secret),
            hello.requester,
            connection,
            self._clock(),
            crypto.attach_proof(secret.key, transfer_id, ticket) if ticket else b"",
        )
        log.info("sending %s to %s", share.name, hello.requester)
        return offer

    def _index_of(self, share: Share) -> tuple[TreeIndex, Pages]:
        """The share's index, checked once (a damaged registry row is refused here, not
        served), and kept for the next transfers of it."""
        cached = self._indexes.get(share.file_id)
        if cached is None:
            if not share.pages:
                log.error(
                    "cannot serve %s: it was shared with an older sfs; share it again", share.path
                )
                raise Refused(
                    ErrorCode.NOT_FOUND,
                    f"{share.name} was shared with an older sfs: share it again",
                )
            try:
                pages = unpack_pages(share.pages)
                # Pages checked against the header; the path rules were checked when the
                # share was made (or downloaded), and would take seconds at 100,000 files.
                cached = (index_of(share.manifest, pages, check_rules=False), pages)
            except (ProtocolError, IntegrityError) as exc:
                log.error("cannot serve %s: its index is damaged (%s)", share.name, exc)
                raise Refused(ErrorCode.INTERNAL, "the holder cannot serve this share") from None
            if len(self._indexes) >= _INDEXES_KEPT:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[share.file_id] = cached
        return cached

    def _page(self, request: protocol.PageRequest, connection: bytes) -> list[bytes]:
        outgoing = self._transfer(request.transfer_id, connection)
        page = outgoing.pages.page(request.kind, request.index)
        if page is None:
            raise Refused(
                ErrorCode.BAD_REQUEST, f"{request.kind} page {request.index} is out of range"
            )
        self._still_shared(request.transfer_id, outgoing)
        associated = protocol.page_associated_data(
            request.transfer_id, outgoing.share.file_id, request.kind, request.index
        )
        nonce_index = protocol.page_nonce_index(request.kind, request.index)
        sealed = outgoing.cipher.seal(nonce_index, page, associated)
        header = protocol.PageHeader(request.transfer_id, request.kind, request.index)
        return [protocol.encode("page", header), sealed]

    def _make_room_for(self, requester: str) -> None:
        """Free a slot for `requester`'s new transfer, fairly, or refuse with `busy`.

        At the per-user limit, that user's least recently active transfer goes: a
        download that died (killed, cut off, its offer lost) never says `finish`, and the
        holder cannot see its connection go, so refusing would lock the user out until
        the idle timeout. The hello is signed, so only users evict their own.

        At the limit in all, the idlest transfer of the user holding the most goes, if
        that user would still hold at least as many as `requester` then: so accounts
        made to fill every slot (Sybils) cannot lock anyone out, and users holding
        equal shares never take slots from each other."""
        held: dict[str, list[tuple[float, bytes]]] = {}
        for transfer_id, outgoing in self._transfers.items():
            held.setdefault(outgoing.requester, []).append((outgoing.last_active, transfer_id))
        own = held.get(requester, [])
        if len(own) >= MAX_TRANSFERS_PER_REQUESTER:
            self._evict(min(own)[1], "its user opened another")
            return
        if len(self._transfers) < MAX_TRANSFERS:
            return
        most = max(len(transfers) for transfers in held.values())
        if most < len(own) + 2:
            raise Refused(ErrorCode.BUSY, "the holder is serving too many transfers; retry")
        idlest = min(t for transfers in held.values() if len(transfers) == most for t in transfers)
        self._evict(idlest[1], f"the holder is full and {requester} held fewer")

    def _evict(self, transfer_id: bytes, why: str) -> None:
        outgoing = self._transfers.pop(transfer_id)
        log.info("ended a transfer of %s to %s: %s", outgoing.share.name, outgoing.requester, why)

    def _transfer(self, transfer_id: bytes, connection: bytes) -> _Outgoing:
        outgoing = self._transfers.get(transfer_id)
        # A transfer belongs to the connection that said hello, and to the data
        # connection attached to it.
        if outgoing is None or connection not in (outgoing.connection, outgoing.data_connection):
            why = self._why_failed(transfer_id, connection)
            if why is not None:
                raise Refused(ErrorCode.INTERNAL, why)
            raise Refused(ErrorCode.NOT_FOUND, "unknown or expired transfer")
        outgoing.last_active = self._clock()
        return outgoing

    def _still_shared(self, transfer_id: bytes, outgoing: _Outgoing) -> Share:
        """The transfer's file as the share registry has it now, or `Refused` (and the
        transfer ends). `unshare` runs in another process and only changes the registry,
        so it is read for every chunk (the registry caches it until that changes)."""
        file_id = outgoing.share.file_id
        current = self._lookup_share(file_id)
        if current is None or not current.allows(outgoing.requester):
            del self._transfers[transfer_id]
            log.info("ended a transfer of %s to %s: no longer shared", file_id, outgoing.requester)
            if current is None:
                raise Refused(ErrorCode.NOT_FOUND, f"file {file_id} is no longer shared here")
            raise Refused(ErrorCode.FORBIDDEN, f"file {file_id} is no longer shared with you")
        outgoing.share = current  # the same file id is the same manifest; the path may move
        return current

    def _chunk(self, request: protocol.ChunkRequest, connection: bytes) -> ChunkJob:
        outgoing = self._transfer(request.transfer_id, connection)
        manifest = outgoing.manifest
        if request.index >= manifest.chunk_count:
            raise Refused(ErrorCode.BAD_REQUEST, f"chunk {request.index} is out of range")
        share = self._still_shared(request.transfer_id, outgoing)
        pieces: tuple[tuple[str, int, int], ...] = ()
        if manifest.kind == FOLDER:
            pieces = tuple(
                (manifest.files[piece.file].path, piece.offset, piece.length)
                for piece in manifest.chunks.pieces(request.index)
            )
        return ChunkJob(
            connection,
            request.transfer_id,
            request.index,
            share,
            request.index * manifest.chunk_size,
            manifest.chunk_length(request.index),
            manifest.chunk_hash(request.index),
            protocol.chunk_associated_data(
                request.transfer_id, share.file_id, request.index, manifest.chunk_count
            ),
            outgoing.cipher,
            pieces,
        )

    def read(self, job: ChunkJob) -> ChunkOutcome:
        """Read, check and seal one chunk. Safe in any thread: it uses only `job` and the
        injected reader, and never raises."""
        name, path = job.share.name, job.share.path
        cannot_read = f"the holder cannot read {name} any more"
        own = job.share.owner is None
        since = "it was shared; run share again" if own else "it was downloaded"
        changed = ReadFailure(
            f"{name} changed on the holder since it was shared",
            f"{path} changed since {since}",
            changed=True,
        )
        try:
            read = (
                self._read_pieces(job.share, job.pieces)
                if job.pieces
                else self._read_chunk(job.share, job.offset, job.length)
            )
        except ChangedSinceShared:
            return changed
        except NotRegularFile as exc:
            return ReadFailure(
                f"{cannot_read}: it is not a regular file",
                f"cannot serve {name} from {path}: not a regular file ({exc.kind})",
            )
        except OSError as exc:
            return ReadFailure(cannot_read, f"cannot read {path}: {exc.strerror or exc}")
        except Exception:
            log.exception("bug while reading a chunk of %s", name)
            return ReadFailure("the holder hit an internal error", f"could not read {path}")
        # Send only what was shared: a file changed since would otherwise leak new content.
        # The manifest's hash decides, even when the file's stamp is unchanged: writes
        # through a shared mmap can change bytes without touching mtime or ctime until
        # writeback, so the stamp only catches most changes early.
        data = read.data if isinstance(read, Unchanged) else read
        if len(data) != job.length or not crypto.same_bytes(blake3_256(data), job.chunk_hash):
            return changed
        return job.cipher.seal(job.index, data, job.associated)

    def complete(self, job: ChunkJob, outcome: ChunkOutcome) -> list[bytes]:
        """The reply to a chunk request once `read` is done. Nothing is sent for a
        transfer that ended meanwhile (finished, expired, evicted, or its file unshared)."""
        outgoing = self._transfers.get(job.transfer_id)
        if outgoing is None or job.connection not in (
            outgoing.connection,
            outgoing.data_connection,
        ):
            why = self._why_failed(job.transfer_id, job.connection)
            if why is not None:
                return [protocol.encode_error(ErrorCode.INTERNAL, why)]
            return [protocol.encode_error(ErrorCode.NOT_FOUND, "unknown or expired transfer")]
        if isinstance(outcome, ReadFailure):
            log.warning("%s", outcome.to_log)
            del self._transfers[job.transfer_id]
            # Requests already sent for this transfer (on either connection, so their
            # replies may arrive first) get the same reason, not "unknown transfer".
            self._failed[job.transfer_id] = (
                (outgoing.connection, outgoing.data_connection),
                outcome.to_requester,
            )
            while len(self._failed) > FAILED_TRANSFERS_KEPT:
                self._failed.popitem(last=False)
            if self._on_failed_read is not None:
                self._on_failed_read(job.share, outcome.changed)
            return [protocol.encode_error(ErrorCode.INTERNAL, outcome.to_requester)]
        outgoing.last_active = self._clock()
        header = protocol.ChunkHeader(job.transfer_id, job.index)
        return [protocol.encode("chunk", header), outcome]

    def _why_failed(self, transfer_id: bytes, connection: bytes) -> str | None:
        """Why the transfer ended, if a failed read ended it and `connection` was its."""
        failed = self._failed.get(transfer_id)
        return failed[1] if failed is not None and connection in failed[0] else None

    def drop_connection(self, connection: bytes) -> None:
        """Forget the transfers of a requester that stopped reading or went away."""
        for transfer_id, outgoing in list(self._transfers.items()):
            if connection in (outgoing.connection, outgoing.data_connection):
                del self._transfers[transfer_id]

    def _finish(self, request: protocol.Finish, connection: bytes) -> None:
        outgoing = self._transfers.get(request.transfer_id)
        if outgoing is not None and outgoing.connection == connection:
            del self._transfers[request.transfer_id]
