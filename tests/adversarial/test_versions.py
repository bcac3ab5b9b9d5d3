"""A client of another protocol version meets real `sfs-broker` and `sfs-peer serve`
processes: each answers in the client's own envelope version, with code `upgrade` and a
line that says what to do, instead of an error the client could not decode."""

from __future__ import annotations

import pytest

from sfs.common import codec, protocol
from tests.adversarial.test_fuzz import Attacker, Setup, receive

FUTURE = protocol.VERSION + 1


def future_request(op: str, body: dict[str, object], rid: int) -> bytes:
    return codec.pack({"v": FUTURE, "op": op, "rid": rid, "body": body})


@pytest.mark.parametrize("target", ["broker", "holder"])
def test_a_newer_client_is_told_to_upgrade_in_its_own_envelope(
    setup: Setup, attacker: Attacker, target: str
) -> None:
    server = setup.target(target)
    sock = attacker.dealer(server)
    rid = 0 if target == "holder" else 41
    sock.send(future_request("hello" if target == "holder" else "ping", {"x": 1}, rid))
    (reply,) = receive(sock, f"a version {FUTURE} request to the {target}")
    raw = codec.unpack(reply)
    assert (raw["v"], raw["op"], raw["rid"]) == (FUTURE, "error", rid)
    assert raw["body"] == {
        "code": "upgrade",
        "message": f"upgrade sfs: this peer speaks version {protocol.VERSION}, you speak {FUTURE}",
    }
    setup.assert_serving(server)
