"""The broker's store: users, sessions, presence and the file index.

`Store` is the interface the request handlers use; `SqliteStore` is the embedded
default (WAL mode, one connection per thread). A PostgreSQL store implements the same
methods. The schema is created and versioned here; `SCHEMA_VERSION` grows with each
migration in `_MIGRATIONS`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle


@dataclass(frozen=True)
class User:
    id: int
    username: str
    password_hash: bytes
    bundle: KeyBundle


@dataclass(frozen=True)
class FileEntry:
    file_id: str
    owner: str
    name: str
    size: int
    keywords: list[str]
    manifest: bytes
    signature: bytes
    shared_at: int


@dataclass(frozen=True)
class Presence:
    username: str
    endpoint: str
    bundle: KeyBundle


@dataclass(frozen=True)
class Hit:
    file: FileEntry
    online: bool


@dataclass(frozen=True)
class Stats:
    users: list[tuple[str, bool]]  # (username, online)
    files: int
    online: list[tuple[str, str, int]]  # (username, endpoint, online_until)


class UsernameTaken(StorageError):
    pass


class Store(Protocol):
    def add_user(self, username: str, password_hash: bytes, bundle: KeyBundle, now: int) -> User:
        """Raises `UsernameTaken` if the name or the transport key is in use."""

    def get_user(self, username: str) -> User | None: ...

    def add_session(self, token_hash: bytes, user_id: int, expires_at: int, now: int) -> None:
        """Store a session (and drop the expired ones)."""

    def session_user(self, token_hash: bytes, now: int, extend_to: int) -> User | None:
        """The user of a live session, whose expiry slides towards `extend_to`."""

    def delete_session(self, token_hash: bytes) -> None: ...

    def set_online(self, user_id: int, endpoint: str, until: int) -> None: ...

    def set_offline(self, user_id: int) -> None: ...

    def unknown_users(self, usernames: Sequence[str]) -> list[str]: ...

    def add_file(self, owner_id: int, entry: FileEntry, access: Sequence[str] | None) -> None:
        """Store or replace a file; access None means every registered user."""

    def remove_file(self, file_id: str, owner_id: int) -> bool: ...

    def search(
        self, user_id: int, terms: Sequence[str], owner: str | None, limit: int, now: int
    ) -> list[Hit]: ...

    def visible_file(self, file_id: str, user_id: int) -> FileEntry | None: ...

    def online_holders(self, file_id: str, now: int) -> list[Presence]: ...

    def stats(self, now: int) -> Stats: ...

    def close(self) -> None: ...


SCHEMA_VERSION = 1
_EXPIRY_STEP = 300  # seconds

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash BLOB NOT NULL,
        rsa_public BLOB NOT NULL,
        curve_public BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE presence (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        endpoint TEXT NOT NULL,
        online_until INTEGER NOT NULL
    );
    CREATE TABLE files (
        file_id TEXT PRIMARY KEY,
        owner_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        keywords TEXT NOT NULL,  -- newline-separated
        manifest BLOB NOT NULL,
        signature BLOB NOT NULL,
        public INTEGER NOT NULL,  -- 1: every registered user may fetch it
        shared_at INTEGER NOT NULL
    );
    CREATE INDEX files_by_owner ON files(owner_id, shared_at);
    CREATE TABLE access (
        file_id TEXT NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (file_id, user_id)
    );
    CREATE INDEX access_by_user ON access(user_id);
    """,
}

_FILE_COLUMNS = (
    "f.file_id, u.username, f.name, f.size, f.keywords, f.manifest, f.signature, f.shared_at"
)
_VISIBLE = """(f.public = 1 OR f.owner_id = :me
    OR EXISTS (SELECT 1 FROM access a WHERE a.file_id = f.file_id AND a.user_id = :me))"""


