"""Attacks on real `sfs-broker` and `sfs-peer` processes on loopback.

Every test here plays one attacker against processes started by `tests.harness`, and
checks four things: the attack is refused, with a clear one-line message and the
documented exit code, the download folder is as it was, and the servers still answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.test_fuzz import Attacker, Setup, running_cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "adversarial" in item.nodeid:
            item.add_marker(pytest.mark.harness)


# The cluster and the attacker's sockets of the fuzz and transport suites.
@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    with running_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def attacker() -> Iterator[Attacker]:
    opened = Attacker()
    yield opened
    opened.close()
