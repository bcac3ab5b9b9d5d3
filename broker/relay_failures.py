"""Failed requests at a relay (a bad, forged, expired or reused ticket, a holder that is
not attached), counted per client key and per source address (IPv4, or IPv6 /64).

Past `FAILED_PER_KEY` failures of one key, or `FAILED_PER_ADDRESS` from one address,
in `WINDOW` seconds, that key's or address's requests are refused `rate limited`
before any signature is checked, until its oldest failure ages out; requests refused
so are not counted again. A new key per attempt is free, an address is not. At most
`MAX_SOURCES` keys and as many addresses are remembered; the least recently failed go
first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

FAILED_PER_KEY = 10
FAILED_PER_ADDRESS = 60
WINDOW = 60.0
MAX_SOURCES = 10_000


class FailureCounts:
    """Failures per source in a sliding window; for one thread."""

    def __init__(
        self,
        limit: int,
        window: float = WINDOW,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit, self._window, self._max = limit, window, max_sources
        self._clock = clock
        self._failures: dict[bytes | str, deque[float]] = {}  # oldest change first

    def wait(self, source: bytes | str) -> float:
        """Seconds before `source` may try again; 0 if it may now."""
        failures = self._failures.get(source)
        if failures is None:
            return 0.0
        now = self._clock()
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return 0.0
        if len(failures) < self._limit:
            return 0.0
        return failures[0] + self._window - now

    def add(self, source: bytes | str) -> None:
        failures = self._failures.pop(source, None) or deque(maxlen=self._limit)
        failures.append(self._clock())
        self._failures[source] = failures
        if len(self._failures) > self._max:
            del self._failures[next(iter(self._failures))]

    def __len__(self) -> int:
        return len(self._failures)
