"""The login throttle and the bcrypt slots, on a fake clock."""

from __future__ import annotations

import pytest

from sfs.broker import throttle
from sfs.broker.throttle import BcryptSlots, LoginThrottle
from sfs.common.protocol import ErrorCode, Refused


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def locked(gate: LoginThrottle, key: bytes) -> bool:
    try:
        gate.check(key)
    except Refused as exc:
        assert exc.code == ErrorCode.THROTTLED
        return True
    return False


def test_a_key_is_locked_only_after_the_allowed_failures() -> None:
    gate = LoginThrottle(Clock(), allowed=3, lockout=10)
    for _ in range(2):
        gate.failed(b"k")
        assert not locked(gate, b"k")
    gate.failed(b"k")
    assert locked(gate, b"k")
    assert not locked(gate, b"other")


def test_the_lockout_ends_doubles_and_is_capped() -> None:
    clock = Clock()
    gate = LoginThrottle(clock, allowed=1, lockout=10)
    waits = []
    for _ in range(12):
        gate.failed(b"k")
        start = clock.now
        while locked(gate, b"k"):
            clock.now += 1
        waits.append(clock.now - start)
    assert waits[:4] == [10, 20, 40, 80]
    assert max(waits) == throttle.MAX_LOCKOUT


def test_the_message_says_how_long_to_wait() -> None:
    gate = LoginThrottle(Clock(), allowed=1, lockout=10)
    gate.failed(b"k")
    with pytest.raises(Refused, match=r"too many failed logins; try again in 11 s"):
        gate.check(b"k")


def test_old_failures_are_forgotten() -> None:
    clock = Clock()
    gate = LoginThrottle(clock, allowed=2, lockout=10)
    gate.failed(b"k")
    clock.now += throttle.FORGET_AFTER + 1
    gate.failed(b"k")
    assert not locked(gate, b"k")  # two failures, but far apart


def test_success_clears_a_key() -> None:
    gate = LoginThrottle(Clock(), allowed=1, lockout=10)
    gate.failed(b"k")
    gate.succeeded(b"k")
    assert not locked(gate, b"k")


def test_memory_is_bounded_by_forgetting_the_oldest_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle, "MAX_TRACKED", 100)
    gate = LoginThrottle(Clock(), allowed=1, lockout=10)
    for number in range(250):
        gate.failed(number.to_bytes(4, "big"))
    assert len(gate._failures) == 100
    assert not locked(gate, (0).to_bytes(4, "big"))
    assert locked(gate, (249).to_bytes(4, "big"))


def test_bcrypt_slots_refuse_instead_of_queueing() -> None:
    slots = BcryptSlots(2)
    with slots, slots:
        with pytest.raises(Refused, match="busy") as busy, slots:
            pass
        assert busy.value.code == ErrorCode.BUSY
    with slots:  # released again
        pass
