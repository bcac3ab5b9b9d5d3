"""A peer's hints as the store keeps them (broker/presence_hints.py): written and read
back the same, an old row (one endpoint) read as that endpoint, a damaged word skipped."""

from __future__ import annotations

from sfs.broker.presence_hints import hints_text, parse_hints_text
from sfs.common.protocol import ConnectionHint

RELAY = ConnectionHint("relay", "tcp://relay.example:5602", bytes(range(32)))


def test_hints_round_trip() -> None:
    hints = [
        ConnectionHint("direct", "tcp://[2001:db8::7]:5601"),
        ConnectionHint("direct", "tcp://10.0.0.7:5601"),
        RELAY,
    ]
    text = hints_text("tcp://10.0.0.7:5601", hints)
    assert parse_hints_text(text) == ("tcp://10.0.0.7:5601", hints)


def test_a_row_from_before_hints_is_its_endpoint() -> None:
    assert parse_hints_text("tcp://10.0.0.7:5601") == (
        "tcp://10.0.0.7:5601",
        [ConnectionHint("direct", "tcp://10.0.0.7:5601")],
    )


def test_damaged_words_are_skipped() -> None:
    text = "tcp://a:1 relay+tcp://r:2#not-z85 relay+tcp://[zz::1]:2#" + "0" * 40 + " tcp://[::1"
    endpoint, hints = parse_hints_text(text)
    assert endpoint == "tcp://a:1" and hints == []
