"""The receiving side of one conversation with one holder, free of sockets and threads.

A `ReceiverSession` takes the holder's replies in and gives the messages to send out,
with the time passed in by its caller, so it runs over any channel and is tested with
none. Its stages:

    connecting --connected()--> hello --offer--> receiving
                                  ^  \\--busy--> backoff --due()--/
                                  \\--------------------/

- connecting: the channel is not open yet. Only the set-aside rule applies: a holder
  that has not offered the file `hello_timeout` after the session began, while another
  holder delivers, raises `SetAside`.
- hello: the signed hello is out; the answer must come within `timeout`. `busy` (the
  holder is checking our key with the broker, say) means: ask again after a pause that
  doubles up to a second, as long as `timeout` since the first hello allows.
- receiving: the offer checked out. The caller claims chunks for the free places in
  the window (`room`) and sends what `ask` returns; each chunk must come within
  `timeout` of the last, must have been asked of this holder, and must open under the
  transfer key. Checking it against the manifest is the caller's (the plan is shared by
  every holder); `stored` then frees its place. With a `storing` allowance, a chunk's
  arrival frees its place on the way, so the next is asked while it is written.

Every failure raises an `SfsError` naming the holder; `finish` is the goodbye.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sfs.common import crypto, protocol
from sfs.common.codec import from_wire
from sfs.common.errors import IntegrityError, ProtocolError, RemoteError, TransportError
from sfs.common.protocol import ErrorCode
from sfs.peer.channel import Frame
from sfs.peer.transfer import ReceiverLink

_FIRST_PAUSE = 0.05  # seconds before the first hello again, after `busy`
_LONGEST_PAUSE = 1.0
_SET_ASIDE_SLACK = 0.01  # past the hello timeout, so `expire` finds it passed


class SetAside(Exception):
    """This holder has not offered the file within `hello_timeout` while others deliver."""


class Stage(enum.Enum):
    CONNECTING = "connecting"
    HELLO = "hello"
    BACKOFF = "backoff"
    RECEIVING = "receiving"


@dataclass(frozen=True)
class Offered:
    """The holder's offer checked out: chunks may be asked for."""


@dataclass(frozen=True)
class Chunk:
    """A chunk that opened under the transfer key; not yet checked against the manifest."""

    index: int
    plaintext: bytes | memoryview


@dataclass(frozen=True)
class Sealed:
    """A chunk as it arrived, requested of this holder, not opened yet: `open` it in any
    thread (the GCM tag is checked there)."""

    index: int
    header: protocol.ChunkHeader
    ciphertext: Frame
    link: ReceiverLink

    def open(self, into: memoryview | None = None) -> bytes | memoryview:
        """The plaintext (decrypted into `into`, if given and long enough)."""
        return _open_chunk(self.link, self.header, self.ciphertext, into)


@contextlib.contextmanager
def malformed_from(holder_name: str) -> Iterator[None]:
    """Name the holder in a decoding error: the user must learn who sent it."""
    try:
        yield
    except ProtocolError as exc:
        raise ProtocolError(f"{holder_name} sent a malformed message ({exc})") from exc


def read_reply(frames: Sequence[Frame], holder_name: str) -> tuple[protocol.Envelope, Frame | None]:
    """A holder's reply: an envelope, and for a chunk the ciphertext after it. Raises
    `RemoteError` for an error reply and `ProtocolError` for anything malformed."""
    if not frames or len(frames) > 2:
        raise ProtocolError(f"{holder_name} sent a frame of unexpected shape")
    with malformed_from(holder_name):
        envelope = protocol.decode_envelope(bytes(frames[0]))  # small: bytes already
        protocol.raise_for_error(envelope, holder_name)
    return envelope, frames[1] if len(frames) == 2 else None


