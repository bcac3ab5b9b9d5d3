"""Limits on what clients can make the broker do: guess passwords, register, hold
registration challenges, and run bcrypt.

The policies live here; what they remember lives behind `LimitState`, which the store
provides (`Store.limit_state`): `MemoryLimits` in this process for SQLite,
`PostgresLimits` (sfs.broker.postgres_limits) in the database that several brokers
share. So each policy is written as reads and writes inside `state.atomic()`, with the
clock injected.

`LoginThrottle` counts failed logins per username and per client key. After `allowed`
failures a key is locked out for `lockout` seconds, doubling with each further failure
up to `MAX_LOCKOUT`. A count is forgotten only `FORGET_AFTER` (a day) after its lockout
has ended, so waiting out a lockout does not start a guesser afresh: over a day a
patient guesser gets about 35 guesses per account, not hundreds. Unknown usernames are
counted exactly like real ones, so the answers never tell which accounts exist. A
success clears the counts of its keys.

`RegistrationLimit` allows `per_key` registrations per client key and `per_address` per
source address in each `WINDOW`, so `register` cannot be used to probe many usernames
(a taken name must answer `conflict`).

`Challenges` holds single-use challenges (for `register` and `device_login`). One
source address may hold `per_address` of them at once: more are refused `busy`, to that
address only. All together hold at most `MAX_PENDING_CHALLENGES`; when the table is
full a new challenge pushes out the oldest one of the address holding the most. So a
flood from a few addresses costs only those addresses their challenges, and an honest
registrant from anywhere else still gets one: to push that one out, a flood must come
from about as many addresses as the table holds challenges (IPv6 addresses count per
/64).

`BcryptSlots` caps how many workers may run bcrypt at once, so a login flood cannot
occupy every worker and starve heartbeats, lookups and searches.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from sfs.common import crypto
from sfs.common.protocol import ErrorCode, Refused

MAX_LOCKOUT = 3600
FORGET_AFTER = 24 * 3600  # a count is forgotten this long after its lockout ended
MAX_TRACKED = 100_000  # tallies remembered at most; the least recently changed go first
WINDOW = 3600  # seconds over which registrations are counted
CHALLENGE_TTL = 60
MAX_PENDING_CHALLENGES = 10_000


@dataclass(frozen=True)
class Tally:
    """A count and the time it started from: the latest failure, for logins; the start
    of the window, for registrations. Meaningless from `until` on."""

    count: int
    at: float
    until: float


@dataclass(frozen=True)
class Pending:
    """A challenge (for registration or a device login) not yet redeemed."""

    expires: float
    client_key: bytes | None
    address: str  # as `address_group` gives it


class LimitState(Protocol):
    """What the limits remember. Each policy reads and writes it only inside `atomic()`,
    which a shared store runs as one transaction."""

    def atomic(self) -> AbstractContextManager[None]: ...

    def tally(self, key: str) -> Tally | None: ...

    def set_tally(self, key: str, tally: Tally | None) -> None:
        """Store a tally (None: forget it). A store may drop tallies past their `until`."""

    def add_pending(self, challenge: bytes, pending: Pending) -> None: ...

    def take_pending(self, challenge: bytes) -> Pending | None:
        """Remove a challenge; what it was, if it was there."""

    def drop_lapsed(self, now: float) -> None:
        """Remove the challenges that expired by `now`."""

    def pending_count(self, address: str | None = None) -> int:
        """Challenges held by `address`, or by everyone."""

    def busiest_address(self) -> str | None:
        """The address holding the most challenges (of those, the one holding the oldest)."""

    def oldest_pending(self, address: str) -> tuple[bytes, Pending] | None: ...


class MemoryLimits:
    """`LimitState` in this process's memory, bounded: at most `MAX_TRACKED` tallies and
    the challenges `Challenges` allows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[str, Tally] = {}  # least recently set first
        # Challenges all live CHALLENGE_TTL, so both dicts stay in expiry order.
        self._pending: dict[bytes, Pending] = {}
        self._by_address: dict[str, dict[bytes, None]] = {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            yield

    def atomic(self) -> AbstractContextManager[None]:
        return self._locked()

    def tally(self, key: str) -> Tally | None:
        return self._tallies.get(key)

    def set_tally(self, key: str, tally: Tally | None) -> None:
        self._tallies.pop(key, None)
        if tally is not None:
            self._tallies[key] = tally  # re-inserted: the dict stays oldest-first
        while len(self._tallies) > MAX_TRACKED:
            del self._tallies[next(iter(self._tallies))]

    def add_pending(self, challenge: bytes, pending: Pending) -> None:
        self._pending[challenge] = pending
        self._by_address.setdefault(pending.address, {})[challenge] = None

    def take_pending(self, challenge: bytes) -> Pending | None:
        pending = self._pending.pop(challenge, None)
        if pending is not None:
            held = self._by_address[pending.address]
            del held[challenge]
            if not held:
                del self._by_address[pending.address]
        return pending

    def drop_lapsed(self, now: float) -> None:
        # Oldest first; one added out of order (the clock stepped back) waits its turn.
        while self._pending:
            challenge, pending = next(iter(self._pending.items()))
            if pending.expires > now:
                return
            self.take_pending(challenge)

    def pending_count(self, address: str | None = None) -> int:
        if address is None:
            return len(self._pending)
        return len(self._by_address.get(address, ()))

    def busiest_address(self) -> str | None:
        def holding(address: str) -> tuple[int, float]:
            held = self._by_address[address]
            return len(held), -self._pending[next(iter(held))].expires

        return max(self._by_address, key=holding, default=None)

    def oldest_pending(self, address: str) -> tuple[bytes, Pending] | None:
        challenge = next(iter(self._by_address.get(address, ())), None)
        return None if challenge is None else (challenge, self._pending[challenge])


def address_group(address: str | None) -> str:
    """Whom a source address stands for: an IPv4 address, or an IPv6 /64 (one home or
    one machine's worth of addresses). Unknown: not over TCP, or in tests."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return "other:" + address[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _live(tally: Tally | None, now: float) -> Tally | None:
    return tally if tally is not None and tally.until > now else None


class LoginThrottle:
    def __init__(
        self,
        state: LimitState,
        clock: Callable[[], float],
        allowed: int = 5,
        lockout: int = 30,
    ) -> None:
        self._state = state
        self._clock = clock
        self._allowed = allowed
        self._lockout = lockout

    def check(self, *keys: str) -> None:
        """Refuse (before any bcrypt) while one of `keys` is locked out."""
        now = self._clock()
        with self._state.atomic():
            tallies = [_live(self._state.tally(key), now) for key in keys]
        wait = max((self._locked_until(t) - now for t in tallies if t), default=0.0)
        if wait > 0:
            raise Refused(
                ErrorCode.THROTTLED,
                f"too many failed logins; try again in {int(wait) + 1} s",
            )

    def failed(self, *keys: str) -> None:
        now = self._clock()
        with self._state.atomic():
            for key in keys:
                old = _live(self._state.tally(key), now)
                count = 1 if old is None else old.count + 1
                until = now + self._lockout_for(count) + FORGET_AFTER
                self._state.set_tally(key, Tally(count, now, until))

    def succeeded(self, *keys: str) -> None:
        with self._state.atomic():
            for key in keys:
                self._state.set_tally(key, None)

    def _lockout_for(self, count: int) -> float:
        over = count - self._allowed
        return 0.0 if over < 0 else float(min(MAX_LOCKOUT, self._lockout * 2 ** min(over, 20)))

    def _locked_until(self, tally: Tally) -> float:
        return tally.at + self._lockout_for(tally.count)


class RegistrationLimit:
    def __init__(
        self, state: LimitState, clock: Callable[[], float], per_key: int, per_address: int
    ) -> None:
        self._state = state
        self._clock = clock
        self._per_key = per_key
        self._per_address = per_address

    def attempt(self, client_key: bytes | None, address: str | None) -> None:
        """Count one registration, or refuse it (`throttled`) if it is one too many."""
        now = self._clock()
        limits = [
            (f"register-key:{(client_key or b'').hex()}", self._per_key, "this device"),
            (f"register-address:{address_group(address)}", self._per_address, "your address"),
        ]
        with self._state.atomic():
            tallies = [_live(self._state.tally(key), now) for key, _, _ in limits]
            for tally, (_, most, source) in zip(tallies, limits, strict=True):
                if tally is not None and tally.count >= most:
                    raise Refused(
                        ErrorCode.THROTTLED,
                        f"too many registrations from {source}; "
                        f"try again in {int(tally.until - now) + 1} s",
                    )
            for tally, (key, _, _) in zip(tallies, limits, strict=True):
                new = (
                    Tally(1, now, now + WINDOW)
                    if tally is None
                    else Tally(tally.count + 1, tally.at, tally.until)
                )
                self._state.set_tally(key, new)


class Challenges:
    """Single-use registration challenges, each bound to the client key it was issued to
    (the module's docstring says how the table stays open to honest registrants)."""

    def __init__(self, state: LimitState, clock: Callable[[], float], per_address: int) -> None:
        self._state = state
        self._clock = clock
        self._per_address = per_address

    def issue(self, client_key: bytes | None, address: str | None) -> bytes:
        now = self._clock()
        group = address_group(address)
        challenge = crypto.random_bytes(32)
        with self._state.atomic():
            self._state.drop_lapsed(now)
            if self._state.pending_count(group) >= self._per_address:
                oldest = self._state.oldest_pending(group)
                wait = CHALLENGE_TTL if oldest is None else oldest[1].expires - now
                raise Refused(
                    ErrorCode.BUSY,
                    "too many registrations in progress from your address; "
                    f"try again in {int(wait) + 1} s",
                )
            if self._state.pending_count() >= MAX_PENDING_CHALLENGES:
                busiest = self._state.busiest_address()
                oldest = None if busiest is None else self._state.oldest_pending(busiest)
                if oldest is not None:
                    self._state.take_pending(oldest[0])
            self._state.add_pending(challenge, Pending(now + CHALLENGE_TTL, client_key, group))
        return challenge

    def redeem(self, challenge: bytes, client_key: bytes | None) -> None:
        with self._state.atomic():
            pending = self._state.take_pending(challenge)
        if pending is None or pending.expires <= self._clock() or pending.client_key != client_key:
            raise Refused(ErrorCode.UNAUTHORIZED, "unknown or expired challenge")


class BcryptSlots:
    """A counting semaphore that refuses (`busy`) instead of queueing."""

    def __init__(self, slots: int) -> None:
        self._semaphore = threading.BoundedSemaphore(max(1, slots))

    def __enter__(self) -> None:
        if not self._semaphore.acquire(blocking=False):
            raise Refused(ErrorCode.BUSY, "the broker is busy with other logins; retry shortly")

    def __exit__(self, *exc: object) -> None:
        self._semaphore.release()
