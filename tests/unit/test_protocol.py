"""sfs.common.protocol: envelopes, error envelopes, records and signed payloads."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from sfs.common import crypto, protocol, tree
from sfs.common.codec import Record, from_wire, pack, to_wire, unpack
from sfs.common.errors import IntegrityError, ProtocolError, RemoteError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import (
    BROKER_REQUESTS,
    PEER_REQUESTS,
    Envelope,
    ErrorCode,
    decode_body,
    decode_envelope,
    encode,
    encode_error,
    raise_for_error,
)

TOKEN = "t" * 43
FILE_ID = "0123456789abcdef0123456789abcdef"
BUNDLE = KeyBundle(b"\x30" * 420, b"\x01" * 32)
OTHER_BUNDLE = KeyBundle(b"\x30" * 420, b"\x02" * 32)


def frame(**fields: Any) -> bytes:
    """A raw envelope: a valid ping unless fields say otherwise (... removes a key)."""
    value: dict[str, Any] = {"v": protocol.VERSION, "op": "ping", "rid": 0, "body": {}}
    for key, item in fields.items():
        if item is ...:
            del value[key]
        else:
            value[key] = item
    return pack(value)


# --- one valid sample of every record --------------------------------------------------------

HIT = protocol.SearchHit(FILE_ID, "report.pdf", 1234, "bob", ["q3", "finance"], 1_700_000_000, True)
HOLDER = protocol.Holder("bob", "tcp://10.0.0.2:7000", BUNDLE)

BROKER_SAMPLES: dict[str, Record] = {
    "ping": protocol.Ping(),
    "challenge": protocol.GetChallenge(),
    "register": protocol.Register("alice", "pw", BUNDLE, b"\x02" * 32, b"\x03" * 384),
    "device_login": protocol.DeviceLogin("alice", b"\x02" * 32, b"\x03" * 384),
    "login": protocol.Login("alice", "correct horse"),
    "logout": protocol.Logout(TOKEN),
    "heartbeat": protocol.Heartbeat(TOKEN, "tcp://host.example:7000"),
    "offline": protocol.GoOffline(TOKEN),
    "publish": protocol.Publish(TOKEN, b"manifest", b"s" * 384, ["bob", "carol"], b"g" * 384),
    "unpublish": protocol.Unpublish(TOKEN, FILE_ID),
    "search": protocol.Search(TOKEN, "report", "bob", 50),
    "lookup": protocol.Lookup(TOKEN, FILE_ID),
    "resolve": protocol.Resolve(TOKEN, FILE_ID[:8]),
    "hold": protocol.Hold(TOKEN, FILE_ID),
    "release": protocol.Release(TOKEN, FILE_ID),
    "bundle": protocol.GetBundle(TOKEN, "bob"),
    "relay_grant": protocol.RelayGrant(TOKEN, ["tcp://host.example:7000", "tcp://[::1]:7000"]),
    "ticket": protocol.GetTicket(TOKEN, FILE_ID, "bob"),
}

PEER_SAMPLES: dict[str, Record] = {
    "hello": protocol.Hello(FILE_ID, "alice", BUNDLE, b"\x04" * 32, b"\x05" * 32, b"s" * 384),
    "get": protocol.ChunkRequest(b"\x06" * 16, 7),
    "page": protocol.PageRequest(b"\x06" * 16, "hashes", 3),
    "finish": protocol.Finish(b"\x06" * 16),
}

RESULT_SAMPLES: list[Record] = [
    protocol.PingResult(1, 1_700_000_000),
    protocol.ChallengeResult(b"\x07" * 32),
    protocol.SessionResult("alice", TOKEN, 1_700_086_400),
    protocol.HeartbeatResult(30),
    protocol.PublishResult(FILE_ID),
    protocol.SearchResult([HIT, dataclasses.replace(HIT, online=False, keywords=[])]),
    protocol.SearchResult([]),
    protocol.SearchResult([HIT], partial=True),
    protocol.SearchResult([dataclasses.replace(HIT, name="photos", kind="folder", files=7)]),
    protocol.ResolveResult([protocol.IdMatch(FILE_ID, "report.pdf", "bob")]),
    protocol.ResolveResult([]),
    protocol.LookupResult(
        FILE_ID, "bob", BUNDLE, b"manifest", b"s" * 384, [HOLDER], ["alice"], b"g" * 384
    ),
    protocol.LookupResult(FILE_ID, "bob", BUNDLE, b"manifest", b"s" * 384, [], None, b"g"),
    protocol.BundleResult("bob", BUNDLE),
    protocol.Empty(),
    protocol.Heartbeat(
        TOKEN,
        "tcp://10.0.0.2:7000",
        [
            protocol.ConnectionHint("direct", "tcp://[2001:db8::2]:7000"),
            protocol.ConnectionHint("direct", "tcp://10.0.0.2:7000"),
            protocol.ConnectionHint("relay", "tcp://relay.example:5602", b"\x01" * 32),
        ],
    ),
    protocol.RelayGrantResult(
        [protocol.RelayInfo("tcp://relay.example:5602", b"\x01" * 32)], b"t" * 200, b"s" * 64
    ),
    protocol.RelayGrantResult([], b"", b"\x00" * 64),
    protocol.TicketResult(b"t" * 200, b"s" * 64),
    protocol.Offer(
        b"\x06" * 16,
        FILE_ID,
        b"w" * 384,
        b"\x08" * 32,
        b"\x04" * 32,
        b"\x09" * 32,
        b"\x05" * 32,
        b"s" * 384,
    ),
    protocol.ChunkHeader(b"\x06" * 16, 2**32),
    protocol.ErrorBody("not_found", "no such file"),
]


def test_every_registered_operation_has_a_sample() -> None:
    assert set(BROKER_SAMPLES) == set(BROKER_REQUESTS)
    assert set(PEER_SAMPLES) == set(PEER_REQUESTS)
    for op, record in {**BROKER_SAMPLES, **PEER_SAMPLES}.items():
        assert type(record) is {**BROKER_REQUESTS, **PEER_REQUESTS}[op]


@pytest.mark.parametrize("op", sorted(BROKER_SAMPLES))
def test_broker_request_round_trip(op: str) -> None:
    data = encode(op, BROKER_SAMPLES[op], rid=41)
    envelope = decode_envelope(data)
    assert (envelope.op, envelope.rid) == (op, 41)
    assert decode_body(envelope, BROKER_REQUESTS) == BROKER_SAMPLES[op]


@pytest.mark.parametrize("op", sorted(PEER_SAMPLES))
def test_peer_request_round_trip(op: str) -> None:
    envelope = decode_envelope(encode(op, PEER_SAMPLES[op]))
    assert envelope.rid == 0
    assert decode_body(envelope, PEER_REQUESTS) == PEER_SAMPLES[op]


@pytest.mark.parametrize("record", RESULT_SAMPLES, ids=lambda r: type(r).__name__)
def test_result_record_round_trip(record: Record) -> None:
    envelope = decode_envelope(encode("result", record, rid=3))
    assert from_wire(type(record), envelope.body) == record


def test_encode_is_the_documented_envelope() -> None:
    assert unpack(encode("login", protocol.Login("alice", "pw"), rid=9)) == {
        "v": protocol.VERSION,
        "op": "login",
        "rid": 9,
        "body": {"username": "alice", "password": "pw"},
    }
    assert unpack(encode("ping")) == {"v": protocol.VERSION, "op": "ping", "rid": 0, "body": {}}


def test_search_defaults() -> None:
    search = decode_body(Envelope("search", 0, {"token": TOKEN}), BROKER_REQUESTS)
    assert search == protocol.Search(TOKEN, "", None, 100)


def test_a_search_result_without_partial_is_complete() -> None:
    """As a broker from before the search budget sends it."""
    assert from_wire(protocol.SearchResult, {"hits": []}) == protocol.SearchResult([], False)


def test_a_search_hit_without_kind_and_files_is_one_file() -> None:
    """Absent fields decode to a file share (a hit from a broker before folders in search)."""
    wire = to_wire(HIT)
    del wire["kind"], wire["files"]
    assert from_wire(protocol.SearchHit, wire) == HIT
    assert (HIT.kind, HIT.files) == ("file", 1)


@pytest.mark.parametrize(
    "changes",
    [{"kind": "link"}, {"kind": ""}, {"kind": 3}, {"files": -1}, {"files": 2**20 + 1}],
)
def test_a_search_hit_with_a_bad_kind_or_count_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        from_wire(protocol.SearchHit, {**to_wire(HIT), **changes})


def test_a_search_hit_counts_at_most_the_files_of_a_tree() -> None:
    assert protocol.MAX_TREE_FILES == tree.MAX_ENTRIES


def test_publish_access_none_means_everyone_and_is_kept_apart_from_empty() -> None:
    for access in (None, [], ["bob"]):
        record = protocol.Publish(TOKEN, b"m", b"s", access, b"g")
        assert decode_body(decode_envelope(encode("publish", record)), BROKER_REQUESTS) == record


# --- decode_envelope ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1garbage", id="garbage"),
        pytest.param(frame()[:-1], id="truncated"),
        pytest.param(frame() + b"\x00", id="trailing"),
        pytest.param(pack([1, "ping", 0, {}]), id="list"),
        pytest.param(pack(None), id="nil"),
        pytest.param(pack("ping"), id="str"),
        pytest.param(frame(v=...), id="no-v"),
        pytest.param(frame(op=...), id="no-op"),
        pytest.param(frame(rid=...), id="no-rid"),
        pytest.param(frame(body=...), id="no-body"),
        pytest.param(frame(extra=1), id="extra-key"),
        pytest.param(
            pack({b"v": protocol.VERSION, "op": "ping", "rid": 0, "body": {}}), id="bytes-key"
        ),
        pytest.param(frame(v=0), id="v0"),
        pytest.param(frame(v=protocol.VERSION + 1), id="v-next"),
        pytest.param(frame(v=-1), id="v-1"),
        pytest.param(frame(v=True), id="v-true"),
        pytest.param(frame(v=float(protocol.VERSION)), id="v-float"),
        pytest.param(frame(v=str(protocol.VERSION)), id="v-str"),
        pytest.param(frame(v=None), id="v-nil"),
        pytest.param(frame(v=[protocol.VERSION]), id="v-list"),
        pytest.param(frame(v=msgpack.Timestamp(1, 0)), id="v-timestamp"),
        pytest.param(frame(op=b"ping"), id="op-bytes"),
        pytest.param(frame(op=1), id="op-int"),
        pytest.param(frame(op=None), id="op-nil"),
        pytest.param(frame(body=[]), id="body-list"),
        pytest.param(frame(body=None), id="body-nil"),
        pytest.param(frame(body=b""), id="body-bytes"),
        pytest.param(frame(rid=-1), id="rid-negative"),
        pytest.param(frame(rid=2**63), id="rid-too-big"),
        pytest.param(frame(rid=2**64 - 1), id="rid-u64-max"),
        pytest.param(frame(rid=True), id="rid-true"),
        pytest.param(frame(rid=1.0), id="rid-float"),
        pytest.param(frame(rid="1"), id="rid-str"),
        pytest.param(frame(rid=None), id="rid-nil"),
    ],
)
def test_decode_envelope_refuses(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_envelope(data)


@pytest.mark.parametrize("depth", [10, 990, 1000, 1020])
def test_decode_envelope_with_a_deeply_nested_version(depth: int) -> None:
    # Regression: the error message used repr(), which hit RecursionError near depth 1000.
    version: Any = None
    for _ in range(depth):
        version = [version]
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        decode_envelope(frame(v=version))


def test_decode_envelope_version_message_is_bounded() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_envelope(frame(v="x" * 100_000))
    assert len(str(info.value)) < 200


def test_decode_envelope_accepts_the_largest_rid() -> None:
    assert decode_envelope(frame(rid=2**63 - 1)).rid == 2**63 - 1


def test_decode_envelope_keeps_the_body_unvalidated() -> None:
    envelope = decode_envelope(frame(op="anything", body={"x": [1, 2]}))
    assert envelope == Envelope("anything", 0, {"x": [1, 2]})


# --- decode_body ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["", "PING", "ping ", "result", "error", "hello", "get", "x" * 500])
def test_decode_body_refuses_unknown_operations(op: str) -> None:
    with pytest.raises(ProtocolError, match="unknown operation") as info:
        decode_body(Envelope(op, 0, {}), BROKER_REQUESTS)
    assert len(str(info.value)) < 100  # a long op name is cut short


def test_decode_body_uses_the_registry_it_is_given() -> None:
    envelope = decode_envelope(encode("hello", PEER_SAMPLES["hello"]))
    assert decode_body(envelope, PEER_REQUESTS) == PEER_SAMPLES["hello"]
    with pytest.raises(ProtocolError, match="unknown operation"):
        decode_body(envelope, BROKER_REQUESTS)
    with pytest.raises(ProtocolError, match="unknown operation"):
        decode_body(decode_envelope(encode("ping")), PEER_REQUESTS)


def test_decode_body_refuses_a_body_of_another_operation() -> None:
    envelope = decode_envelope(encode("logout", protocol.Login("alice", "pw")))
    with pytest.raises(ProtocolError, match="logout"):
        decode_body(envelope, BROKER_REQUESTS)


def test_decode_body_refuses_a_timestamp_value() -> None:
    envelope = decode_envelope(frame(op="logout", body={"token": msgpack.Timestamp(0, 1)}))
    with pytest.raises(ProtocolError, match="token: expected str"):
        decode_body(envelope, BROKER_REQUESTS)


def body(op: str, **changes: Any) -> dict[str, Any]:
    wire = to_wire({**BROKER_SAMPLES, **PEER_SAMPLES}[op])
    for key, value in changes.items():
        if value is ...:
            del wire[key]
        else:
            wire[key] = value
    return wire


@pytest.mark.parametrize(
    ("op", "changes"),
    [
        ("login", {"username": "Alice"}),
        ("login", {"username": ""}),
        ("login", {"username": "a" * 33}),
        ("login", {"username": "alice\n"}),
        ("login", {"username": "-alice"}),
        ("login", {"password": "p" * 1025}),
        ("login", {"password": b"pw"}),
        ("logout", {"token": "t" * 129}),
        ("heartbeat", {"endpoint": "tcp://*:7000"}),
        ("heartbeat", {"endpoint": "host:7000"}),
        ("heartbeat", {"endpoint": "tcp://" + "h" * 300 + ":1"}),
        ("register", {"challenge": b"\x00" * 31}),
        ("register", {"signature": b"s" * 1025}),
        ("register", {"bundle": {"rsa_public": b"x", "curve_public": b"\x00" * 31}}),
        ("register", {"bundle": None}),
        ("publish", {"access": ["Bob"]}),
        ("publish", {"access": ["bob"] * 1001}),
        ("publish", {"access": "bob"}),
        ("publish", {"access": ...}),
        ("unpublish", {"file_id": FILE_ID.upper()}),
        ("unpublish", {"file_id": FILE_ID[:-1]}),
        ("unpublish", {"file_id": FILE_ID + "0"}),
        ("search", {"limit": 0}),
        ("search", {"limit": 501}),
        ("search", {"query": "q" * 201}),
        ("search", {"owner": "Bob"}),
        ("lookup", {"file_id": None}),
        ("resolve", {"prefix": ""}),
        ("resolve", {"prefix": FILE_ID + "0"}),
        ("resolve", {"prefix": FILE_ID[8:16].upper()}),
        ("resolve", {"prefix": "abcdefg1"}),
        ("resolve", {"prefix": "abcd%"}),
        ("get", {"index": -1}),
        ("get", {"index": 2**32 + 1}),
        ("get", {"transfer_id": b"\x00" * 15}),
        ("hello", {"nonce": b"\x00" * 33}),
        ("hello", {"holder_fp": "x" * 32}),
        ("finish", {"transfer_id": ...}),
    ],
    ids=repr,
)
def test_request_field_validation(op: str, changes: dict[str, Any]) -> None:
    registry = BROKER_REQUESTS if op in BROKER_REQUESTS else PEER_REQUESTS
    envelope = decode_envelope(
        pack({"v": protocol.VERSION, "op": op, "rid": 0, "body": body(op, **changes)})
    )
    with pytest.raises(ProtocolError):
        decode_body(envelope, registry)


@pytest.mark.parametrize(
    ("op", "changes"),
    [
        ("login", {"username": "a" * 32}),
        ("login", {"password": "p" * 1024}),
        ("search", {"limit": 1}),
        ("search", {"limit": 500}),
        ("search", {"owner": None}),
        ("resolve", {"prefix": FILE_ID[:1]}),  # the broker refuses it itself
        ("resolve", {"prefix": FILE_ID[:8]}),
        ("resolve", {"prefix": FILE_ID}),
        ("get", {"index": 0}),
        ("get", {"index": 2**32}),
        ("publish", {"access": ["bob"] * 1000}),
    ],
    ids=repr,
)
def test_request_values_at_the_limits_are_accepted(op: str, changes: dict[str, Any]) -> None:
    registry = BROKER_REQUESTS if op in BROKER_REQUESTS else PEER_REQUESTS
    record = decode_body(Envelope(op, 0, body(op, **changes)), registry)
    for key, value in changes.items():
        assert getattr(record, key) == value


# --- error envelopes ------------------------------------------------------------------------------


def test_error_envelope_round_trip() -> None:
    envelope = decode_envelope(encode_error(ErrorCode.NOT_FOUND, "no such file", rid=7))
    assert (envelope.op, envelope.rid) == ("error", 7)
    assert envelope.body == {"code": "not_found", "message": "no such file"}
    with pytest.raises(RemoteError) as info:
        raise_for_error(envelope, "broker")
    assert info.value.code == ErrorCode.NOT_FOUND == "not_found"
    assert str(info.value) == "broker: no such file"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_survives_the_wire(code: ErrorCode) -> None:
    with pytest.raises(RemoteError) as info:
        raise_for_error(decode_envelope(encode_error(code, "m")), "peer bob")
    assert info.value.code == code.value


def test_long_error_messages_are_cut_to_fit() -> None:
    envelope = decode_envelope(encode_error(ErrorCode.INTERNAL, "x" * 5000))
    assert len(envelope.body["message"]) == 1000
    with pytest.raises(RemoteError, match=r"^broker: x{1000}$"):
        raise_for_error(envelope, "broker")


@pytest.mark.parametrize(
    "op_and_body",
    [("result", {"version": 1, "time": 2}), ("ping", {}), ("chunk", {}), ("errors", {})],
)
def test_raise_for_error_ignores_other_envelopes(op_and_body: tuple[str, dict[str, Any]]) -> None:
    op, payload = op_and_body
    assert raise_for_error(Envelope(op, 0, payload), "broker") is None


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"code": "not_found"},
        {"message": "m"},
        {"code": "x" * 33, "message": "m"},
        {"code": "not_found", "message": "m" * 1001},
        {"code": 404, "message": "m"},
        {"code": "not_found", "message": b"m"},
        {"code": "not_found", "message": "m", "extra": 1},
    ],
)
def test_malformed_error_body_is_a_protocol_error(payload: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        raise_for_error(Envelope("error", 0, payload), "broker")


# --- signed and authenticated payloads -----------------------------------------------------------


def test_register_payload_is_the_documented_list() -> None:
    payload = protocol.register_payload("alice", b"\x02" * 32, BUNDLE)
    assert unpack(payload) == [
        "sfs-register-v1",
        "alice",
        b"\x02" * 32,
        BUNDLE.rsa_public,
        BUNDLE.curve_public,
    ]
    assert protocol.register_payload("alice", b"\x02" * 32, BUNDLE) == payload


@pytest.mark.parametrize(
    "args",
    [
        ("bob", b"\x02" * 32, BUNDLE),
        ("alice", b"\x03" * 32, BUNDLE),
        ("alice", b"\x02" * 32, OTHER_BUNDLE),
        ("alice", b"\x02" * 32, KeyBundle(b"\x31" * 420, BUNDLE.curve_public)),
    ],
)
def test_register_payload_depends_on_every_input(args: tuple[str, bytes, KeyBundle]) -> None:
    assert protocol.register_payload(*args) != protocol.register_payload(
        "alice", b"\x02" * 32, BUNDLE
    )


HELLO: protocol.Hello = PEER_SAMPLES["hello"]  # type: ignore[assignment]
OFFER: protocol.Offer = next(r for r in RESULT_SAMPLES if isinstance(r, protocol.Offer))


def test_hello_payload_is_the_documented_list() -> None:
    assert unpack(protocol.hello_payload(HELLO)) == [
        "sfs-hello-v1",
        FILE_ID,
        "alice",
        BUNDLE.fingerprint(),
        b"\x04" * 32,
        b"\x05" * 32,
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"file_id": "f" * 32},
        {"requester": "bob"},
        {"bundle": OTHER_BUNDLE},  # only the curve key differs: the fingerprint covers it
        {"nonce": b"\x00" * 32},
        {"holder_fp": b"\x00" * 32},
    ],
    ids=lambda c: next(iter(c)),
)
def test_hello_payload_depends_on_every_signed_field(changes: dict[str, Any]) -> None:
    changed = dataclasses.replace(HELLO, **changes)
    assert protocol.hello_payload(changed) != protocol.hello_payload(HELLO)


def test_hello_payload_excludes_its_own_signature() -> None:
    changed = dataclasses.replace(HELLO, signature=b"other")
    assert protocol.hello_payload(changed) == protocol.hello_payload(HELLO)


def test_offer_payload_is_the_documented_list() -> None:
    assert unpack(protocol.offer_payload(OFFER)) == [
        "sfs-offer-v1",
        OFFER.transfer_id,
        OFFER.file_id,
        OFFER.wrapped_secret,
        OFFER.requester_fp,
        OFFER.requester_nonce,
        OFFER.manifest_digest,
        OFFER.holder_fp,
    ]


@pytest.mark.parametrize(
    "field",
    [
        "transfer_id",
        "file_id",
        "wrapped_secret",
        "requester_fp",
        "requester_nonce",
        "manifest_digest",
        "holder_fp",
    ],
)
def test_offer_payload_depends_on_every_signed_field(field: str) -> None:
    value = getattr(OFFER, field)
    other = "f" * 32 if isinstance(value, str) else bytes(len(value))
    assert other != value
    changed = dataclasses.replace(OFFER, **{field: other})
    assert protocol.offer_payload(changed) != protocol.offer_payload(OFFER)


def test_offer_payload_excludes_its_own_signature() -> None:
    changed = dataclasses.replace(OFFER, signature=b"other")
    assert protocol.offer_payload(changed) == protocol.offer_payload(OFFER)


def test_chunk_associated_data() -> None:
    base = (b"\x06" * 16, FILE_ID, 3, 10)
    data = protocol.chunk_associated_data(*base)
    assert unpack(data) == ["sfs-chunk-v1", *base]
    variants = [
        (b"\x07" * 16, FILE_ID, 3, 10),
        (b"\x06" * 16, "f" * 32, 3, 10),
        (b"\x06" * 16, FILE_ID, 4, 10),
        (b"\x06" * 16, FILE_ID, 3, 11),
    ]
    assert len({data, *(protocol.chunk_associated_data(*v) for v in variants)}) == 5


def test_payloads_are_domain_separated() -> None:
    labels = {
        unpack(protocol.register_payload("alice", b"\x02" * 32, BUNDLE))[0],
        unpack(protocol.hello_payload(HELLO))[0],
        unpack(protocol.offer_payload(OFFER))[0],
        unpack(protocol.chunk_associated_data(b"\x06" * 16, FILE_ID, 0, 1))[0],
    }
    assert len(labels) == 4


def test_a_signed_hello_verifies_only_unchanged(rsa_key: crypto.RsaPrivateKey) -> None:
    hello = dataclasses.replace(HELLO, signature=b"")
    signature = crypto.sign(rsa_key, protocol.hello_payload(hello))
    crypto.verify(rsa_key.public_key(), signature, protocol.hello_payload(hello), "hello")
    tampered = dataclasses.replace(hello, nonce=b"\x00" * 32)
    with pytest.raises(IntegrityError, match="hello signature"):
        crypto.verify(rsa_key.public_key(), signature, protocol.hello_payload(tampered), "hello")


def test_another_version_is_a_version_mismatch_with_its_request_id() -> None:
    with pytest.raises(protocol.VersionMismatch) as info:
        decode_envelope(frame(v=1, rid=9))
    assert (info.value.version, info.value.rid) == (1, 9)
    assert str(info.value) == "upgrade sfs: this peer speaks version 2, you speak 1"


def test_an_error_of_another_version_still_reads() -> None:
    """The error envelope is frozen: a reply from a server of another version that
    refuses this one is shown, not a decoding failure."""
    reply = protocol.encode_error(ErrorCode.UPGRADE, "upgrade sfs: ...", rid=4, version=1)
    envelope = decode_envelope(reply)
    assert (envelope.op, envelope.rid) == ("error", 4)
    with pytest.raises(RemoteError, match="broker: upgrade sfs"):
        protocol.raise_for_error(envelope, "broker")


@pytest.mark.parametrize("version", [0, -1, 2**16, True, 2.0, "2"])
def test_what_is_not_a_version_is_malformed(version: Any) -> None:
    with pytest.raises(ProtocolError, match="unsupported protocol version") as info:
        decode_envelope(frame(v=version))
    assert not isinstance(info.value, protocol.VersionMismatch)


def test_an_offers_data_hints_and_ticket_are_signed_only_when_present() -> None:
    plain = protocol.Offer(
        b"t" * 16, "0" * 32, b"w", b"r" * 32, b"n" * 32, b"m" * 32, b"h" * 32, b""
    )
    with_data = dataclasses.replace(plain, data=["tcp://127.0.0.1:7001"], data_ticket=b"x" * 32)
    # An offer without a data connection signs what a v1 offer signed.
    assert unpack(protocol.offer_payload(plain))[0] == "sfs-offer-v1"
    assert len(unpack(protocol.offer_payload(plain))) == 8
    payloads = {
        protocol.offer_payload(plain),
        protocol.offer_payload(with_data),
        protocol.offer_payload(dataclasses.replace(with_data, data=["tcp://10.0.0.1:7001"])),
        protocol.offer_payload(dataclasses.replace(with_data, data_ticket=b"y" * 32)),
    }
    assert len(payloads) == 4
    assert from_wire(protocol.Offer, to_wire(with_data)) == with_data
    assert (
        from_wire(protocol.Offer, {k: v for k, v in to_wire(plain).items() if "data" not in k})
        == plain
    )
