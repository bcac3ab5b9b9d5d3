"""Brakes on password guessing and on floods of bcrypt work.

`LoginThrottle` counts failed logins per username and per client key. After `allowed`
failures a key is locked out for `lockout` seconds, doubling with each further failure
up to `MAX_LOCKOUT`. Unknown usernames are counted exactly like real ones, so the
answers never tell which accounts exist. A success clears the counts of its keys.

`BcryptSlots` caps how many workers may run bcrypt at once, so a login flood cannot
occupy every worker and starve heartbeats, lookups and searches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from sfs.common.protocol import ErrorCode, Refused

MAX_LOCKOUT = 3600
FORGET_AFTER = 900  # a key with no failure for this long starts afresh
MAX_TRACKED = 100_000  # keys remembered at most; the oldest are forgotten first


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    def __init__(self, clock: Callable[[], float], allowed: int = 5, lockout: int = 30) -> None:
        self._clock = clock
        self._allowed = allowed
        self._lockout = lockout
        self._failures: dict[bytes, _Failures] = {}
        self._lock = threading.Lock()

    def check(self, *keys: bytes) -> None:
        """Refuse (before any bcrypt) while one of `keys` is locked out."""
        now = self._clock()
        with self._lock:
            wait = max((self._locked_until(key) - now for key in keys), default=0.0)
        if wait > 0:
            raise Refused(
                ErrorCode.THROTTLED,
                f"too many failed logins; try again in {int(wait) + 1} s",
            )

    def failed(self, *keys: bytes) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                entry = self._failures.pop(key, None)
                if entry is None or now - entry.last > max(FORGET_AFTER, self._lockout_for(entry)):
                    entry = _Failures(0, now)
                entry.count += 1
                entry.last = now
                self._failures[key] = entry  # re-inserted: the dict stays oldest-first
            while len(self._failures) > MAX_TRACKED:
                del self._failures[next(iter(self._failures))]

    def succeeded(self, *keys: bytes) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def _lockout_for(self, entry: _Failures) -> float:
        over = entry.count - self._allowed
        return 0.0 if over < 0 else float(min(MAX_LOCKOUT, self._lockout * 2 ** min(over, 20)))

    def _locked_until(self, key: bytes) -> float:
        entry = self._failures.get(key)
        return 0.0 if entry is None else entry.last + self._lockout_for(entry)


class BcryptSlots:
    """A counting semaphore that refuses (`busy`) instead of queueing."""

    def __init__(self, slots: int) -> None:
        self._semaphore = threading.BoundedSemaphore(max(1, slots))

    def __enter__(self) -> None:
        if not self._semaphore.acquire(blocking=False):
            raise Refused(ErrorCode.BUSY, "the broker is busy with other logins; retry shortly")

    def __exit__(self, *exc: object) -> None:
        self._semaphore.release()