def _like_escape(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _sql_lower(text: str | None) -> str | None:
    return None if text is None else str(text).lower()


def _file_entry(row: sqlite3.Row) -> FileEntry:
    keywords = [k for k in row[4].split("\n") if k]
    return FileEntry(row[0], row[1], row[2], row[3], keywords, row[5], row[6], row[7])


def _user(row: sqlite3.Row) -> User:
    return User(row[0], row[1], row[2], KeyBundle(row[3], row[4]))


class SqliteStore:
    """The embedded store. Safe to share between threads: each gets its own connection."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:  # password hashes live here: owner-only, like the key files
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StorageError(f"cannot open the database {path}: {exc.strerror}") from exc
        with self._transaction() as db:
            self._migrate(db)

    # --- connection handling -----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                # Each connection is used by its own thread only; check_same_thread=False
                # lets `close` release them all from the thread that shuts down.
                db = sqlite3.connect(
                    self._path, timeout=10, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
                # SQLite's lower() and LIKE fold ASCII only; search folds like Python does.
                db.create_function("sfs_lower", 1, _sql_lower, deterministic=True)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open the database {self._path}: {exc}") from exc
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"database error: {exc}") from exc
            raise

    def _query(
        self, sql: str, params: Sequence[object] | dict[str, object] = ()
    ) -> list[sqlite3.Row]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"database error: {exc}") from exc

    def _migrate(self, db: sqlite3.Connection) -> None:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"the database {self._path} has schema version {version}, newer than this "
                f"sfs-broker understands ({SCHEMA_VERSION}); upgrade sfs"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")

    def close(self) -> None:
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    # --- users and sessions ------------------------------------------------------------

    def add_user(self, username: str, password_hash: bytes, bundle: KeyBundle, now: int) -> User:
        try:
            with self._transaction() as db:
                cursor = db.execute(
                    "INSERT INTO users (username, password_hash, rsa_public, curve_public,"
                    " created_at) VALUES (?, ?, ?, ?, ?)",
                    (username, password_hash, bundle.rsa_public, bundle.curve_public, now),
                )
        except StorageError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise UsernameTaken(f"the username {username!r} is taken") from exc
            raise
        assert cursor.lastrowid is not None
        return User(cursor.lastrowid, username, password_hash, bundle)

    def get_user(self, username: str) -> User | None:
        rows = self._query(
            "SELECT id, username, password_hash, rsa_public, curve_public FROM users"
            " WHERE username = ?",
            (username,),
        )
        return _user(rows[0]) if rows else None

    def add_session(self, token_hash: bytes, user_id: int, expires_at: int, now: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            db.execute(
                "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
                (token_hash, user_id, expires_at),
            )

    def session_user(self, token_hash: bytes, now: int, extend_to: int) -> User | None:
        rows = self._query(
            "SELECT u.id, u.username, u.password_hash, u.rsa_public, u.curve_public,"
            " s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.token_hash = ? AND s.expires_at > ?",
            (token_hash, now),
        )
        if not rows:
            return None
        # Slide the expiry in coarse steps so that most requests stay read-only.
        if rows[0][5] < extend_to - _EXPIRY_STEP:
            with self._transaction() as db:
                db.execute(
                    "UPDATE sessions SET expires_at = ? WHERE token_hash = ?",
                    (extend_to, token_hash),
                )
        return _user(rows[0])

    def delete_session(self, token_hash: bytes) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    # --- presence ------------------------------------------------------------------------

    def set_online(self, user_id: int, endpoint: str, until: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO presence (user_id, endpoint, online_until) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET endpoint = excluded.endpoint,"
                " online_until = excluded.online_until",
                (user_id, endpoint, until),
            )

    def set_offline(self, user_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM presence WHERE user_id = ?", (user_id,))

    # --- files ---------------------------------------------------------------------------

    def unknown_users(self, usernames: Sequence[str]) -> list[str]:
        if not usernames:
            return []
        marks = ",".join("?" * len(usernames))
        rows = self._query(f"SELECT username FROM users WHERE username IN ({marks})", usernames)
        known = {row[0] for row in rows}
        return [name for name in usernames if name not in known]

    def add_file(self, owner_id: int, entry: FileEntry, access: Sequence[str] | None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO files (file_id, owner_id, name, size, keywords, manifest,"
                " signature, public, shared_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.file_id,
                    owner_id,
                    entry.name,
                    entry.size,
                    "\n".join(entry.keywords),
                    entry.manifest,
                    entry.signature,
                    int(access is None),
                    entry.shared_at,
                ),
            )
            db.execute("DELETE FROM access WHERE file_id = ?", (entry.file_id,))
            for username in access or ():
                db.execute(
                    "INSERT OR IGNORE INTO access (file_id, user_id)"
                    " SELECT ?, id FROM users WHERE username = ?",
                    (entry.file_id, username),
                )

    def remove_file(self, file_id: str, owner_id: int) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM files WHERE file_id = ? AND owner_id = ?", (file_id, owner_id)
            )
        return cursor.rowcount > 0

    def search(
        self, user_id: int, terms: Sequence[str], owner: str | None, limit: int, now: int
    ) -> list[Hit]:
        where = [_VISIBLE]
        params: dict[str, object] = {"me": user_id, "now": now, "limit": limit}
        for i, term in enumerate(terms):
            match = f"LIKE :t{i} ESCAPE '\\'"
            where.append(f"(sfs_lower(f.name) {match} OR sfs_lower(f.keywords) {match})")
            params[f"t{i}"] = _like_escape(term.lower())
        if owner is not None:
            where.append("u.username = :owner")
            params["owner"] = owner
        rows = self._query(
            f"SELECT {_FILE_COLUMNS}, EXISTS (SELECT 1 FROM presence p"
            " WHERE p.user_id = f.owner_id AND p.online_until > :now)"
            " FROM files f JOIN users u ON u.id = f.owner_id"
            f" WHERE {' AND '.join(where)} ORDER BY f.shared_at DESC, f.file_id LIMIT :limit",
            params,
        )
        return [Hit(_file_entry(row), bool(row[8])) for row in rows]

    def visible_file(self, file_id: str, user_id: int) -> FileEntry | None:
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files f JOIN users u ON u.id = f.owner_id"
            f" WHERE f.file_id = :file_id AND {_VISIBLE}",
            {"file_id": file_id, "me": user_id},
        )
        return _file_entry(rows[0]) if rows else None

    def online_holders(self, file_id: str, now: int) -> list[Presence]:
        # Today the owner is the only holder; multi-source download adds a holders table.
        rows = self._query(
            "SELECT u.username, p.endpoint, u.rsa_public, u.curve_public FROM files f"
            " JOIN users u ON u.id = f.owner_id JOIN presence p ON p.user_id = u.id"
            " WHERE f.file_id = ? AND p.online_until > ?",
            (file_id, now),
        )
        return [Presence(row[0], row[1], KeyBundle(row[2], row[3])) for row in rows]

    def stats(self, now: int) -> Stats:
        users = self._query(
            "SELECT u.username, EXISTS (SELECT 1 FROM presence p WHERE p.user_id = u.id"
            " AND p.online_until > ?) FROM users u ORDER BY u.username",
            (now,),
        )
        files = self._query("SELECT count(*) FROM files")[0][0]
        online = self._query(
            "SELECT u.username, p.endpoint, p.online_until FROM presence p"
            " JOIN users u ON u.id = p.user_id WHERE p.online_until > ? ORDER BY u.username",
            (now,),
        )
        return Stats(
            [(row[0], bool(row[1])) for row in users],
            files,
            [(row[0], row[1], row[2]) for row in online],
        )
