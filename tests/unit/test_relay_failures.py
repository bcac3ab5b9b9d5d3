"""The relay's failure counts: a sliding window per source, and a bounded table."""

from __future__ import annotations

from sfs.broker.relay_failures import FailureCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_waits_until_its_oldest_failure_ages_out() -> None:
    clock = Clock()
    counts = FailureCounts(3, window=60, clock=clock)
    for _ in range(2):
        counts.add("a")
        clock.now += 10
    assert counts.wait("a") == 0  # two failures: under the limit
    counts.add("a")
    assert counts.wait("a") == 40  # the first one ages out 60 s after it
    clock.now += 40
    assert counts.wait("a") == 0
    assert counts.wait("b") == 0


def test_the_table_forgets_the_least_recently_failed_first() -> None:
    clock = Clock()
    counts = FailureCounts(1, max_sources=2, clock=clock)
    counts.add("a")
    counts.add("b")
    counts.add("a")  # a failed last: b is the oldest now
    counts.add("c")
    assert len(counts) == 2
    assert counts.wait("b") == 0 and counts.wait("a") > 0 and counts.wait("c") > 0


def test_stale_sources_are_dropped_when_looked_at() -> None:
    clock = Clock()
    counts = FailureCounts(1, window=60, clock=clock)
    counts.add("a")
    clock.now += 61
    assert counts.wait("a") == 0
    assert len(counts) == 0
