"""`sfs-broker migrate --to postgresql://…`: copy a SQLite index into PostgreSQL, then
check the copy row by row.

What is copied is the acknowledged state: users and their keys, sessions, files with
their manifests, access lists and holders. Presence is not (heartbeats rebuild it
within one presence lifetime). The SQLite side is read in one read transaction (a
consistent snapshot, even while a broker writes), the PostgreSQL side written in one
transaction: a failed copy leaves the target as empty as it was. Users keep their ids.
The target must hold no index yet.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfs.broker.postgres_store import PostgresStore
from sfs.broker.store import SqliteStore
from sfs.common.errors import StorageError

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    order: tuple[str, ...]  # a key: both sides list rows in the same order
    # The order rows are copied in, if not `order`: files by time, so that the newest lie
    # together, as a broker's own shares do, for search's walk of the newest files.
    load_order: tuple[str, ...] = ()


# Parents before children (foreign keys).
TABLES = (
    Table(
        "users",
        (
            "id",
            "username",
            "password_hash",
            "rsa_public",
            "curve_public",
            "created_at",
            "disabled",
        ),
        ("id",),
    ),
    Table("sessions", ("token_hash", "user_id", "expires_at"), ("token_hash",)),
    Table(
        "files",
        (
            "file_id",
            "owner_id",
            "name",
            "size",
            "keywords",
            "manifest",
            "signature",
            "public",
            "shared_at",
            "grant_signature",
            "signed_access",
            "kind",
            "file_count",
        ),
        ("file_id",),
        ("shared_at", "file_id"),
    ),
    Table("access", ("file_id", "user_id"), ("file_id", "user_id")),
    Table("holders", ("file_id", "user_id"), ("file_id", "user_id")),
)


@dataclass(frozen=True)
class Copied:
    rows: dict[str, int]  # table: rows copied, and found the same on both sides


def _normal(row: Iterable[Any]) -> Row:
    """A row as both databases give it: BLOB/BYTEA as bytes, booleans as 0/1."""
    return tuple(
        int(v) if isinstance(v, bool) else bytes(v) if isinstance(v, memoryview) else v for v in row
    )


def _sqlite_rows(db: sqlite3.Connection, table: Table, order: Sequence[str] = ()) -> Iterator[Row]:
    # Names are the constants above, never input.
    by = ", ".join(order or table.order)
    sql = f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {by}"  # noqa: S608
    for row in db.execute(sql):
        yield _normal(row)


def _digest(rows: Iterable[Row]) -> tuple[int, str]:
    count, digest = 0, hashlib.sha256()
    for row in rows:
        count += 1
        digest.update(repr(row).encode())
    return count, digest.hexdigest()


def copy_index(source: Path, target: PostgresStore) -> Copied:
    """Copy the SQLite index at `source` into `target` (empty), then compare every
    table's rows, in key order, on both sides."""
    SqliteStore(source).close()  # brings the file to the current schema first
    try:
        db = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the database {source}: {exc}") from exc
    try:
        db.execute("BEGIN")  # one snapshot for the copy and the check
        if target.holds_an_index():
            raise StorageError(
                "the PostgreSQL database already holds an sfs index; migrate into an empty one"
            )
        target.load(
            (table.name, table.columns, _sqlite_rows(db, table, table.load_order))
            for table in TABLES
        )
        copied: dict[str, int] = {}
        for table in TABLES:
            count, want = _digest(_sqlite_rows(db, table))
            got_count, got = _digest(
                _normal(row) for row in target.dump(table.name, table.columns, table.order)
            )
            if (count, want) != (got_count, got):
                raise StorageError(
                    f"the copy differs from the original in table {table.name} ({count} rows"
                    f" in SQLite, {got_count} in PostgreSQL); the SQLite file is unchanged"
                )
            copied[table.name] = count
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the database {source}: {exc}") from exc
    finally:
        db.close()
    return Copied(copied)
