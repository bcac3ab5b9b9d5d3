"""A peer's connection hints as the store keeps them: in the presence row's `endpoint`
text, so that both stores hold them without a schema change.

The text is the heartbeat's endpoint, then one word per further hint: a direct endpoint
as it is, a relay as `relay+tcp://HOST:PORT#<z85 key>`. A row written before hints (one
endpoint) reads as that endpoint alone. Only what the codec already checked is written,
and what is read back is checked again (`valid_endpoint`): a damaged row is skipped.
"""

from __future__ import annotations

import zmq.utils.z85

from sfs.common.protocol import ConnectionHint, valid_endpoint

_RELAY = "relay+"


def hints_text(endpoint: str, hints: list[ConnectionHint]) -> str:
    words = [endpoint]
    for hint in hints:
        if hint.kind == "relay" and hint.relay_key is not None:
            words.append(f"{_RELAY}{hint.endpoint}#{zmq.utils.z85.encode(hint.relay_key).decode()}")
        elif hint.kind == "direct":
            words.append(hint.endpoint)
    return " ".join(words)


def parse_hints_text(text: str) -> tuple[str, list[ConnectionHint]]:
    """(the heartbeat's endpoint, every hint) from a presence row."""
    first, *rest = text.split(" ")
    hints: list[ConnectionHint] = []
    for word in rest or [first]:
        if word.startswith(_RELAY):
            endpoint, _, key = word[len(_RELAY) :].partition("#")
            try:
                raw = zmq.utils.z85.decode(key.encode("ascii"))
            except (ValueError, KeyError, UnicodeError):
                continue
            if valid_endpoint(endpoint) and len(raw) == 32:
                hints.append(ConnectionHint("relay", endpoint, raw))
        elif valid_endpoint(word):
            hints.append(ConnectionHint("direct", word))
    return first, hints
