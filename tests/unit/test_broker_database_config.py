"""The broker config's `database` key, and the store the factory makes of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfs.broker.postgres_store import PostgresStore
from sfs.broker.store import SqliteStore
from sfs.broker.stores import open_store, where
from sfs.common.config import BrokerConfig, load_broker_config
from sfs.common.errors import ConfigError

BASE = "bind: tcp://127.0.0.1:5555\ndata_dir: data\n"


def config(tmp_path: Path, extra: str = "", mode: int = 0o600) -> BrokerConfig:
    path = tmp_path / "broker.yaml"
    path.write_text(BASE + extra)
    path.chmod(mode)
    return load_broker_config(path)


def test_no_database_key_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = config(tmp_path)
    assert (settings.database, settings.database_url) == (tmp_path / "data" / "broker.db", None)
    with pytest.raises(ConfigError, match="run `sfs-broker init`"):
        open_store(settings)  # serve and status never create an empty index
    (tmp_path / "data").mkdir()
    store = open_store(settings, create=True)
    assert isinstance(store, SqliteStore)
    store.close()
    assert where(settings) == f"SQLite {tmp_path / 'data' / 'broker.db'}"


def test_a_path_is_sqlite_relative_to_the_config(tmp_path: Path) -> None:
    settings = config(tmp_path, "database: elsewhere/index.db\n")
    assert settings.database == tmp_path / "elsewhere" / "index.db"
    assert settings.database_url is None


def test_a_url_is_postgresql_and_stays_out_of_repr(tmp_path: Path) -> None:
    url = "postgresql://sfs:pw-123@db.example:5432/sfs"
    settings = config(tmp_path, f"database: '{url}'\n")
    assert settings.database_url == url
    assert "pw-123" not in repr(settings)
    assert where(settings) == "PostgreSQL postgresql://sfs@db.example:5432/sfs"


@pytest.mark.parametrize("url", ["postgresql://sfs:pw@h/db", "postgresql://h/db?password=pw"])
def test_a_password_in_a_readable_config_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"broker\.yaml: database: .*chmod 600") as refused:
        config(tmp_path, f"database: '{url}'\n", mode=0o640)
    assert "pw" not in str(refused.value).replace("pgpass", "")
    config(tmp_path, "database: postgresql://sfs@h/db\n", mode=0o644)  # no password: fine


def test_another_scheme_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"database: expected a file path or a postgresql://"):
        config(tmp_path, "database: 'mysql://root:pw@h/db'\n")


def test_the_factory_opens_postgresql(tmp_path: Path, postgres_url: str) -> None:
    settings = config(tmp_path, f"database: '{postgres_url}'\n")
    store = open_store(settings)  # no init needed: the schema is made on first use
    try:
        assert isinstance(store, PostgresStore)
        assert store.stats(now=0).users == []
    finally:
        store.close()
