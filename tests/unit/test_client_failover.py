"""The broker client's failover without sockets: which requests go to the next broker
after one did not answer, and the device login that starts over instead."""

from __future__ import annotations

from typing import Any

import pytest

from sfs.common import protocol
from sfs.common.errors import TransportError
from sfs.peer import client as client_module
from sfs.peer.client import BrokerClient, BrokerUnreachable
from sfs.peer.session import DeviceSession

BROKERS = ["tcp://b0:1", "tcp://b1:1", "tcp://b2:1"]


def scripted(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[Any]]) -> list[str]:
    """Each broker answers in turn from its list (an exception is raised); returns the
    brokers asked, in order. A broker that does not answer is left, as `_call_once`
    does."""
    asked: list[str] = []
    monkeypatch.setattr(client_module.random, "randrange", lambda n: 0)

    def call_once(self: BrokerClient, op: str, request: Any, result_type: Any) -> Any:
        asked.append(self.endpoint)
        answer = answers[self.endpoint].pop(0)
        if isinstance(answer, BrokerUnreachable):
            self._fail_over()
            raise answer
        return answer

    monkeypatch.setattr(BrokerClient, "_call_once", call_once)
    return asked


def gone() -> BrokerUnreachable:
    return BrokerUnreachable("no answer from the broker")


def test_a_request_goes_to_the_next_broker_and_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = protocol.PingResult(1, 0)
    asked = scripted(
        monkeypatch, {BROKERS[0]: [gone()], BROKERS[1]: [gone()], BROKERS[2]: [ok, ok]}
    )
    with BrokerClient(BROKERS, b"0" * 40) as client:
        assert client.ping() == ok
        assert client.ping() == ok
    assert asked == [BROKERS[0], BROKERS[1], BROKERS[2], BROKERS[2]]


def test_each_broker_is_asked_once_then_the_error_names_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = scripted(monkeypatch, {b: [gone()] for b in BROKERS})
    with (
        BrokerClient(BROKERS, b"0" * 40) as client,
        pytest.raises(TransportError, match="any of the brokers") as failed,
    ):
        client.ping()
    assert asked == BROKERS
    assert all(broker in str(failed.value) for broker in BROKERS)


@pytest.mark.parametrize("op", sorted(client_module.NOT_REPEATED))
def test_challenge_redeeming_requests_are_not_sent_again(
    monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    asked = scripted(monkeypatch, {BROKERS[0]: [gone()], BROKERS[1]: []})
    with BrokerClient(BROKERS, b"0" * 40) as client, pytest.raises(BrokerUnreachable):
        client.call(op, protocol.Ping(), protocol.Empty)
    assert asked == [BROKERS[0]]
    assert client.endpoint == BROKERS[1]  # the next request goes there


def test_one_broker_gives_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, {BROKERS[0]: [gone()]})
    with BrokerClient(BROKERS[0], b"0" * 40) as client, pytest.raises(BrokerUnreachable) as e:
        client.ping()
    assert str(e.value) == "no answer from the broker"


class FakeIdentity:
    username = "alice"
    bundle = None

    def sign(self, data: bytes) -> bytes:
        return b"signature"


def test_a_device_login_without_answer_starts_over_with_a_fresh_challenge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "device_login_payload", lambda *args: b"payload")
    challenges = [b"c" * 32, b"d" * 32]
    session = protocol.SessionResult("alice", "t" * 43, 100)
    asked = scripted(
        monkeypatch,
        {
            BROKERS[0]: [protocol.ChallengeResult(challenges[0]), gone()],
            BROKERS[1]: [protocol.ChallengeResult(challenges[1]), session],
        },
    )
    device = DeviceSession(FakeIdentity())  # type: ignore[arg-type]
    with BrokerClient(BROKERS, b"0" * 40) as client:
        assert device.call(client, lambda token: token) == session.token
    assert asked == [BROKERS[0], BROKERS[0], BROKERS[1], BROKERS[1]]
