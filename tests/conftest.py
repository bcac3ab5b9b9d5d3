"""Fixtures shared by every tier: a throwaway PostgreSQL cluster (tests/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import Cluster, running_cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One cluster for the whole run (about a second to start), removed at the end."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: Cluster) -> Iterator[str]:
    """An empty database of its own for one test, dropped afterwards."""
    with postgres_cluster.database() as url:
        yield url
