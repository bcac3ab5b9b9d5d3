"""The broker's limits on a fake clock: the login throttle, registrations per key and
address, the challenge table, and the bcrypt slots. Tests that take `state` run against
each `LimitState`: in memory, and in PostgreSQL (a throwaway cluster)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sfs.broker import throttle
from sfs.broker.postgres_store import PostgresStore
from sfs.broker.throttle import (
    BcryptSlots,
    Challenges,
    LimitState,
    LoginThrottle,
    MemoryLimits,
    RegistrationLimit,
    address_group,
)
from sfs.common.protocol import ErrorCode, Refused
from tests.postgres import Cluster


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "postgres"])
def state(request: pytest.FixtureRequest) -> Iterator[LimitState]:
    if request.param == "memory":
        yield MemoryLimits()
        return
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    with cluster.database() as url:
        store = PostgresStore(url, pool_size=1)
        try:
            yield store.limit_state()
        finally:
            store.close()


def throttle_on(
    clock: Clock, allowed: int, lockout: int, state: LimitState | None = None
) -> LoginThrottle:
    return LoginThrottle(state or MemoryLimits(), clock, allowed, lockout)


def locked(gate: LoginThrottle, key: str) -> bool:
    try:
        gate.check(key)
    except Refused as exc:
        assert exc.code == ErrorCode.THROTTLED
        return True
    return False


def test_a_key_is_locked_only_after_the_allowed_failures(state: LimitState) -> None:
    gate = throttle_on(Clock(), allowed=3, lockout=10, state=state)
    for _ in range(2):
        gate.failed("k")
        assert not locked(gate, "k")
    gate.failed("k")
    assert locked(gate, "k")
    assert not locked(gate, "other")


def test_the_lockout_ends_doubles_and_is_capped() -> None:
    clock = Clock()
    gate = throttle_on(clock, allowed=1, lockout=10)
    waits = []
    for _ in range(12):
        gate.failed("k")
        start = clock.now
        while locked(gate, "k"):
            clock.now += 1
        waits.append(clock.now - start)
    assert waits[:4] == [10, 20, 40, 80]
    assert max(waits) == throttle.MAX_LOCKOUT


def test_the_message_says_how_long_to_wait(state: LimitState) -> None:
    gate = throttle_on(Clock(), allowed=1, lockout=10, state=state)
    gate.failed("k")
    with pytest.raises(Refused, match=r"too many failed logins; try again in 11 s"):
        gate.check("k")


def test_old_failures_are_forgotten(state: LimitState) -> None:
    clock = Clock()
    gate = throttle_on(clock, allowed=2, lockout=10, state=state)
    gate.failed("k")
    clock.now += throttle.FORGET_AFTER + 1
    gate.failed("k")
    assert not locked(gate, "k")  # two failures, but far apart


def test_success_clears_a_key(state: LimitState) -> None:
    gate = throttle_on(Clock(), allowed=1, lockout=10, state=state)
    gate.failed("k")
    gate.succeeded("k")
    assert not locked(gate, "k")


def test_memory_is_bounded_by_forgetting_the_oldest_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle, "MAX_TRACKED", 100)
    state = MemoryLimits()
    gate = LoginThrottle(state, Clock(), allowed=1, lockout=10)
    for number in range(250):
        gate.failed(str(number))
    assert len(state._tallies) == 100
    assert not locked(gate, "0")
    assert locked(gate, "249")


def test_bcrypt_slots_refuse_instead_of_queueing() -> None:
    slots = BcryptSlots(2)
    with slots, slots:
        with pytest.raises(Refused, match="busy") as busy, slots:
            pass
        assert busy.value.code == ErrorCode.BUSY
    with slots:  # released again
        pass


def lockouts(gate: LoginThrottle, clock: Clock, failures: int, extra_wait: float) -> list[float]:
    """Fail `failures` times, each time as soon as the lockout ended plus `extra_wait`;
    the lockout each failure brought."""
    waits = []
    for _ in range(failures):
        while locked(gate, "k"):
            clock.now += 1
        gate.failed("k")
        start = clock.now
        while locked(gate, "k"):
            clock.now += 1
        waits.append(clock.now - start)
        clock.now += extra_wait
    return waits


@pytest.mark.parametrize("extra_wait", [0, 15 * 60, 2 * 3600])
def test_waiting_out_a_lockout_does_not_start_afresh(extra_wait: float) -> None:
    # Before the fix, a count was forgotten 15 minutes after the last failure (or once
    # the lockout was over, if longer): the lockout fell back to nothing, every time.
    clock = Clock()
    gate = throttle_on(clock, allowed=5, lockout=30)
    waits = lockouts(gate, clock, 14, extra_wait)
    assert waits == [0, 0, 0, 0, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_a_count_is_forgotten_a_day_after_its_lockout_ended(state: LimitState) -> None:
    clock = Clock()
    gate = throttle_on(clock, allowed=1, lockout=10, state=state)
    gate.failed("k")
    gate.failed("k")  # locked for 20 s
    clock.now += 20 + throttle.FORGET_AFTER - 1
    gate.failed("k")  # still remembered: the third failure, 40 s
    clock.now += 39
    assert locked(gate, "k")
    clock.now += 1 + throttle.FORGET_AFTER + 1
    gate.failed("k")  # forgotten: a first failure again, 10 s
    clock.now += 10
    assert not locked(gate, "k")
    assert throttle.FORGET_AFTER >= 24 * 3600


# --- registrations ------------------------------------------------------------------------


def refused(action: Callable[[], object]) -> Refused:
    with pytest.raises(Refused) as error:
        action()
    return error.value


def test_registrations_are_limited_per_key_within_the_window(state: LimitState) -> None:
    clock = Clock()
    limit = RegistrationLimit(state, clock, per_key=2, per_address=100)
    for _ in range(2):
        limit.attempt(b"k" * 32, "192.0.2.1")
    clock.now += 100
    error = refused(lambda: limit.attempt(b"k" * 32, "198.51.100.1"))
    assert error.code == ErrorCode.THROTTLED
    assert str(error) == f"too many registrations from this device; try again in {3500 + 1} s"
    limit.attempt(b"j" * 32, "192.0.2.1")  # another key
    clock.now += throttle.WINDOW - 100
    limit.attempt(b"k" * 32, "192.0.2.1")  # a new window


def test_registrations_are_limited_per_address_whatever_the_key(state: LimitState) -> None:
    limit = RegistrationLimit(state, Clock(), per_key=2, per_address=3)
    for number in range(3):
        limit.attempt(bytes([number]) * 32, "192.0.2.1")
    error = refused(lambda: limit.attempt(b"new" * 11, "192.0.2.1"))
    assert "too many registrations from your address" in str(error)
    limit.attempt(b"new" * 11, "192.0.2.2")
    # A refused attempt is not counted: the key still has both of its own.
    limit.attempt(b"new" * 11, "192.0.2.3")


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8:a:b:c:d:e:f", "2001:db8:a:b::/64"),
        ("[2001:db8::1]", "2001:db8::/64"),
        (None, "unknown"),
        ("", "unknown"),
        ("not an address", "other:not an address"),
    ],
)
def test_address_groups(address: str | None, group: str) -> None:
    assert address_group(address) == group


# --- challenges ---------------------------------------------------------------------------


def test_a_challenge_is_single_use_bound_to_its_key_and_lapses(state: LimitState) -> None:
    clock = Clock()
    table = Challenges(state, clock, per_address=10)
    first = table.issue(b"k" * 32, "192.0.2.1")
    table.redeem(first, b"k" * 32)
    assert refused(lambda: table.redeem(first, b"k" * 32)).code == ErrorCode.UNAUTHORIZED
    other = table.issue(b"k" * 32, "192.0.2.1")
    assert refused(lambda: table.redeem(other, b"j" * 32)).code == ErrorCode.UNAUTHORIZED
    late = table.issue(b"k" * 32, "192.0.2.1")
    clock.now += throttle.CHALLENGE_TTL
    assert refused(lambda: table.redeem(late, b"k" * 32)).code == ErrorCode.UNAUTHORIZED


def test_a_full_table_pushes_out_the_oldest_of_the_busiest_address(
    monkeypatch: pytest.MonkeyPatch, state: LimitState
) -> None:
    monkeypatch.setattr(throttle, "MAX_PENDING_CHALLENGES", 6)
    clock = Clock()
    table = Challenges(state, clock, per_address=3)
    a, b, c = "192.0.2.1", "192.0.2.2", "192.0.2.3"
    held: dict[str, list[bytes]] = {a: [], b: [], c: []}
    for address, count in ((a, 2), (b, 3), (c, 1)):
        for _ in range(count):
            held[address].append(table.issue(b"k" * 32, address))
            clock.now += 1
    honest = table.issue(b"h" * 32, "198.51.100.1")  # full: b holds the most, loses its oldest
    with state.atomic():  # where a LimitState may be read
        assert (state.pending_count(), state.pending_count(b)) == (6, 2)
    assert refused(lambda: table.redeem(held[b][0], b"k" * 32)).code == ErrorCode.UNAUTHORIZED
    table.issue(b"k" * 32, "198.51.100.2")  # a and b hold 2 each now: a's is older
    assert refused(lambda: table.redeem(held[a][0], b"k" * 32)).code == ErrorCode.UNAUTHORIZED
    table.redeem(honest, b"h" * 32)
    table.redeem(held[c][0], b"k" * 32)


def test_lapsed_challenges_make_room(state: LimitState) -> None:
    clock = Clock()
    table = Challenges(state, clock, per_address=2)
    table.issue(None, "a")
    table.issue(None, "a")
    assert refused(lambda: table.issue(None, "a")).code == ErrorCode.BUSY
    clock.now += throttle.CHALLENGE_TTL
    table.issue(None, "a")
    with state.atomic():
        assert state.pending_count() == 1
