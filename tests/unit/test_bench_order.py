"""bench.transfer's and bench.folders' rounds: no method always runs right after the same
one (where a method stood in the round changed its figure: docs/PERFORMANCE.md, "Engine v2,
part 4")."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench.folders
import bench.transfer
from bench.transfer import Payload, Round, run_rounds

LABELS = ["scp", "scp fast", "wormhole", "wormhole relayed", "sfs", "sfs, off"]


class Fake:
    def __init__(self, label: str, ran: list[str]) -> None:
        self.label, self.ran = label, ran

    def transfer(self, payload: Payload) -> Round:
        self.ran.append(self.label)
        return Round(1.0, 0, 0)


def orders(count: int, seed: int) -> list[list[str]]:
    ran: list[str] = []
    methods = [Fake(label, ran) for label in LABELS]
    rounds = run_rounds(methods, Payload(Path("x"), 1, ""), count, shuffle=random.Random(seed))
    assert {label: len(done) for label, done in rounds.items()} == dict.fromkeys(LABELS, count)
    return [ran[i : i + len(LABELS)] for i in range(0, len(ran), len(LABELS))]


def test_each_round_runs_every_method_once_in_its_own_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench.transfer, "SETTLE", 0.0)  # the rest is for real transfers
    first = orders(3, seed=2)
    assert all(sorted(order) == sorted(LABELS) for order in first)
    after = {
        (order[i - 1], order[i]) for order in first for i in range(1, len(order))
    }  # (before, after) pairs
    follows_relayed = {b for a, b in after if a == "wormhole relayed"}
    assert len(follows_relayed) > 1  # not always the same method after the slow one
    assert orders(3, seed=5) != first  # each run its own orders


def test_the_folder_rounds_run_every_method_once_in_their_own_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench.transfer, "SETTLE", 0.0)
    monkeypatch.setattr(bench.folders, "check_tree", lambda tree, target: None)
    ran: list[str] = []

    class FakeFolder:
        durable = True

        def __init__(self, label: str) -> None:
            self.label = label

        def transfer(self, tree: object, target: Path) -> float:
            ran.append(self.label)
            return 1.0

    not_run: dict[str, str] = {}
    methods = [FakeFolder(label) for label in ("scp -r", "tar", "wormhole", "sfs")]
    rounds = bench.folders.run_rounds(
        methods, SimpleNamespace(name="tree"), tmp_path / "in", 4, not_run, shuffle=random.Random(3)
    )
    assert {label: len(done) for label, done in rounds.items()} == dict.fromkeys(
        ["scp -r", "tar", "wormhole", "sfs"], 4
    )
    assert not_run == {}
    orders = [ran[i : i + 4] for i in range(0, 16, 4)]
    assert all(sorted(order) == sorted(ran[:4]) for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # not one fixed order
