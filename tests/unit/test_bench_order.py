"""bench.transfer's rounds: no method always runs right after the same one (where a
method stands in the round changed its figure: docs/PERFORMANCE.md, "Engine v2, part 4")."""

from __future__ import annotations

from pathlib import Path

from bench.transfer import Payload, Round, run_rounds

ran: list[str] = []


class Fake:
    def __init__(self, label: str) -> None:
        self.label = label

    def transfer(self, payload: Payload) -> Round:
        ran.append(self.label)
        return Round(1.0, 0, 0)


def test_each_round_runs_the_methods_in_the_other_order_from_the_last() -> None:
    ran.clear()
    methods = [Fake("scp"), Fake("sfs"), Fake("sfs, off")]
    rounds = run_rounds(methods, Payload(Path("x"), 1, ""), 3)
    assert ran == ["scp", "sfs", "sfs, off", "sfs, off", "sfs", "scp", "scp", "sfs", "sfs, off"]
    assert {label: len(done) for label, done in rounds.items()} == {
        "scp": 3,
        "sfs": 3,
        "sfs, off": 3,
    }
