"""sfs.common.entry_page: the fast entry-page decoder gives the generic codec's answer,
the same records or the same refusal, for any decoded page."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfs.common.codec import from_wire
from sfs.common.entry_page import decode_entries, fast_entries
from sfs.common.errors import ProtocolError
from sfs.common.tree import ENTRIES_PER_PAGE, MAX_PATH_BYTES, MAX_TREE_SIZE, Entry, EntryPage

# Values on both sides of every limit, and of every type the unpacker can produce.
PATHS = ["a", "a/b", "é", "..", "", "a\0b", "a" * MAX_PATH_BYTES, "a" * (MAX_PATH_BYTES + 1)]
KINDS = ["file", "folder", "link", "File", "fil", "files", "file\0", "", "a" * 7]
INTS = [-1, 0, 1, 0o777, 0o1000, MAX_TREE_SIZE, MAX_TREE_SIZE + 1, 2**64 - 1]
INTS += [-(2**63), -(2**63) - 1, 2**63 - 1, 2**63]
ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(max_size=4),
)
NEAR = {
    "path": st.one_of(st.sampled_from(PATHS), st.text(max_size=6), ODD),
    "kind": st.one_of(st.sampled_from(KINDS), ODD),
    "size": st.one_of(st.sampled_from(INTS), ODD),
    "mode": st.one_of(st.sampled_from(INTS), ODD),
    "mtime_ns": st.one_of(st.sampled_from(INTS), ODD),
    "target": st.one_of(st.sampled_from(PATHS), ODD),
}


@st.composite
def entry_maps(draw: st.DrawFn) -> Any:
    """A valid entry map, often bent: a field changed, dropped or added, or no map."""
    fields: dict[Any, Any] = {
        "path": draw(st.one_of(st.sampled_from(PATHS[:4]), st.text(max_size=6))),
        "kind": draw(st.sampled_from(KINDS[:3])),
        "size": draw(st.sampled_from([0, 4096, MAX_TREE_SIZE])),
        "mode": draw(st.sampled_from([0, 0o644, 0o777])),
        "mtime_ns": draw(st.sampled_from([-(2**63), 0, 2**63 - 1])),
    }
    if draw(st.booleans()):
        fields["target"] = draw(st.sampled_from([None, "b", "../x"]))
    action = draw(st.sampled_from(["none", "change", "change", "drop", "add", "no map"]))
    if action == "change":
        field = draw(st.sampled_from(sorted(NEAR)))
        fields[field] = draw(NEAR[field])
    elif action == "drop":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif action == "add":
        fields[draw(st.sampled_from(["x", "Path", "", b"path", b"x"]))] = 1
    elif action == "no map":
        return draw(ODD)
    return fields


@st.composite
def pages(draw: st.DrawFn) -> Any:
    entries = draw(st.lists(entry_maps(), max_size=3))
    shape = draw(st.sampled_from(["page"] * 12 + ["too many", "extra key", "no list", "odd"]))
    if shape == "too many":
        return {
            "entries": [{"path": "a", "kind": "file", "size": 0, "mode": 0, "mtime_ns": 0}]
            * (ENTRIES_PER_PAGE + 1)
        }
    if shape == "extra key":
        return {"entries": entries, "x": 1}
    if shape == "no list":
        return {"entries": {}}
    if shape == "odd":
        return draw(ODD)
    return {"entries": entries}


def generic(page: Any) -> list[Entry] | str:
    try:
        return from_wire(EntryPage, page, "entry page 3").entries
    except ProtocolError as exc:
        return f"refused: {exc}"


def fast(page: Any) -> list[Entry] | str:
    try:
        return decode_entries(page, "entry page 3")
    except ProtocolError as exc:
        return f"refused: {exc}"


@settings(max_examples=150, deadline=None)
@given(pages())
def test_the_fast_decoder_answers_as_the_generic_codec(page: Any) -> None:
    assert fast(page) == generic(page)


ODD_VALUES = [None, True, False, 1.5, b"path", [1], {"a": 1}, "", "x"]
VALID = {"path": "a/b", "kind": "file", "size": 1, "mode": 0o644, "mtime_ns": 5}


@pytest.mark.parametrize(
    "field, value",
    [(field, value) for field in NEAR for value in [*PATHS, *KINDS, *INTS, *ODD_VALUES]],
)
def test_every_edge_of_every_field_answers_as_the_generic_codec(field: str, value: Any) -> None:
    page = {"entries": [VALID, {**VALID, field: value}]}
    assert fast(page) == generic(page)


@pytest.mark.parametrize("key", [*NEAR, "x", b"path"])
def test_a_missing_or_unknown_key_answers_as_the_generic_codec(key: Any) -> None:
    dropped = {name: value for name, value in VALID.items() if name != key}
    added = {**VALID, key: 1}
    for page in ({"entries": [VALID, dropped]}, {"entries": [added]}):
        assert fast(page) == generic(page)


def test_valid_pages_take_the_fast_path() -> None:
    page = {
        "entries": [
            {"path": "a", "kind": "folder", "size": 0, "mode": 0o755, "mtime_ns": 1},
            {"path": "a/b", "kind": "file", "size": 9, "mode": 0o644, "mtime_ns": -1},
            {"path": "a/c", "kind": "link", "size": 0, "mode": 0o777, "mtime_ns": 2, "target": "b"},
            {"path": "d", "kind": "file", "size": 1, "mode": 0, "mtime_ns": 3, "target": None},
        ]
    }
    assert fast_entries(page) == from_wire(EntryPage, page).entries


def test_a_doubtful_page_is_left_to_the_generic_codec() -> None:
    entry = {"path": "a", "kind": "file", "size": True, "mode": 0, "mtime_ns": 0}
    assert fast_entries({"entries": [entry]}) is None
    assert fast({"entries": [entry]}) == "refused: size: expected int"
