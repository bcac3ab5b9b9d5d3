"""`LimitState` in PostgreSQL: the login throttle's counts and the pending registration
and device-login challenges, shared by every broker on the database.

Each `atomic()` block is one transaction that first takes a transaction-level advisory
lock, so the policies in `sfs.broker.throttle` read and write as if alone, across
brokers as within one. Only logins, registrations and challenges pass through it, each
of which costs far more (bcrypt, RSA) than the lock. Tallies past their `until` are
deleted as new ones are written, and lapsed challenges by `drop_lapsed`: the tables
hold what is live, bounded by the policies (challenges) and by the clients' bcrypt work
(tallies).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from sfs.broker.throttle import Pending, Tally
from sfs.common.errors import StorageError

_LIMITS_LOCK = 0x5F5_0002  # pg_advisory_xact_lock key of every atomic() block

Connection = psycopg.Connection[tuple[Any, ...]]


class PostgresLimits:
    """Uses its store's connection pool; one transaction per `atomic()` block."""

    def __init__(self, pool: ConnectionPool[Connection], where: str) -> None:
        self._pool = pool
        self._where = where  # the database, as it may be shown
        self._local = threading.local()

    @contextmanager
    def _atomic(self) -> Iterator[None]:
        if getattr(self._local, "db", None) is not None:  # nested: the same transaction
            yield
            return
        try:
            # One transaction: committed at the end, rolled back if the block raises.
            with self._pool.connection() as db, db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_LIMITS_LOCK,))
                self._local.db = db
                try:
                    yield
                finally:
                    self._local.db = None
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StorageError(f"error in the database {self._where}: {reason}") from exc

    def atomic(self) -> AbstractContextManager[None]:
        return self._atomic()

    def _db(self) -> Connection:
        db: Connection | None = getattr(self._local, "db", None)
        if db is None:
            raise RuntimeError("LimitState is used inside atomic() only")
        return db

    def tally(self, key: str) -> Tally | None:
        row = (
            self._db()
            .execute("SELECT count, at, until FROM limit_tallies WHERE key = %s", (key,))
            .fetchone()
        )
        return None if row is None else Tally(int(row[0]), float(row[1]), float(row[2]))

    def set_tally(self, key: str, tally: Tally | None) -> None:
        db = self._db()
        if tally is None:
            db.execute("DELETE FROM limit_tallies WHERE key = %s", (key,))
            return
        db.execute("DELETE FROM limit_tallies WHERE until <= %s", (tally.at,))
        db.execute(
            "INSERT INTO limit_tallies (key, count, at, until) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (key) DO UPDATE SET count = excluded.count, at = excluded.at,"
            " until = excluded.until",
            (key, tally.count, tally.at, tally.until),
        )

    def add_pending(self, challenge: bytes, pending: Pending) -> None:
        self._db().execute(
            "INSERT INTO limit_challenges (challenge, expires, client_key, address)"
            " VALUES (%s, %s, %s, %s)",
            (challenge, pending.expires, pending.client_key, pending.address),
        )

    def take_pending(self, challenge: bytes) -> Pending | None:
        row = (
            self._db()
            .execute(
                "DELETE FROM limit_challenges WHERE challenge = %s"
                " RETURNING expires, client_key, address",
                (challenge,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Pending(float(row[0]), None if row[1] is None else bytes(row[1]), row[2])

    def drop_lapsed(self, now: float) -> None:
        self._db().execute("DELETE FROM limit_challenges WHERE expires <= %s", (now,))

    def pending_count(self, address: str | None = None) -> int:
        if address is None:
            row = self._db().execute("SELECT count(*) FROM limit_challenges").fetchone()
        else:
            row = (
                self._db()
                .execute("SELECT count(*) FROM limit_challenges WHERE address = %s", (address,))
                .fetchone()
            )
        return int(row[0]) if row else 0

    def busiest_address(self) -> str | None:
        row = (
            self._db()
            .execute(
                "SELECT address FROM limit_challenges GROUP BY address"
                " ORDER BY count(*) DESC, min(seq) LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    def oldest_pending(self, address: str) -> tuple[bytes, Pending] | None:
        row = (
            self._db()
            .execute(
                "SELECT challenge, expires, client_key, address FROM limit_challenges"
                " WHERE address = %s ORDER BY seq LIMIT 1",
                (address,),
            )
            .fetchone()
        )
        if row is None:
            return None
        client_key = None if row[2] is None else bytes(row[2])
        return bytes(row[0]), Pending(float(row[1]), client_key, row[3])
