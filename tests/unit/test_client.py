"""The broker client's retry of `busy` answers (the socket side is covered by integration)."""

from __future__ import annotations

from typing import Any

import pytest

from sfs.common import protocol
from sfs.common.errors import ProtocolError, RemoteError
from sfs.peer import client as client_module
from sfs.peer.client import BrokerClient, BrokerVersionMismatch


def scripted_client(monkeypatch: pytest.MonkeyPatch, answers: list[Any]) -> list[float]:
    """A client whose sends get `answers` in turn; returns the list of sleeps taken."""
    sleeps: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)

    def call_once(self: BrokerClient, *args: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(BrokerClient, "_call_once", call_once)
    return sleeps


def busy() -> RemoteError:
    return RemoteError("busy", "broker: the broker is busy with other logins; retry shortly")


def test_busy_answers_are_retried_until_one_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = protocol.PingResult(1, 0)
    sleeps = scripted_client(monkeypatch, [busy(), busy(), ok])
    with BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client:
        assert client.ping() == ok
    assert sleeps == list(client_module.BUSY_RETRY_DELAYS[:2])


def test_a_broker_that_stays_busy_gives_the_busy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    tries = len(client_module.BUSY_RETRY_DELAYS) + 1
    scripted_client(monkeypatch, [busy() for _ in range(tries)])
    with (
        BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client,
        pytest.raises(RemoteError, match="busy"),
    ):
        client.ping()


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = scripted_client(monkeypatch, [RemoteError("unauthorized", "broker: no"), None])
    with (
        BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client,
        pytest.raises(RemoteError, match="no"),
    ):
        client.ping()
    assert sleeps == []


def test_resolve_refuses_ids_that_do_not_start_with_the_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fits = protocol.IdMatch("abcdef01" + "0" * 24, "a.txt", "alice")
    other = protocol.IdMatch("abcdef02" + "0" * 24, "b.txt", "bob")
    scripted_client(
        monkeypatch, [protocol.ResolveResult([fits]), protocol.ResolveResult([fits, other])]
    )
    with BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client:
        assert client.resolve("token", "abcdef01") == [fits]
        with pytest.raises(ProtocolError, match="do not start with it"):
            client.resolve("token", "abcdef01")


# --- the broker's protocol version, checked before register, login and serve ----------


def test_a_broker_of_this_version_passes_the_check_asked_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_client(monkeypatch, [protocol.PingResult(protocol.VERSION, 0)])
    with BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client:
        client.check_version()
        client.check_version()  # no second ping (the script has no second answer)


@pytest.mark.parametrize(
    "answer",
    [
        protocol.PingResult(protocol.VERSION + 1, 0),  # it answers ping in any version
        protocol.VersionMismatch(protocol.VERSION + 1, 1),  # its reply in its own envelope
        RemoteError(  # it read the ping as another version's request
            "upgrade",
            f"broker: upgrade sfs: this peer speaks version {protocol.VERSION + 1},"
            f" you speak {protocol.VERSION}",
        ),
    ],
    ids=["ping-result", "reply-envelope", "upgrade-error"],
)
def test_a_broker_of_another_version_is_refused_with_the_upgrade_line(
    monkeypatch: pytest.MonkeyPatch, answer: Any
) -> None:
    scripted_client(monkeypatch, [answer])
    with (
        BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client,
        pytest.raises(BrokerVersionMismatch) as caught,
    ):
        client.check_version()
    message = str(caught.value)
    assert message.startswith("upgrade sfs: the broker at tcp://127.0.0.1:1 speaks")
    assert f"this peer speaks {protocol.VERSION}" in message
    assert "\n" not in message


def test_other_ping_errors_are_not_taken_for_another_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_client(monkeypatch, [RemoteError("internal", "broker: oops")])
    with (
        BrokerClient("tcp://127.0.0.1:1", b"0" * 40) as client,
        pytest.raises(RemoteError, match="oops"),
    ):
        client.check_version()
