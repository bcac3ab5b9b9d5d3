"""The sfs wire protocol, version 2: every message broker, peer and tests exchange.

Every control frame is one msgpack map, the envelope:

    {"v": 2, "op": <str>, "rid": <int>, "body": <map>}

`op` names the record type of `body`; `rid` lets a client match a reply to its
request (peers use 0). Broker replies use op "result" (body: the request's result
record) or "error" (body: `ErrorBody`). On the peer channel a chunk travels as two
frames: the envelope (op "chunk", body `ChunkHeader`) and the raw ciphertext.

Signatures and associated data are computed over canonical encodings (msgpack of a
list that starts with a domain label), built by the `*_payload` functions below.
docs/PROTOCOL.md describes the exchanges in prose.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

import msgpack

from sfs.common.codec import MaxLen, Pattern, Range, Record, Size, from_wire, pack, to_wire, unpack
from sfs.common.errors import ProtocolError, RemoteError, SfsError
from sfs.common.identity import KeyBundle

VERSION = 2  # 2: shares are tree manifests (header + index pages), BLAKE3 chunks

USERNAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,31}"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_PATTERN = rf"{_LABEL}(?:\.{_LABEL})*"  # a host name or an IPv4 address
PORT_PATTERN = (
    r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
)
# An IPv6 address goes in brackets, as in URLs (RFC 3986). The pattern admits its characters
# only, so no zone id (`%eth0` names an interface of the sender's machine, meaningless to
# anyone else); `valid_endpoint` then checks that it is a real address.
IPV6_HOST_PATTERN = r"\[[0-9A-Fa-f:.]{2,45}\]"
ENDPOINT_PATTERN = rf"tcp://(?:{HOST_PATTERN}|{IPV6_HOST_PATTERN}):{PORT_PATTERN}"
BIND_PATTERN = rf"tcp://(?:\*|{HOST_PATTERN}|{IPV6_HOST_PATTERN}):{PORT_PATTERN}"
FILE_ID_PATTERN = r"[0-9a-f]{32}"
MIN_ID_PREFIX = 8  # hex characters: 32 bits, rarely ambiguous among a user's files
FILE_ID_PREFIX_PATTERN = rf"[0-9a-f]{{{MIN_ID_PREFIX},32}}"


def valid_endpoint(text: str, *, bind: bool = False) -> bool:
    """`tcp://HOST:PORT`: HOST a name, an IPv4 address or a bracketed IPv6 address (or `*`
    for a bind)."""
    pattern = BIND_PATTERN if bind else ENDPOINT_PATTERN
    return re.fullmatch(pattern, text) is not None and _real_ipv6_if_bracketed(text)


def _real_ipv6_if_bracketed(endpoint: str) -> bool:
    """For an endpoint that matches the pattern: its host, if in brackets, is an IPv6
    address (`[zz::1]`, `[1:2:3]` and `[127.0.0.1]` match the pattern, and are not)."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    if not host.startswith("["):
        return True
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


def is_ipv6_literal(endpoint: str) -> bool:
    """Whether `endpoint` names its host by a bracketed IPv6 address. Connecting sockets
    turn IPv6 on only for those: with it on, zmq connects a host *name* to its first
    address only, so a name whose first address is IPv6 (`localhost` -> ::1, say) would
    miss a server that listens on IPv4 alone."""
    return endpoint.startswith("tcp://[")


class EndpointPattern(Pattern):
    """The codec's check for an `Endpoint`: the pattern, then a real IPv6 address if any."""

    def matches(self, text: str) -> bool:
        return super().matches(text) and _real_ipv6_if_bracketed(text)


Username = Annotated[str, MaxLen(32), Pattern(USERNAME_PATTERN)]
FileId = Annotated[str, MaxLen(32), Pattern(FILE_ID_PATTERN)]
Endpoint = Annotated[str, MaxLen(300), EndpointPattern(ENDPOINT_PATTERN)]
Token = Annotated[str, MaxLen(128)]
Password = Annotated[str, MaxLen(1024)]  # the bcrypt limit is checked with a clear message
Signature = Annotated[bytes, MaxLen(1024)]
Digest = Annotated[bytes, Size(32)]
Fingerprint = Annotated[bytes, Size(32)]
TransferId = Annotated[bytes, Size(16)]
# Printable text only: stores keep keywords one per line, and terminals show them.
Keyword = Annotated[str, MaxLen(64), Pattern(r"[^\x00-\x1f\x7f]+")]

MAX_MANIFEST_BYTES = 256 * 1024  # a version-2 tree header is at most about 132 KiB
MAX_BROKER_FRAME = 16 * 1024 * 1024
MAX_ACCESS_LIST = 1000
MAX_SEARCH_RESULTS = 500
MAX_ID_MATCHES = 10
MAX_DATA_HINTS = 4  # files listed for an id prefix that is not unique
MAX_TREE_FILES = 1 << 20  # sfs.common.tree.MAX_ENTRIES (which imports this module)


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # malformed or invalid request
    UNAUTHORIZED = "unauthorized"  # no valid session, wrong password
    FORBIDDEN = "forbidden"  # authenticated, but not allowed
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # e.g. username taken
    BUSY = "busy"  # try again later
    THROTTLED = "throttled"  # too many failed attempts; wait before trying again
    UPGRADE = "upgrade"  # the request speaks another protocol version
    INTERNAL = "internal"  # a bug or a storage failure on the other side


class Refused(SfsError):
    """A request a server answers with an error reply (`code`, and this message)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- envelope ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    op: str
    rid: int
    body: dict[str, Any]


class VersionMismatch(ProtocolError):
    """A well-formed envelope of another protocol version. Servers answer it with an
    `upgrade` error in that version's envelope (`encode_error(..., version=...)`): the
    error envelope is the same in every version, so the other side can read it."""

    def __init__(self, version: int, rid: int) -> None:
        super().__init__(f"upgrade sfs: this peer speaks version {VERSION}, you speak {version}")
        self.version = version
        self.rid = rid


MAX_VERSION = 2**16  # a larger `v` is garbage, not a version


def encode(op: str, body: Record | None = None, rid: int = 0) -> bytes:
    return pack({"v": VERSION, "op": op, "rid": rid, "body": to_wire(body) if body else {}})


def encode_packed(op: str, body: bytes, rid: int = 0) -> bytes:
    """As `encode`, with the body already packed (`pack(to_wire(record))`): a broker keeps
    answers packed and adds the envelope around them."""
    head = pack({"v": VERSION, "op": op, "rid": rid})
    assert head[0] == 0x83  # msgpack's fixmap of 3 entries: make it 4, then add "body"
    return b"\x84" + head[1:] + pack("body") + body


PEEK_LIMIT = 512  # bytes: a lookup frame is about 120


def peek_lookup(frame: bytes) -> tuple[int, str, str] | None:
    """(rid, token, file id) of a small lookup frame of this version, checked for shape
    and types only, else None. Cheaper than `decode_envelope` and `decode_body`: for a
    cache whose keys were made from requests that those checked in full, so that a
    value they would refuse can only miss."""
    if len(frame) > PEEK_LIMIT:
        return None
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:  # any malformed frame: the full decoder says what is wrong
        return None
    if type(value) is not dict or len(value) != 4 or value.get("op") != "lookup":
        return None
    version, rid, body = value.get("v"), value.get("rid"), value.get("body")
    if type(version) is not int or version != VERSION or type(rid) is not int:
        return None
    if not 0 <= rid < 2**63 or type(body) is not dict or len(body) != 2:
        return None
    token, file_id = body.get("token"), body.get("file_id")
    if type(token) is not str or type(file_id) is not str:
        return None
    return rid, token, file_id


def decode_envelope(frame: bytes) -> Envelope:
    """The envelope of a frame. One of another protocol version raises `VersionMismatch`,
    unless it is an error: errors read the same in every version."""
    value = unpack(frame)
    if not isinstance(value, dict) or set(value) != {"v", "op", "rid", "body"}:
        raise ProtocolError("malformed frame: not an sfs envelope")
    version, op, rid, body = value["v"], value["op"], value["rid"], value["body"]
    if not isinstance(op, str) or not isinstance(body, dict):
        raise ProtocolError("malformed frame: bad op or body")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ProtocolError("malformed frame: bad request id")
    if type(version) is not int or not 0 < version < MAX_VERSION:  # True and 1.0 are not 1
        shown = reprlib.repr(version)  # bounded: a deeply nested value must not recurse
        raise ProtocolError(f"unsupported protocol version {shown} (this is {VERSION})")
    if version != VERSION and op != "error":
        raise VersionMismatch(version, rid)
    return Envelope(op, rid, body)


def decode_body(envelope: Envelope, registry: dict[str, type[Record]]) -> Record:
    cls = registry.get(envelope.op)
    if cls is None:
        raise ProtocolError(f"unknown operation {envelope.op[:40]!r}")
    return from_wire(cls, envelope.body, envelope.op)


@dataclass(frozen=True)
class ErrorBody(Record):
    code: Annotated[str, MaxLen(32)]
    message: Annotated[str, MaxLen(1000)]


def encode_error(code: ErrorCode, message: str, rid: int = 0, version: int = VERSION) -> bytes:
    """An error reply; `version`: that of the request, so that its sender can read it."""
    body = to_wire(ErrorBody(code.value, message[:1000]))
    return pack({"v": version, "op": "error", "rid": rid, "body": body})


def encode_refusal(exc: ProtocolError, rid: int = 0) -> bytes:
    """The reply to a request that cannot be decoded: `upgrade` in the request's own
    version for one of another version, else `bad_request`."""
    if isinstance(exc, VersionMismatch):
        return encode_error(ErrorCode.UPGRADE, str(exc), exc.rid, exc.version)
    return encode_error(ErrorCode.BAD_REQUEST, str(exc), rid)


def raise_for_error(envelope: Envelope, who: str) -> None:
    """Turn an error envelope into a `RemoteError` whose message names `who`."""
    if envelope.op == "error":
        error = from_wire(ErrorBody, envelope.body, "error")
        raise RemoteError(error.code, f"{who}: {error.message}")


# --- broker requests and results ------------------------------------------------------


@dataclass(frozen=True)
class Ping(Record):
    pass


@dataclass(frozen=True)
class PingResult(Record):
    version: int
    time: int


@dataclass(frozen=True)
class GetChallenge(Record):
    pass


@dataclass(frozen=True)
class ChallengeResult(Record):
    challenge: Digest


@dataclass(frozen=True)
class Register(Record):
    username: Username
    password: Password
    bundle: KeyBundle
    challenge: Digest
    signature: Signature  # over register_payload(); proves possession of the RSA key


@dataclass(frozen=True)
class Login(Record):
    username: Username
    password: Password


@dataclass(frozen=True)
class DeviceLogin(Record):
    """A login with the device's own keys instead of a password, for unattended
    servers: a challenge from `challenge`, signed with the registered RSA key, sent over
    a connection made with the registered transport key."""

    username: Username
    challenge: Digest
    signature: Signature  # over device_login_payload()


@dataclass(frozen=True)
class SessionResult(Record):
    username: Username
    token: Token
    expires_at: int


@dataclass(frozen=True)
class Logout(Record):
    token: Token


MAX_HINTS = 8


@dataclass(frozen=True)
class ConnectionHint(Record):
    """One way to reach a holder (docs/PROTOCOL.md, Connection hints): `direct` at
    `endpoint`, or `relay`: through the relay at `endpoint` whose CurveZMQ key is
    `relay_key`."""

    kind: Annotated[str, MaxLen(8), Pattern(r"direct|relay")]
    endpoint: Endpoint
    relay_key: Annotated[bytes, Size(32)] | None = None


@dataclass(frozen=True)
class Heartbeat(Record):
    token: Token
    endpoint: Endpoint
    # Every way to reach this peer, best first; absent (an older peer): `endpoint` only.
    hints: Annotated[list[ConnectionHint], MaxLen(MAX_HINTS)] = field(default_factory=list)


@dataclass(frozen=True)
class HeartbeatResult(Record):
    ttl: int  # seconds this peer stays online without another heartbeat


@dataclass(frozen=True)
class GoOffline(Record):
    token: Token


@dataclass(frozen=True)
class Publish(Record):
    token: Token
    manifest: Annotated[bytes, MaxLen(MAX_MANIFEST_BYTES)]
    signature: Signature
    access: Annotated[list[Username], MaxLen(MAX_ACCESS_LIST)] | None  # None: every user
    grant: Signature  # over grant_payload(file id, access), by the owner: seeders check it


@dataclass(frozen=True)
class PublishResult(Record):
    file_id: FileId


@dataclass(frozen=True)
class Unpublish(Record):
    token: Token
    file_id: FileId


@dataclass(frozen=True)
class Search(Record):
    token: Token
    query: Annotated[str, MaxLen(200)] = ""
    owner: Username | None = None
    limit: Annotated[int, Range(1, MAX_SEARCH_RESULTS)] = 100


@dataclass(frozen=True)
class SearchHit(Record):
    file_id: FileId
    name: Annotated[str, MaxLen(1024)]
    size: Annotated[int, Range(0, 2**63)]
    owner: Username
    keywords: Annotated[list[Keyword], MaxLen(64)]
    shared_at: int
    online: bool
    # From the owner-signed tree header. Absent (a broker before folders in search): a file.
    kind: Annotated[str, MaxLen(6), Pattern("file|folder")] = "file"
    files: Annotated[int, Range(0, MAX_TREE_FILES)] = 1  # regular files in the share


@dataclass(frozen=True)
class SearchResult(Record):
    hits: Annotated[list[SearchHit], MaxLen(MAX_SEARCH_RESULTS)]
    # The broker stopped at its budget of files examined: older files may match too.
    # Absent (a broker before it) means False.
    partial: bool = False


@dataclass(frozen=True)
class Resolve(Record):
    """The files visible to the caller (as search sees them) whose id starts with
    `prefix`: a user may type a unique prefix wherever a file id is taken."""

    token: Token
    # Hex only here; the broker says itself that it takes MIN_ID_PREFIX characters or more.
    prefix: Annotated[str, MaxLen(32), Pattern(r"[0-9a-f]{1,32}")]


@dataclass(frozen=True)
class IdMatch(Record):
    file_id: FileId
    name: Annotated[str, MaxLen(1024)]
    owner: Username


@dataclass(frozen=True)
class ResolveResult(Record):
    matches: Annotated[list[IdMatch], MaxLen(MAX_ID_MATCHES)]  # by file id


@dataclass(frozen=True)
class Lookup(Record):
    token: Token
    file_id: FileId


@dataclass(frozen=True)
class Holder(Record):
    username: Username
    endpoint: Endpoint
    bundle: KeyBundle
    hints: Annotated[list[ConnectionHint], MaxLen(MAX_HINTS)] = field(default_factory=list)


@dataclass(frozen=True)
class LookupResult(Record):
    file_id: FileId
    owner: Username
    owner_bundle: KeyBundle
    manifest: Annotated[bytes, MaxLen(MAX_MANIFEST_BYTES)]
    signature: Signature
    holders: Annotated[list[Holder], MaxLen(64)]  # online holders only
    access: Annotated[list[Username], MaxLen(MAX_ACCESS_LIST)] | None  # as the owner signed it
    grant: Signature


@dataclass(frozen=True)
class Hold(Record):
    """This peer holds a verified copy of the file and serves it (seeding)."""

    token: Token
    file_id: FileId


@dataclass(frozen=True)
class Release(Record):
    """This peer no longer serves its copy."""

    token: Token
    file_id: FileId


@dataclass(frozen=True)
class GetBundle(Record):
    token: Token
    username: Username


@dataclass(frozen=True)
class BundleResult(Record):
    username: Username
    bundle: KeyBundle


@dataclass(frozen=True)
class RelayInfo(Record):
    endpoint: Endpoint
    key: Annotated[bytes, Size(32)]  # the relay's CurveZMQ public key


RelayTicketBytes = Annotated[bytes, MaxLen(2048)]
Ed25519Signature = Annotated[bytes, Size(64)]


@dataclass(frozen=True)
class RelayGrant(Record):
    """A holder asks for the broker's relays and a pass to attach to them."""

    token: Token
    endpoints: Annotated[list[Endpoint], MaxLen(MAX_HINTS)]  # its own direct endpoints


@dataclass(frozen=True)
class RelayGrantResult(Record):
    relays: Annotated[list[RelayInfo], MaxLen(MAX_HINTS)]  # empty: this broker has none
    ticket: RelayTicketBytes  # attach_ticket_payload(), signed by the broker's relay key
    signature: Ed25519Signature


@dataclass(frozen=True)
class GetTicket(Record):
    """A requester asks for a ticket to reach `holder` for `file_id` through a relay."""

    token: Token
    file_id: FileId
    holder: Username


@dataclass(frozen=True)
class TicketResult(Record):
    ticket: RelayTicketBytes  # circuit_ticket_payload()
    signature: Ed25519Signature


@dataclass(frozen=True)
class Empty(Record):
    """The result of requests that only succeed or fail."""


BROKER_REQUESTS: dict[str, type[Record]] = {
    "ping": Ping,
    "challenge": GetChallenge,
    "register": Register,
    "login": Login,
    "device_login": DeviceLogin,
    "logout": Logout,
    "heartbeat": Heartbeat,
    "offline": GoOffline,
    "publish": Publish,
    "unpublish": Unpublish,
    "search": Search,
    "lookup": Lookup,
    "resolve": Resolve,
    "hold": Hold,
    "release": Release,
    "bundle": GetBundle,
    "relay_grant": RelayGrant,
    "ticket": GetTicket,
}


def normalise_access(access: list[str] | None, owner: str) -> list[str] | None:
    """The access list as stored and signed: sorted, unique, without the owner."""
    return None if access is None else sorted(set(access) - {owner})


def grant_payload(file_id: str, access: list[str] | None) -> bytes:
    """What the owner signs: who may fetch this file, from the owner or any seeder."""
    return pack(["sfs-grant-v1", file_id, access])


def register_payload(username: str, challenge: bytes, bundle: KeyBundle) -> bytes:
    return pack(["sfs-register-v1", username, challenge, bundle.rsa_public, bundle.curve_public])


def device_login_payload(username: str, challenge: bytes, bundle: KeyBundle) -> bytes:
    return pack(
        ["sfs-device-login-v1", username, challenge, bundle.rsa_public, bundle.curve_public]
    )


# --- peer channel ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Record):
    file_id: FileId
    requester: Username
    bundle: KeyBundle
    nonce: Digest  # fresh per transfer; the offer must echo it
    holder_fp: Fingerprint
    signature: Signature  # over hello_payload(), by the requester


@dataclass(frozen=True)
class Offer(Record):
    transfer_id: TransferId
    file_id: FileId
    wrapped_secret: Annotated[bytes, MaxLen(1024)]  # RSA-OAEP(key || base nonce)
    requester_fp: Fingerprint
    requester_nonce: Digest
    manifest_digest: Digest
    holder_fp: Fingerprint
    signature: Signature  # over offer_payload(), by the holder
    # Where to open the data connection for this transfer's chunks (docs/PROTOCOL-v2.md
    # section 4), best first, and the fresh ticket its `attach` proof covers. An offer
    # without them (an older holder) serves chunks on the control connection.
    data: Annotated[list[Endpoint], MaxLen(MAX_DATA_HINTS)] = field(default_factory=list)
    data_ticket: Annotated[bytes, MaxLen(32)] = b""


@dataclass(frozen=True)
class Attach(Record):
    """The first message on a data connection: binds it to one transfer."""

    transfer_id: TransferId
    proof: Digest  # crypto.attach_proof(transfer key, transfer_id, data_ticket)
    # Asks the holder to answer `attached`. Off by default: requesters that predate it
    # would take the answer for a malformed chunk (holders that predate it refuse such
    # an attach; the requester then asks for the chunks on the control connection).
    answer: bool = False


@dataclass(frozen=True)
class DataAttached(Record):
    """The holder's answer to a valid `attach`, on the data connection: the requester
    sends chunk requests there only once it has it (else they go on the control one)."""

    transfer_id: TransferId


@dataclass(frozen=True)
class ChunkRequest(Record):
    transfer_id: TransferId
    index: Annotated[int, Range(0, 2**32)]


@dataclass(frozen=True)
class ChunkHeader(Record):
    transfer_id: TransferId
    index: Annotated[int, Range(0, 2**32)]


PageKind = Annotated[str, MaxLen(7), Pattern("entries|hashes")]


@dataclass(frozen=True)
class PageRequest(Record):
    """One page of the share's index (docs/PROTOCOL.md, the tree manifest)."""

    transfer_id: TransferId
    kind: PageKind
    index: Annotated[int, Range(0, 2**16)]


@dataclass(frozen=True)
class PageHeader(Record):
    """Before the sealed page bytes, as a chunk header before a chunk."""

    transfer_id: TransferId
    kind: PageKind
    index: Annotated[int, Range(0, 2**16)]


@dataclass(frozen=True)
class Finish(Record):
    """The requester is done with a transfer (finished or cancelled); no reply."""

    transfer_id: TransferId


PEER_REQUESTS: dict[str, type[Record]] = {
    "hello": Hello,
    "get": ChunkRequest,
    "page": PageRequest,
    "finish": Finish,
}
# What a data connection may carry: `attach` first, then chunk requests.
DATA_REQUESTS: dict[str, type[Record]] = {
    "attach": Attach,
    "get": ChunkRequest,
}
# What the holder sends on a data connection besides chunks and errors.
DATA_REPLIES: dict[str, type[Record]] = {
    "attached": DataAttached,
}


def hello_payload(hello: Hello) -> bytes:
    return pack(
        [
            "sfs-hello-v1",
            hello.file_id,
            hello.requester,
            hello.bundle.fingerprint(),
            hello.nonce,
            hello.holder_fp,
        ]
    )


def offer_payload(offer: Offer) -> bytes:
    return pack(
        [
            "sfs-offer-v1",
            offer.transfer_id,
            offer.file_id,
            offer.wrapped_secret,
            offer.requester_fp,
            offer.requester_nonce,
            offer.manifest_digest,
            offer.holder_fp,
            # Signed only when present, so that offers without a data connection keep
            # the signature they had.
            *([offer.data, offer.data_ticket] if offer.data or offer.data_ticket else []),
        ]
    )


def chunk_associated_data(transfer_id: bytes, file_id: str, index: int, chunk_count: int) -> bytes:
    return pack(["sfs-chunk-v1", transfer_id, file_id, index, chunk_count])


# Pages are sealed under the transfer key with nonces apart from every chunk's (chunk
# indexes stay below 2**32): entry page i uses 2**33 + i, hash page i 2**34 + i.
_PAGE_NONCE_BASE = {"entries": 2**33, "hashes": 2**34}


def page_nonce_index(kind: str, index: int) -> int:
    return _PAGE_NONCE_BASE[kind] + index


def page_associated_data(transfer_id: bytes, file_id: str, kind: str, index: int) -> bytes:
    return pack(["sfs-page-v2", transfer_id, file_id, kind, index])
