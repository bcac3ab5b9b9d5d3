"""The one place that turns the broker's config into a `Store`.

`database:` absent, or a file path, is SQLite (`broker.db` in `data_dir` by default); a
postgresql:// URL is PostgreSQL.
"""

from __future__ import annotations

from sfs.broker.postgres_store import PostgresStore, describe
from sfs.broker.store import SqliteStore
from sfs.broker.store_contract import Store
from sfs.common.config import BrokerConfig
from sfs.common.errors import ConfigError


def open_store(settings: BrokerConfig, *, create: bool = False) -> Store:
    """The configured store, its schema created or migrated. An SQLite file must exist
    unless `create` (`sfs-broker init` makes it)."""
    if settings.database_url is not None:
        # A pool per worker, and one for the rest (status, the serving loop).
        return PostgresStore(settings.database_url, pool_size=settings.workers + 1)
    if not create and not settings.database.exists():
        raise ConfigError(f"no broker database at {settings.database}; run `sfs-broker init`")
    return SqliteStore(settings.database)


def where(settings: BrokerConfig) -> str:
    """The configured database as it may be shown or logged: never with a password."""
    if settings.database_url is not None:
        return f"PostgreSQL {describe(settings.database_url)}"
    return f"SQLite {settings.database}"
