"""sfs.peer.file_ids: what a user may type for a file id, and picking the one it names."""

from __future__ import annotations

import pytest

from sfs.common.errors import SfsError, UsageError
from sfs.peer.file_ids import Candidate, Typed, parse, pick

WHOLE = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("text", "typed"),
    [
        (WHOLE, Typed(WHOLE)),
        (f"  {WHOLE.upper()}\n", Typed(WHOLE)),
        ("01234567", Typed("01234567")),
        (WHOLE[:31], Typed(WHOLE[:31])),
    ],
)
def test_parse_takes_a_whole_id_or_a_prefix_of_eight_or_more(text: str, typed: Typed) -> None:
    assert parse(text) == typed
    assert parse(text).whole == (len(typed.text) == 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0123456", "file id 0123456 is too short: ids are 32 hex characters; give at least 8"),
        ("a", "file id a is too short"),
        ("", "not a file id: ''"),
        (WHOLE + "0", "not a file id:"),
        ("0123456g", "not a file id: '0123456g'"),
        ("01234567%", "not a file id:"),
        ("../../etc/passwd", "not a file id: '../../etc/passwd'"),
        ("0123 4567", "not a file id:"),
    ],
)
def test_parse_refuses_the_rest_as_bad_input(text: str, message: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse(text)
    assert str(refused.value).startswith(message)


def candidate(file_id: str, name: str = "a.txt", owner: str = "alice") -> Candidate:
    return Candidate(file_id, name, owner)


def test_pick_the_one_that_starts_with_the_prefix() -> None:
    other = "01234568" + "0" * 24
    assert pick("01234567", [candidate(WHOLE), candidate(other)]) == WHOLE
    assert pick(WHOLE, [candidate(WHOLE)]) == WHOLE


def test_pick_none_is_not_shared_with_you() -> None:
    with pytest.raises(SfsError) as refused:
        pick("01234567", [candidate("01234568" + "0" * 24)])
    assert str(refused.value) == "no file id starting with 01234567 is shared with you"
    assert refused.value.exit_code == 1


def test_pick_several_lists_each_by_its_short_id_name_and_owner() -> None:
    twin = WHOLE[:12] + "f" * 20
    with pytest.raises(UsageError) as refused:
        pick("01234567", [candidate(twin, "b.txt", "bob"), candidate(WHOLE)])
    assert str(refused.value) == (
        "file id 01234567 is ambiguous: 2 files start with it; give more of the id:"
        f" {WHOLE[:13]} a.txt (alice), {twin[:13]} b.txt (bob)"
    )
    with pytest.raises(UsageError, match="ambiguous: 2 or more files start"):
        pick("01234567", [candidate(twin), candidate(WHOLE)], more=True)
