"""The holder's upload cap (`upload_rate` in the peer config): one token bucket for every
chunk `sfs-peer serve` sends, whoever it goes to.

The bucket fills at `rate` bytes a second, up to a second's worth. A chunk may go when
the balance is not negative, and takes its size off, into debt: so a chunk larger than
the bucket still goes, and over any stretch the bytes sent are at most `rate` times its
length plus one chunk and the burst. The serving loop asks `wait` how long it may sleep
before the next chunk is due, and keeps answering everything else meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class UploadPacer:
    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        """`rate`: bytes a second for all transfers together; 0 turns the cap off."""
        self.rate = rate
        self._clock = clock
        self._burst = float(rate)
        self._balance = 0.0  # no burst at start: the cap holds from the first chunk
        self._updated = clock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _refill(self) -> None:
        now = self._clock()
        self._balance = min(self._burst, self._balance + (now - self._updated) * self.rate)
        self._updated = now

    def wait(self) -> float:
        """Seconds until the next chunk may go (0: now)."""
        if not self.enabled:
            return 0.0
        self._refill()
        return 0.0 if self._balance >= 0 else -self._balance / self.rate

    def spend(self, size: int) -> None:
        """A chunk of `size` bytes went."""
        if self.enabled:
            self._refill()
            self._balance -= size