def read_chunk(
    envelope: protocol.Envelope, payload: Frame | None, holder_name: str
) -> tuple[protocol.ChunkHeader, Frame]:
    if envelope.op != "chunk" or payload is None:
        raise ProtocolError(f"{holder_name} sent a malformed chunk")
    with malformed_from(holder_name):
        return from_wire(protocol.ChunkHeader, envelope.body, "chunk"), payload


def _open_chunk(
    link: ReceiverLink,
    header: protocol.ChunkHeader,
    ciphertext: Frame,
    into: memoryview | None = None,
) -> bytes | memoryview:
    """`link.open_chunk`, naming the holder when the GCM tag fails."""
    try:
        return link.open_chunk(header, ciphertext, into)
    except IntegrityError as exc:
        if not crypto.same_bytes(header.transfer_id, link.transfer_id):
            raise  # another transfer's chunk: the message names the holder already
        raise IntegrityError(
            f"chunk {header.index} from {link.holder_name} failed authentication (tampered?)"
        ) from exc


class ReceiverSession:
    def __init__(
        self,
        link: ReceiverLink,
        window: int,
        timeout: float,
        hello_timeout: float,
        now: float,
        storing: int = 0,
    ) -> None:
        """`now`: when the session began, which the set-aside rule counts from.
        `storing`: how many arrived chunks may be in the caller's hands (being stored)
        beyond the window before the next is asked: so the next requests go out while
        the last chunks are written, and memory stays bounded by `window + storing`."""
        self._link = link
        self._window = window
        self._storing = storing
        self._timeout = timeout
        self._hello_timeout = hello_timeout
        self._began = now
        self.stage = Stage.CONNECTING
        self.address = ""  # where the holder is, once connected
        self._hello = protocol.encode("hello", link.hello())
        self._first_hello = now
        self._deadline = now  # for the reply awaited, in stages hello and receiving
        self._retry_at = now
        self._pause = _FIRST_PAUSE
        self._mine: set[int] = set()  # asked of this holder, not yet stored
        self._arrived: set[int] = set()  # of those, the ones that came (being stored)

    @property
    def holder_name(self) -> str:
        return self._link.holder_name

    @property
    def mine(self) -> frozenset[int]:
        """Chunks asked of this holder and not yet stored: others take them if it fails."""
        return frozenset(self._mine)

    @property
    def room(self) -> int:
        """How many more chunks may be asked now: at most `window` on the way, and
        `window + storing` not yet stored."""
        if self.stage is not Stage.RECEIVING:
            return 0
        on_the_way = len(self._mine) - len(self._arrived)
        unstored = len(self._mine)
        return max(0, min(self._window - on_the_way, self._window + self._storing - unstored))

    def connected(self, address: str, now: float) -> list[bytes]:
        """The channel is open; returns the hello to send."""
        self.address = address
        self._first_hello = now
        return self._say_hello(now)

    def _say_hello(self, now: float) -> list[bytes]:
        self.stage = Stage.HELLO
        self._deadline = now + self._timeout
        return [self._hello]

    def due(self, now: float) -> list[list[bytes]]:
        """Messages whose time has come: the hello again, after `busy`."""
        if self.stage is Stage.BACKOFF and now >= self._retry_at:
            return [self._say_hello(now)]
        return []

    def wait(self, now: float, others_delivering: bool = False) -> float:
        """How long the caller may wait for a reply before calling `due` (or `expire`)
        again: with `others_delivering`, no later than when `expire` would set this
        holder aside."""
        until = self._retry_at if self.stage is Stage.BACKOFF else self._deadline
        if others_delivering and self.stage is not Stage.RECEIVING:
            until = min(until, self._began + self._hello_timeout + _SET_ASIDE_SLACK)
        return max(0.0, until - now)

    def ask(self, indexes: list[int], now: float) -> list[list[bytes]]:
        """The requests for chunks the caller claimed (at most `room`)."""
        if self.stage is not Stage.RECEIVING or len(indexes) > self.room:
            raise ValueError(f"cannot ask for {len(indexes)} chunks now")  # a caller's bug
        if indexes and not self._mine - self._arrived:
            self._deadline = now + self._timeout  # the wait for a chunk starts now
        self._mine.update(indexes)
        return [[protocol.encode("get", self._link.request(index))] for index in indexes]

    def receive(self, frames: Sequence[Frame], now: float) -> Offered | Chunk | None:
        """Take one reply. Returns `Offered`, a `Chunk`, or None (busy: wait for `due`)."""
        event = self.take(frames, now)
        if isinstance(event, Sealed):
            return Chunk(event.index, event.open())
        return event

    def take(self, frames: Sequence[Frame], now: float) -> Offered | Sealed | None:
        """`receive`, leaving a chunk sealed, for the caller to open elsewhere."""
        name = self._link.holder_name
        if self.stage is Stage.RECEIVING:
            header, ciphertext = read_chunk(*read_reply(frames, name), name)
            if header.index not in self._mine or header.index in self._arrived:
                raise IntegrityError(
                    f"chunk {header.index} from {name} arrived without being requested"
                )
            self._deadline = now + self._timeout
            self._arrived.add(header.index)
            return Sealed(header.index, header, ciphertext, self._link)
        if self.stage is Stage.CONNECTING:
            raise ProtocolError(f"{name} spoke before the hello")  # a caller's bug, really
        try:
            envelope, _ = read_reply(frames, name)
        except RemoteError as exc:
            if exc.code != ErrorCode.BUSY or now + self._pause > self._first_hello + self._timeout:
                raise
            self.stage = Stage.BACKOFF
            self._retry_at = now + self._pause
            self._pause = min(self._pause * 2, _LONGEST_PAUSE)
            return None
        if envelope.op != "offer":
            raise ProtocolError(f"{name} sent {envelope.op[:40]!r}, not an offer")
        with malformed_from(name):
            offer = from_wire(protocol.Offer, envelope.body, "offer")
        self._link.accept_offer(offer)
        self.stage = Stage.RECEIVING
        return Offered()

    @property
    def data_hints(self) -> list[str]:
        """Where the offer said to open the data connection; empty: use this one."""
        return self._link.data_hints if self.stage is Stage.RECEIVING else []

    @property
    def transfer_id(self) -> bytes:
        return self._link.transfer_id

    def recall(self) -> frozenset[int]:
        """Forget the chunks asked and not arrived (their connection failed), returning
        them; the wait for a chunk starts again with the next `ask`."""
        recalled = frozenset(self._mine - self._arrived)
        self._mine -= recalled
        return recalled

    def attach(self, answer: bool = True) -> list[bytes]:
        """The first message on the data connection; with `answer`, the holder says
        `attached` (a data leg through a relay does without)."""
        attach = dataclasses.replace(self._link.attach(), answer=answer)
        return [protocol.encode("attach", attach)]

    def stored(self, index: int) -> None:
        """A chunk from `receive` passed the manifest and is written: its place frees."""
        self._mine.discard(index)
        self._arrived.discard(index)

    def expire(self, now: float, others_delivering: bool) -> None:
        """Nothing arrived: raises `SetAside`, or `TransportError` past the deadline."""
        offered = self.stage is Stage.RECEIVING
        if not offered and others_delivering and now - self._began > self._hello_timeout:
            raise SetAside
        if self.stage is Stage.HELLO:
            doing = "answer the request"
        elif self.stage is Stage.RECEIVING and self._mine - self._arrived:
            doing = "send the next chunk"
        else:
            return
        if now > self._deadline:
            raise TransportError(
                f"{self._link.holder_name} at {self.address} did not {doing} within "
                f"{self._timeout:g} s"
            )

    def finish(self) -> list[bytes] | None:
        """The goodbye that lets the holder forget the transfer, once there is one."""
        if not self._link.transfer_id:
            return None
        return [protocol.encode("finish", protocol.Finish(self._link.transfer_id))]
