"""sfs.common.codec: msgpack framing and record validation.

Every way a frame or a decoded value can be wrong must surface as `ProtocolError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfs.common import codec, protocol
from sfs.common.codec import MaxLen, Pattern, Range, Record, Size, from_wire, pack, to_wire, unpack
from sfs.common.errors import ProtocolError

# --- records used only by these tests -------------------------------------------------


@dataclass(frozen=True)
class Inner(Record):
    tag: Annotated[bytes, Size(4)]
    count: Annotated[int, Range(0, 10)]


@dataclass(frozen=True)
class Sample(Record):
    name: Annotated[str, MaxLen(8)]
    blob: Annotated[bytes, MaxLen(16)]
    number: int
    flag: bool
    code: Annotated[str, MaxLen(3), Pattern(r"[a-z]{3}")]
    inner: Inner
    items: Annotated[list[Annotated[str, MaxLen(3)]], MaxLen(3)]
    maybe: Annotated[int, Range(1, 5)] | None
    children: Annotated[list[Inner], MaxLen(4)] = dataclasses.field(default_factory=list)
    note: Annotated[str, MaxLen(64)] = "default"


@dataclass(frozen=True)
class WithFloat(Record):
    value: float


def sample(**changes: Any) -> Sample:
    base = Sample(
        name="alice",
        blob=b"\x00\x01",
        number=-5,
        flag=True,
        code="abc",
        inner=Inner(b"TAG!", 3),
        items=["x", "yz"],
        maybe=None,
        children=[Inner(b"\x00" * 4, 0), Inner(b"\xff" * 4, 10)],
        note="hi",
    )
    return dataclasses.replace(base, **changes)


def wire(**changes: Any) -> dict[str, Any]:
    """The wire map of the default sample with some keys replaced (or removed via ...)."""
    out = to_wire(sample())
    for key, value in changes.items():
        if value is ...:
            del out[key]
        else:
            out[key] = value
    return out


# --- round trips ------------------------------------------------------------------------


def test_to_wire_makes_plain_nested_maps() -> None:
    assert to_wire(sample()) == {
        "name": "alice",
        "blob": b"\x00\x01",
        "number": -5,
        "flag": True,
        "code": "abc",
        "inner": {"tag": b"TAG!", "count": 3},
        "items": ["x", "yz"],
        "maybe": None,
        "children": [{"tag": b"\x00" * 4, "count": 0}, {"tag": b"\xff" * 4, "count": 10}],
        "note": "hi",
    }


@pytest.mark.parametrize(
    "record",
    [
        sample(),
        sample(maybe=1),
        sample(maybe=5),
        sample(children=[], items=[]),
        sample(name="", blob=b"", number=2**63 - 1),
        sample(number=-(2**63), flag=False),
    ],
)
def test_record_round_trip_through_msgpack(record: Sample) -> None:
    decoded = from_wire(Sample, unpack(pack(to_wire(record))))
    assert decoded == record
    assert isinstance(decoded.inner, Inner)
    assert all(isinstance(child, Inner) for child in decoded.children)


def test_fields_with_defaults_may_be_absent() -> None:
    decoded = from_wire(Sample, wire(children=..., note=...))
    assert decoded.children == []
    assert decoded.note == "default"


def test_optional_field_accepts_none_and_a_valid_value() -> None:
    assert from_wire(Sample, wire(maybe=None)).maybe is None
    assert from_wire(Sample, wire(maybe=4)).maybe == 4


def test_optional_field_is_still_required_without_a_default() -> None:
    with pytest.raises(ProtocolError, match="missing field 'maybe'"):
        from_wire(Sample, wire(maybe=...))


@pytest.mark.parametrize("bad", [0, 6, "3", True, b"\x03", 3.0, []])
def test_optional_field_checks_the_inner_type_and_limits(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="maybe"):
        from_wire(Sample, wire(maybe=bad))


# --- structure: missing, unknown, not a map --------------------------------------------------


@pytest.mark.parametrize("field", ["name", "blob", "number", "flag", "code", "inner", "items"])
def test_missing_required_field(field: str) -> None:
    with pytest.raises(ProtocolError, match=f"missing field '{field}'"):
        from_wire(Sample, wire(**{field: ...}))


def test_unknown_field_is_refused() -> None:
    value = wire()
    value["extra"] = 1
    with pytest.raises(ProtocolError, match="unexpected field 'extra'"):
        from_wire(Sample, value)


def test_unknown_bytes_key_is_refused() -> None:
    value: dict[Any, Any] = wire()
    value[b"name"] = "bob"  # bytes, not the str key "name"
    with pytest.raises(ProtocolError, match="unexpected field"):
        from_wire(Sample, value)


def test_unknown_str_and_bytes_keys_together_are_a_protocol_error() -> None:
    # Regression: sorting {"x", b"y"} to name the first unknown key raised TypeError.
    value: dict[Any, Any] = wire()
    value["x"] = 1
    value[b"y"] = 2
    with pytest.raises(ProtocolError, match="unexpected field 'x'"):
        from_wire(Sample, value)


@pytest.mark.parametrize("value", [None, [], ["name"], "name", b"name", 1, True, 1.5])
def test_non_map_is_refused(value: Any) -> None:
    with pytest.raises(ProtocolError, match="expected a map"):
        from_wire(Sample, value)


def test_empty_map_is_missing_fields() -> None:
    with pytest.raises(ProtocolError, match="missing field"):
        from_wire(Sample, {})


def test_record_without_fields_accepts_only_the_empty_map() -> None:
    assert from_wire(protocol.Ping, {}) == protocol.Ping()
    with pytest.raises(ProtocolError, match="unexpected field 'a'"):
        from_wire(protocol.Ping, {"a": 1})


# --- wrong types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("number", True),  # bool is not int
        ("number", False),
        ("number", "1"),
        ("number", 1.0),
        ("number", None),
        ("number", b"\x01"),
        ("flag", 1),  # int is not bool
        ("flag", 0),
        ("flag", "true"),
        ("flag", None),
        ("name", b"alice"),  # bytes is not str
        ("name", 1),  # int is not str
        ("name", None),
        ("name", ["alice"]),
        ("blob", "abc"),  # str is not bytes
        ("blob", 5),
        ("blob", [1, 2]),
        ("code", None),
        ("code", b"abc"),
        ("items", "xyz"),  # a str is not a list
        ("items", {"x": 1}),
        ("items", None),
        ("items", [1]),
        ("items", [b"x"]),
        ("items", ["x", None]),
        ("inner", None),
        ("inner", [b"TAG!", 3]),
        ("inner", "inner"),
        ("children", [None]),
        ("children", {"tag": b"TAG!", "count": 3}),
        ("note", None),
    ],
)
def test_wrong_type_is_refused(field: str, bad: Any) -> None:
    with pytest.raises(ProtocolError, match=field):
        from_wire(Sample, wire(**{field: bad}))


def test_unsupported_annotation_is_a_programming_error_not_bad_input() -> None:
    with pytest.raises(TypeError, match="unsupported wire annotation"):
        from_wire(WithFloat, {"value": 1.5})


# --- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "good"),
    [
        ("name", "12345678"),  # MaxLen(8), exactly
        ("name", "é" * 8),  # MaxLen counts characters for str
        ("blob", b"\xff" * 16),  # MaxLen(16), exactly
        ("code", "zzz"),
        ("items", ["abc", "", "xyz"]),  # MaxLen(3) items of MaxLen(3)
    ],
)
def test_values_at_the_limit_are_accepted(field: str, good: Any) -> None:
    assert getattr(from_wire(Sample, wire(**{field: good})), field) == good


@pytest.mark.parametrize(
    ("field", "bad", "why"),
    [
        ("name", "123456789", "longer than 8"),
        ("blob", b"\x00" * 17, "longer than 16"),
        ("items", ["a", "b", "c", "d"], "longer than 3"),
        ("items", ["abcd"], "longer than 3"),
        ("code", "abcd", "longer than 3"),  # sizes are checked before patterns
        ("code", "ab", "not a valid value"),
        ("code", "ABC", "not a valid value"),
        ("code", "", "not a valid value"),
        ("code", "ab\n", "not a valid value"),  # the whole value must match
        ("code", " ab", "not a valid value"),
    ],
)
def test_values_over_the_limit_are_refused(field: str, bad: Any, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        from_wire(Sample, wire(**{field: bad}))


@pytest.mark.parametrize("count", [0, 10])
def test_range_bounds_are_inclusive(count: int) -> None:
    decoded = from_wire(Sample, wire(inner={"tag": b"TAG!", "count": count}))
    assert decoded.inner.count == count


@pytest.mark.parametrize(
    "inner",
    [
        {"tag": b"TAG!", "count": -1},  # Range(0, 10)
        {"tag": b"TAG!", "count": 11},
        {"tag": b"TAG", "count": 1},  # Size(4)
        {"tag": b"TAG!!", "count": 1},
        {"tag": b"", "count": 1},
        {"tag": "TAG!", "count": 1},  # str is not bytes
        {"tag": b"TAG!"},  # missing field in the nested record
        {"tag": b"TAG!", "count": 1, "more": 0},  # unknown field in the nested record
    ],
)
def test_nested_record_is_validated(inner: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        from_wire(Sample, wire(inner=inner))


def test_records_in_a_list_are_validated() -> None:
    good = {"tag": b"TAG!", "count": 1}
    assert len(from_wire(Sample, wire(children=[good, good])).children) == 2
    with pytest.raises(ProtocolError, match="out of range"):
        from_wire(Sample, wire(children=[good, {"tag": b"TAG!", "count": 99}]))


# --- unpack -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -1,
        2**64 - 1,
        -(2**63),
        "",
        "héllo",
        b"",
        b"\x00\xff",
        [],
        [1, [2, [3]]],
        {},
        {"a": {"b": [b"c", None]}},
    ],
)
def test_pack_unpack_round_trip(value: Any) -> None:
    assert unpack(pack(value)) == value


def test_bytes_and_str_stay_distinct() -> None:
    assert type(unpack(pack(b"x"))) is bytes
    assert type(unpack(pack("x"))) is str


DEEP_NESTING = b"\x91" * 100_000 + b"\xc0"


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\xff\xfe\xfd garbage", id="garbage"),
        pytest.param(pack({"a": "hello"})[:-1], id="truncated-str"),
        pytest.param(b"\x82\xa1a\x01", id="truncated-map"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-length-beyond-frame"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8"),
        pytest.param(b"\xa3\xed\xa0\x80", id="utf8-surrogate"),
        pytest.param(b"\xd4\x05\x00", id="fixext1"),
        pytest.param(b"\xc7\x03\x07abc", id="ext8"),
        pytest.param(b"\xd4\xff\x00", id="malformed-timestamp-ext"),
        pytest.param(pack(1) + b"\x01", id="trailing-data"),
        pytest.param(pack({"a": 1}) + pack({"b": 2}), id="two-documents"),
        pytest.param(DEEP_NESTING, id="deep-nesting"),
        pytest.param(b"\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\x81\x90\x02", id="list-map-key"),
        pytest.param(b"\x81\xc0\x02", id="nil-map-key"),
    ],
)
def test_unpack_turns_bad_frames_into_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed frame") as info:
        unpack(frame)
    assert info.value.__cause__ is not None  # the msgpack error is kept for debugging


def test_unpack_bounds_container_sizes() -> None:
    limit = codec.MAX_CONTAINER_ITEMS
    assert len(unpack(pack([0] * limit))) == limit
    with pytest.raises(ProtocolError):
        unpack(pack([0] * (limit + 1)))
    with pytest.raises(ProtocolError):
        unpack(pack({str(i): 0 for i in range(limit + 1)}))


def test_msgpack_timestamp_passes_unpack_but_never_validates() -> None:
    # ext type -1 is decoded by msgpack itself (ext_hook is not called for it);
    # from_wire is the gate that keeps it out of records.
    frame = pack({"number": msgpack.Timestamp(1, 0)})
    with pytest.raises(ProtocolError, match="number: expected int"):
        from_wire(Sample, wire(number=unpack(frame)["number"]))
    with pytest.raises(ProtocolError, match="name: expected str"):
        from_wire(Sample, wire(name=msgpack.Timestamp(1, 0)))


def test_floats_decode_but_never_validate() -> None:
    assert unpack(pack(1.5)) == 1.5
    with pytest.raises(ProtocolError, match="number: expected int"):
        from_wire(Sample, wire(number=unpack(pack(2.0))))


# --- fuzzing: the broker's decode path only ever raises ProtocolError ------------------------


def _decode_broker_request(frame: bytes) -> Record:
    envelope = protocol.decode_envelope(frame)
    record = protocol.decode_body(envelope, protocol.BROKER_REQUESTS)
    assert isinstance(record, protocol.BROKER_REQUESTS[envelope.op])
    return record


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_error(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _decode_broker_request(frame)


# Valid requests to mutate: every byte of a real frame is a place a parser can go wrong.
_VALID_FRAMES = [
    protocol.encode("ping", protocol.Ping(), rid=1),
    protocol.encode("login", protocol.Login("alice", "hunter22"), rid=2),
    protocol.encode("search", protocol.Search("t" * 43, "report", "bob", 50), rid=3),
    protocol.encode(
        "publish",
        protocol.Publish("t" * 43, b"manifest", b"s" * 384, ["bob", "carol"], b"g" * 384),
        rid=4,
    ),
    protocol.encode(
        "register",
        protocol.Register(
            "alice",
            "pw",
            protocol.KeyBundle(b"\x30" * 400, b"\x01" * 32),
            b"\x02" * 32,
            b"\x03" * 384,
        ),
        rid=5,
    ),
]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(_VALID_FRAMES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 10_000),
)
def test_mutated_valid_frames_only_raise_protocol_error(
    frame: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(frame)
    for position, byte in edits:
        data[position % len(data)] = byte
    data = data[: max(1, len(data) - cut % 8)]
    with contextlib.suppress(ProtocolError):
        _decode_broker_request(bytes(data))


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from(["alice", "0" * 32, "tcp://host:1", "t" * 43])
    | st.sampled_from([b"\x00" * 16, b"\x00" * 32])
)
_keys = st.text(max_size=8) | st.binary(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Envelopes that mostly get past the envelope checks, with bodies that name the
    operation's fields (some missing) plus a few unknown str or bytes keys."""
    op = draw(st.sampled_from([*protocol.BROKER_REQUESTS, "hello", "error", ""]))
    fields = [f.name for f in dataclasses.fields(protocol.BROKER_REQUESTS.get(op, protocol.Ping))]
    body: dict[Any, Any] = {}
    for name in fields:
        if draw(st.integers(0, 9)):  # usually present
            body[name] = draw(_values)
    body.update(draw(st.dictionaries(_keys, _values, max_size=3)))
    return {
        "v": draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2, True, 1.0, "1", None])),
        "op": op,
        "rid": draw(st.sampled_from([0, 0, 0, 1, 2**63 - 1, 2**63, -1, True, None])),
        "body": body,
    }


