"""The holder's requester check: pins first, the broker on first contact, in the
background, so that the serving loop never waits for the network."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from sfs.common.errors import RemoteError, TransportError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import ErrorCode, Refused
from sfs.peer import requesters
from sfs.peer.pins import PinStore
from sfs.peer.requesters import RequesterCheck

T = TypeVar("T")


class FakeBroker:
    """Answers `bundle` from a dict; can fail, or hold every answer until released."""

    def __init__(self, registered: dict[str, KeyBundle]) -> None:
        self.registered = registered
        self.asked: list[str] = []
        self.failure: Exception | None = None
        self.release = threading.Event()
        self.release.set()

    def __enter__(self) -> FakeBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bundle(self, token: str, username: str) -> KeyBundle:
        assert token == "token"
        self.asked.append(username)
        self.release.wait(10)
        if self.failure is not None:
            raise self.failure
        if username not in self.registered:
            raise RemoteError("not_found", f"broker: no such user: {username}")
        return self.registered[username]


class FixedSession:
    """Stands in for `DeviceSession`: every request gets the same token."""

    def call(self, broker: object, request: Callable[[str], T]) -> T:
        return request("token")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pins(tmp_path: Path) -> PinStore:
    return PinStore(tmp_path / "pins.json")


@pytest.fixture
def broker(bundle: KeyBundle) -> FakeBroker:
    return FakeBroker({"bob": bundle})


@pytest.fixture
def check(pins: PinStore, broker: FakeBroker, clock: Clock) -> Iterator[RequesterCheck]:
    session = FixedSession()
    checker = RequesterCheck(pins, lambda: broker, session, clock)  # type: ignore[arg-type,return-value]
    yield checker
    broker.release.set()
    checker.close()


def settle(check: RequesterCheck, username: str, bundle: KeyBundle) -> None:
    """Call until the background lookup has answered (busy until then)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            check(username, bundle)
            return
        except Refused as exc:
            if exc.code != ErrorCode.BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_pinned_user_needs_no_broker(
    check: RequesterCheck, pins: PinStore, broker: FakeBroker, bundle: KeyBundle
) -> None:
    pins.check("bob", bundle)
    check("bob", bundle)
    assert broker.asked == []


def test_pinned_user_with_another_key_is_refused(
    check: RequesterCheck, pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    pins.check("bob", bundle)
    with pytest.raises(Refused) as refused:
        check("bob", other_bundle)
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "pinned" in str(refused.value)


def test_first_contact_is_busy_then_accepted_and_pinned(
    check: RequesterCheck, pins: PinStore, broker: FakeBroker, bundle: KeyBundle
) -> None:
    with pytest.raises(Refused) as first:
        check("bob", bundle)
    assert first.value.code == ErrorCode.BUSY
    settle(check, "bob", bundle)
    pin = pins.get("bob")
    assert pin is not None and pin.fingerprint == bundle.fingerprint()
    assert broker.asked == ["bob"]


def test_unregistered_user_is_refused(check: RequesterCheck, bundle: KeyBundle) -> None:
    with pytest.raises(Refused) as refused:
        settle(check, "mallory", bundle)
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "mallory is not registered" in str(refused.value)


def test_a_key_other_than_the_registered_one_is_refused_and_not_pinned(
    check: RequesterCheck, pins: PinStore, other_bundle: KeyBundle
) -> None:
    with pytest.raises(Refused) as refused:
        settle(check, "bob", other_bundle)
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert pins.get("bob") is None


def test_the_check_never_waits_for_the_broker(
    check: RequesterCheck, broker: FakeBroker, bundle: KeyBundle
) -> None:
    broker.release.clear()  # the broker hangs
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(Refused):
            check("bob", bundle)
    assert time.monotonic() - started < 0.5
    broker.release.set()
    settle(check, "bob", bundle)
    assert broker.asked == ["bob"]  # twenty hellos, one lookup


def test_broker_failure_means_ask_again(
    check: RequesterCheck, broker: FakeBroker, bundle: KeyBundle
) -> None:
    broker.failure = TransportError("no answer from the broker")
    with pytest.raises(Refused):
        check("bob", bundle)
    deadline = time.monotonic() + 5
    while "bob" in check._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    broker.failure = None
    settle(check, "bob", bundle)
    assert broker.asked == ["bob", "bob"]


def test_verdicts_expire(
    check: RequesterCheck, broker: FakeBroker, clock: Clock, bundle: KeyBundle
) -> None:
    with pytest.raises(Refused):
        settle(check, "mallory", bundle)
    clock.now += requesters.VERDICT_TTL + 1
    with pytest.raises(Refused) as again:
        check("mallory", bundle)
    assert again.value.code == ErrorCode.BUSY
    with pytest.raises(Refused):
        settle(check, "mallory", bundle)
    assert broker.asked == ["mallory", "mallory"]


def test_a_full_lookup_queue_says_busy_without_queueing(
    check: RequesterCheck, broker: FakeBroker, bundle: KeyBundle
) -> None:
    broker.release.clear()
    names = [f"user{n}" for n in range(requesters.MAX_PENDING_LOOKUPS + 5)]
    messages = set()
    for name in names:
        with pytest.raises(Refused) as refused:
            check(name, bundle)
        assert refused.value.code == ErrorCode.BUSY
        messages.add(str(refused.value))
    assert "the holder is busy; retry later" in messages
    assert len(check._pending) <= requesters.MAX_PENDING_LOOKUPS + 1


def test_made_up_names_cannot_grow_the_verdicts_without_end(
    check: RequesterCheck, bundle: KeyBundle, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any client may say hello under any name; each costs a lookup, not memory kept."""
    monkeypatch.setattr(requesters, "MAX_VERDICTS", 5)
    for n in range(20):
        with pytest.raises(Refused):
            settle(check, f"made-up-{n}", bundle)
        assert len(check._verdicts) <= 5
    assert list(check._verdicts) == [f"made-up-{n}" for n in range(15, 20)]  # the newest


def test_expired_verdicts_are_dropped(
    check: RequesterCheck, bundle: KeyBundle, clock: Clock
) -> None:
    for name in ("mallory", "trudy"):
        with pytest.raises(Refused):
            settle(check, name, bundle)
    clock.now += requesters.VERDICT_TTL + 1
    settle(check, "bob", bundle)
    assert list(check._verdicts) == ["bob"]
