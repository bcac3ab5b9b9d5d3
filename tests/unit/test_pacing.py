"""sfs.peer.pacing: the token bucket behind `upload_rate`, on a fake clock."""

from __future__ import annotations

from sfs.peer.pacing import UploadPacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_off_never_waits() -> None:
    pacer = UploadPacer(0)
    assert not pacer.enabled
    for _ in range(100):
        pacer.spend(1 << 20)
        assert pacer.wait() == 0.0


def test_chunks_go_at_the_rate_one_chunk_in_debt() -> None:
    clock = Clock()
    pacer = UploadPacer(1000, clock)
    sent_at = []
    while len(sent_at) < 5:
        delay = pacer.wait()
        if delay:
            clock.now += delay
            continue
        sent_at.append(clock.now)
        pacer.spend(500)
    assert [round(t - 100.0, 6) for t in sent_at] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_a_chunk_larger_than_a_second_still_goes_then_waits() -> None:
    clock = Clock()
    pacer = UploadPacer(1000, clock)
    assert pacer.wait() == 0.0
    pacer.spend(4000)
    assert pacer.wait() == 4.0
    clock.now += 4.0
    assert pacer.wait() == 0.0


def test_idle_time_saves_at_most_a_second() -> None:
    clock = Clock()
    pacer = UploadPacer(1000, clock)
    clock.now += 3600.0
    pacer.spend(1000)  # the saved second
    assert pacer.wait() == 0.0
    pacer.spend(1000)
    assert pacer.wait() == 1.0