@settings(max_examples=400, deadline=None)
@given(_envelopes())
def test_structured_envelopes_only_raise_protocol_error(envelope: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        _decode_broker_request(pack(envelope))


# --- bounded work: sizes before patterns, every field bounded, no NUL ----------------------


def all_records() -> list[type[Record]]:
    """Every record type of the package, found by importing all its modules."""
    import importlib
    import pkgutil

    for package in ("sfs.common", "sfs.broker", "sfs.peer"):
        path = importlib.import_module(package).__path__
        for module in pkgutil.walk_packages(path, f"{package}."):
            if not module.name.endswith(".__main__"):  # that one runs the CLI
                importlib.import_module(module.name)
    found: list[type[Record]] = []
    pending = list(Record.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("sfs."):
            found.append(cls)
    return found


def test_every_wire_record_bounds_every_text_bytes_and_list_field() -> None:
    records = all_records()
    assert {"Heartbeat", "Manifest", "KeyBundle", "Hello"} <= {cls.__name__ for cls in records}
    for cls in records:
        codec.wire_fields(cls)  # raises TypeError for a field without MaxLen or Size


def test_a_record_with_an_unbounded_field_is_refused_when_used() -> None:
    @dataclass(frozen=True)
    class Unbounded(Record):
        text: Annotated[str, Pattern(r"a+")]

    with pytest.raises(TypeError, match=r"Unbounded\.text: .* needs a MaxLen or Size"):
        from_wire(Unbounded, {"text": "aaa"})


def test_a_pattern_never_runs_over_more_than_the_size_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = Pattern.matches

    def matches(self: Pattern, text: str) -> bool:
        seen.append(len(text))
        return real(self, text)

    monkeypatch.setattr(Pattern, "matches", matches)
    endpoint = "tcp://" + "a." * 500_000
    with pytest.raises(ProtocolError, match="endpoint: longer than 300"):
        from_wire(protocol.Heartbeat, {"token": "t", "endpoint": endpoint})
    assert seen == []
    from_wire(protocol.Heartbeat, {"token": "t", "endpoint": "tcp://host:1"})
    assert seen == [len("tcp://host:1")]


@pytest.mark.parametrize("text", ["\0", "a\0", "\0b", "al\0ce"])
def test_nul_is_refused_in_any_text(text: str) -> None:
    with pytest.raises(ProtocolError, match="name: contains a NUL character"):
        from_wire(Sample, wire(name=text))
    with pytest.raises(ProtocolError, match=r"items\[0\]: contains a NUL character"):
        from_wire(Sample, wire(items=[text[:3]]))
