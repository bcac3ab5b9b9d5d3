"""The SQLite store: users, sessions, presence and the file index in one file.

`SqliteStore` is the embedded default (WAL mode, one connection per thread); it
implements `Store`, whose meaning `sfs.broker.store_contract` states. The schema is
created and versioned here; `SCHEMA_VERSION` grows with each migration in
`_MIGRATIONS`.

Search uses `file_search`, an FTS5 trigram index of each file's name and keywords
lowercased by Python's `str.lower` (FTS5's own folding differs: it leaves İ as it is and
turns a final sigma into a sigma), of its owner, and of its readers (schema 6): a code
per user who may see it, and one for every user when it is public, none while its owner
is disabled. A code is exactly one trigram (three CJK ideographs between separators), so
the index answers "visible to me" exactly: the budget counts no other files, and a user
who sees few of many files costs little. The phrase for "me or every user" is a list of
most files, though, and slow to intersect (3 ms at 200,000 files): so a search first
reads the rows the index hands out for its terms and checks each row's readers, and asks
the index for the readers only if that read `_SCAN_CAP` rows the caller may not see
first. Both ways give the same answer. Triggers on `files`, `access` and `users` keep
the codes in step.

The index's rowid is the file's `sort_key`: `shared_at` in the high bits, a counter for
the files of the same second in the low ones. FTS5 hands out matches in rowid order, so a
search reads them newest first and stops once it has `limit` hits or `budget`
candidates, a whole second at a time (the counter is the order of sharing, while search
order within a second is by file id: the last second the budget reaches is cut by id).

The index records which column holds a trigram, not where (`detail = column`): that
makes it smaller and its intersections about three times faster than with positions,
but it cannot match phrases. A term of 3 or more characters asks the index for the files
that hold every third of its trigrams and its last one, and `instr` on the lowercased
text then keeps those that hold the term itself, before they count as candidates. A
term of 2 characters (which no trigram holds) is looked up in `file_pairs` (schema 10):
each 2-character run of each file, with its sort key, in a b-tree; a row the index hands
out for the other terms is a candidate only if that table lists it too, and with no
other term the search walks the pair's list newest first. Terms of 1 character are
checked with `instr` on each candidate. (Schemas 2 to 5 also
looked short terms up in a table of every trigram; schema 6 drops it: which trigrams
exist depends on files a caller may not see.)

The table `usage` (schema 4) holds each user's number of files and bytes of manifests,
kept by triggers, so that `add_file` checks a `Quota` by reading one row in the same
transaction as the write.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sfs.broker.store_contract import (
    MAX_HOLDERS,
    SEARCH_BUDGET,
    Account,
    FileEntry,
    Found,
    Hit,
    IdMatch,
    Presence,
    Quota,
    QuotaExceeded,
    Stats,
    Store,
    User,
    UsernameTaken,
)
from sfs.broker.throttle import MemoryLimits
from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle
from sfs.common.tree import FOLDER_MARK, kind_and_files

# The contract's names, importable from here as before.
__all__ = [
    "MAX_HOLDERS",
    "SCHEMA_VERSION",
    "FileEntry",
    "Hit",
    "Presence",
    "Quota",
    "QuotaExceeded",
    "SqliteStore",
    "Stats",
    "Store",
    "User",
    "UsernameTaken",
    "add_sql_functions",
]


SCHEMA_VERSION = 10
_EXPIRY_STEP = 300  # seconds
_MIN_SQLITE = (3, 34, 0)  # the FTS5 trigram tokenizer

# sort_key = clamp(shared_at) << _SEQ_BITS | n-th file shared in that second.
_SEQ_BITS = 22
_MAX_SECOND = (1 << 40) - 1  # keeps sort_key below 2**62
# Indexed text ends with two of these, so that every character of it starts a trigram.
# Whitespace to str.split, so never in a term from the service (it splits the query).
_PAD = "\x1f"
# Who may see a file, in the index's `readers` column: `_PUBLIC` for every user, and the
# code of each reader (`_reader`). A code is 3 characters between separators, so that it
# is exactly one trigram of the index and no trigram across two codes looks like one.
_PUBLIC = "\x1epub\x1e"
_CODE_BASE, _CODE_FIRST = 0x5000, 0x4E00  # CJK ideographs: never "pub"
# `f` a file, `u` its owner: the readers' codes, none while the owner is disabled.
_READERS = f"""CASE WHEN u.disabled THEN '' ELSE
    (CASE WHEN f.public THEN '{_PUBLIC}' ELSE '' END) || sfs_reader(f.owner_id)
    || coalesce((SELECT group_concat(sfs_reader(a.user_id), '') FROM access a
        WHERE a.file_id = f.file_id), '')
    END"""

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
    2: f"""
    ALTER TABLE files ADD COLUMN sort_key INTEGER;
    UPDATE files SET sort_key = keyed.sort_key FROM (
        SELECT file_id, (second << {_SEQ_BITS})
            + row_number() OVER (PARTITION BY second ORDER BY file_id) - 1 AS sort_key
        FROM (SELECT file_id, min(max(shared_at, 0), {_MAX_SECOND}) AS second FROM files)
    ) AS keyed WHERE files.file_id = keyed.file_id;
    CREATE UNIQUE INDEX files_by_sort_key ON files(sort_key);
    DROP INDEX files_by_owner;
    CREATE INDEX files_by_owner ON files(owner_id, sort_key);
    CREATE VIRTUAL TABLE file_search USING fts5(
        name, keywords, owner,
        tokenize = 'trigram case_sensitive 1', detail = column, columnsize = 0
    );
    INSERT INTO file_search (rowid, name, keywords, owner)
        SELECT sort_key, sfs_search_text(name), sfs_search_text(keywords), '<' || owner_id || '>'
        FROM files;
    -- Every trigram ever indexed (never pruned), to look up those a short term starts.
    CREATE TABLE search_trigrams (trigram TEXT PRIMARY KEY) WITHOUT ROWID;
    INSERT OR IGNORE INTO search_trigrams
        SELECT value FROM files, json_each(sfs_trigrams(files.name, files.keywords));
    -- Rows of `files` are never updated, only inserted and deleted (add_file replaces).
    CREATE TRIGGER file_search_insert AFTER INSERT ON files BEGIN
        UPDATE files SET sort_key = (
            SELECT coalesce(
                (SELECT f.sort_key + 1 FROM files f
                    WHERE f.sort_key BETWEEN s.first AND s.first + {(1 << _SEQ_BITS) - 1}
                    ORDER BY f.sort_key DESC LIMIT 1),
                s.first)
            FROM (SELECT min(max(new.shared_at, 0), {_MAX_SECOND}) << {_SEQ_BITS} AS first) s
        ) WHERE rowid = new.rowid;
        SELECT RAISE(ABORT, 'too many files shared in the same second')
            FROM files WHERE rowid = new.rowid
            AND sort_key >> {_SEQ_BITS} != min(max(new.shared_at, 0), {_MAX_SECOND});
        INSERT INTO file_search (rowid, name, keywords, owner)
            SELECT sort_key, sfs_search_text(new.name), sfs_search_text(new.keywords),
                '<' || new.owner_id || '>'
            FROM files WHERE rowid = new.rowid;
        INSERT OR IGNORE INTO search_trigrams
            SELECT value FROM json_each(sfs_trigrams(new.name, new.keywords));
    END;
    CREATE TRIGGER file_search_delete AFTER DELETE ON files BEGIN
        DELETE FROM file_search WHERE rowid = old.sort_key;
    END;
    """,
    3: """
    -- The owner's signature over the access list, and that list exactly as signed
    -- (JSON; NULL for every user): seeders check the one against the other.
    ALTER TABLE files ADD COLUMN grant_signature BLOB NOT NULL DEFAULT x'';
    ALTER TABLE files ADD COLUMN signed_access TEXT;
    -- Peers that downloaded a file and serve their copy (seeders); the owner is not here.
    CREATE TABLE holders (
        file_id TEXT NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (file_id, user_id)
    );
    CREATE INDEX holders_by_user ON holders(user_id);
    """,
    4: """
    -- What each user's files take, for the quota: kept by triggers, so that checking it
    -- costs one row however many files the user shares.
    CREATE TABLE usage (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        files INTEGER NOT NULL,
        manifest_bytes INTEGER NOT NULL
    );
    INSERT INTO usage (user_id, files, manifest_bytes)
        SELECT owner_id, count(*), sum(length(manifest)) FROM files GROUP BY owner_id;
    CREATE TRIGGER usage_insert AFTER INSERT ON files BEGIN
        INSERT INTO usage (user_id, files, manifest_bytes)
            VALUES (new.owner_id, 1, length(new.manifest))
            ON CONFLICT (user_id) DO UPDATE SET files = files + 1,
                manifest_bytes = manifest_bytes + length(new.manifest);
    END;
    CREATE TRIGGER usage_delete AFTER DELETE ON files BEGIN
        UPDATE usage SET files = files - 1, manifest_bytes = manifest_bytes - length(old.manifest)
            WHERE user_id = old.owner_id;
    END;
    """,
    5: """
    -- An operator's `sfs-broker user disable`: refused and unlisted, nothing deleted.
    ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    """,
    6: """
    -- The caches' generation (sfs.broker.cache): every change that a cached session or
    -- lookup depends on adds one, in the writer's transaction, whoever writes (any broker,
    -- `sfs-broker user ...`). Presence counts when a user appears, goes or moves: a
    -- heartbeat that only renews does not.
    CREATE TABLE generation (n INTEGER NOT NULL);
    INSERT INTO generation (n) VALUES (0);
    CREATE TRIGGER generation_sessions AFTER DELETE ON sessions BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_users_update AFTER UPDATE ON users BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_users_delete AFTER DELETE ON users BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_files_insert AFTER INSERT ON files BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_files_update AFTER UPDATE ON files BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_files_delete AFTER DELETE ON files BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_access_insert AFTER INSERT ON access BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_access_delete AFTER DELETE ON access BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_holders_insert AFTER INSERT ON holders BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_holders_delete AFTER DELETE ON holders BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_presence_insert AFTER INSERT ON presence BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_presence_delete AFTER DELETE ON presence BEGIN
        UPDATE generation SET n = n + 1; END;
    CREATE TRIGGER generation_presence_move AFTER UPDATE ON presence
        WHEN old.endpoint IS NOT new.endpoint BEGIN
        UPDATE generation SET n = n + 1; END;
    """,
    7: f"""
    -- Search reads only what its caller may see: the index gets a column of each file's
    -- readers (FTS5 cannot add one: it is built again), kept by triggers on files, access
    -- and users. The owner column holds the owner's reader code, so a filter is exact.
    -- Short terms no longer stand for trigrams: their table goes.
    DROP TRIGGER file_search_insert;
    DROP TRIGGER file_search_delete;
    DROP TABLE file_search;
    DROP TABLE search_trigrams;
    CREATE VIRTUAL TABLE file_search USING fts5(
        name, keywords, owner, readers,
        tokenize = 'trigram case_sensitive 1', detail = column, columnsize = 0
    );
    INSERT INTO file_search (rowid, name, keywords, owner, readers)
        SELECT f.sort_key, sfs_search_text(f.name), sfs_search_text(f.keywords),
            sfs_reader(f.owner_id), {_READERS}
        FROM files f JOIN users u ON u.id = f.owner_id;
    -- Rows of `files` are never updated, only inserted and deleted (add_file replaces).
    CREATE TRIGGER file_search_insert AFTER INSERT ON files BEGIN
        UPDATE files SET sort_key = (
            SELECT coalesce(
                (SELECT f.sort_key + 1 FROM files f
                    WHERE f.sort_key BETWEEN s.first AND s.first + {(1 << _SEQ_BITS) - 1}
                    ORDER BY f.sort_key DESC LIMIT 1),
                s.first)
            FROM (SELECT min(max(new.shared_at, 0), {_MAX_SECOND}) << {_SEQ_BITS} AS first) s
        ) WHERE rowid = new.rowid;
        SELECT RAISE(ABORT, 'too many files shared in the same second')
            FROM files WHERE rowid = new.rowid
            AND sort_key >> {_SEQ_BITS} != min(max(new.shared_at, 0), {_MAX_SECOND});
        INSERT INTO file_search (rowid, name, keywords, owner, readers)
            SELECT f.sort_key, sfs_search_text(f.name), sfs_search_text(f.keywords),
                sfs_reader(f.owner_id), {_READERS}
            FROM files f JOIN users u ON u.id = f.owner_id WHERE f.rowid = new.rowid;
    END;
    CREATE TRIGGER file_search_delete AFTER DELETE ON files BEGIN
        DELETE FROM file_search WHERE rowid = old.sort_key;
    END;
    -- An access row added or removed (a user deleted), an owner disabled or enabled:
    -- the file's readers again. A file deleted takes its access rows after its index row.
    CREATE TRIGGER readers_access_insert AFTER INSERT ON access BEGIN
        UPDATE file_search SET readers = (
            SELECT {_READERS} FROM files f JOIN users u ON u.id = f.owner_id
            WHERE f.sort_key = file_search.rowid
        ) WHERE rowid = (SELECT sort_key FROM files WHERE file_id = new.file_id);
    END;
    CREATE TRIGGER readers_access_delete AFTER DELETE ON access BEGIN
        UPDATE file_search SET readers = (
            SELECT {_READERS} FROM files f JOIN users u ON u.id = f.owner_id
            WHERE f.sort_key = file_search.rowid
        ) WHERE rowid = (SELECT sort_key FROM files WHERE file_id = old.file_id);
    END;
    CREATE TRIGGER readers_owner_disabled AFTER UPDATE OF disabled ON users BEGIN
        UPDATE file_search SET readers = (
            SELECT {_READERS} FROM files f JOIN users u ON u.id = f.owner_id
            WHERE f.sort_key = file_search.rowid
        ) WHERE rowid IN (SELECT sort_key FROM files WHERE owner_id = new.id);
    END;
    """,
    8: f"""
    -- A file row whose public flag changes in place (nothing in sfs does so today, but a
    -- restore or an operator may): its readers again, so the index never disagrees.
    CREATE TRIGGER readers_file_public AFTER UPDATE OF public ON files BEGIN
        UPDATE file_search SET readers = (
            SELECT {_READERS} FROM files f JOIN users u ON u.id = f.owner_id
            WHERE f.sort_key = file_search.rowid
        ) WHERE rowid = new.sort_key;
    END;
    """,
    9: f"""
    -- A share's kind and number of files, from its owner-signed tree header, for search.
    -- Existing rows: read from their stored header (a file header always says one file; a
    -- manifest from before tree headers is a file), decoding only those that may be folders.
    ALTER TABLE files ADD COLUMN kind TEXT NOT NULL DEFAULT 'file';
    ALTER TABLE files ADD COLUMN file_count INTEGER NOT NULL DEFAULT 1;
    UPDATE files SET kind = 'folder', file_count = sfs_header_files(manifest)
        WHERE instr(manifest, X'{FOLDER_MARK.hex()}') AND sfs_header_kind(manifest) = 'folder';
    """,
    10: """
    -- Each 2-character run of a file's folded name and of its folded keywords, as a
    -- number (`_pair_code`), with the file's sort key: a 2-character term's files, newest
    -- first (FTS5's trigrams cannot hold them). Kept by triggers: the insert trigger of
    -- schema 7 gives a new row its sort key by an UPDATE, which this one follows.
    CREATE TABLE file_pairs (
        pair INTEGER NOT NULL,
        sort_key INTEGER NOT NULL,
        PRIMARY KEY (pair, sort_key)
    ) WITHOUT ROWID;
    INSERT INTO file_pairs (pair, sort_key)
        SELECT p.value, f.sort_key FROM files f, json_each(sfs_pairs(f.name, f.keywords)) p
        ORDER BY 1, 2;
    CREATE TRIGGER file_pairs_keyed AFTER UPDATE OF sort_key ON files BEGIN
        DELETE FROM file_pairs WHERE sort_key = old.sort_key
            AND pair IN (SELECT value FROM json_each(sfs_pairs(old.name, old.keywords)));
        INSERT INTO file_pairs (pair, sort_key)
            SELECT value, new.sort_key FROM json_each(sfs_pairs(new.name, new.keywords))
            WHERE new.sort_key IS NOT NULL;
    END;
    CREATE TRIGGER file_pairs_delete AFTER DELETE ON files BEGIN
        DELETE FROM file_pairs WHERE sort_key = old.sort_key
            AND pair IN (SELECT value FROM json_each(sfs_pairs(old.name, old.keywords)));
    END;
    """,
}

_FILE_COLUMNS = (
    "f.file_id, u.username, f.name, f.size, f.keywords, f.manifest, f.signature, f.shared_at,"
    " f.grant_signature, f.kind, f.file_count"
)
# `u` is the file's owner (every query that uses this joins it): a disabled one's files
# are nobody's to see.
_VISIBLE = """(u.disabled = 0 AND (f.public = 1 OR f.owner_id = :me
    OR EXISTS (SELECT 1 FROM access a WHERE a.file_id = f.file_id AND a.user_id = :me)))"""


# Rows the caller may not see that a search reads from the index by its terms alone,
# checking the readers of each, before it asks the index for the caller's readers
# instead (see `SqliteStore.search`).
_SCAN_CAP = 2_000
# How long a count of the files that hold a trigram is kept (`_rows_holding`), and how
# many are kept at most (a broker's searches use some thousands of trigrams).
_HOLDING_AGE = 600.0
# Counted up to this many: fts5vocab's exact count reads the whole list, 8-15 ms for the
# most common trigrams at 1M files, where their first 10,000 rows take ~1 ms.
_HOLDING_COUNTED = 10_000
# Trigrams a search counts at most (a query may hold ~200): the others count as common.
_COUNTS_PER_SEARCH = 12
_HOLDING_KEPT = 100_000


class _TooManyRows(Exception):
    pass


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script; a `;` inside a trigger body does not end one."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def _cover(text: str) -> list[str]:
    """Trigrams that between them cover `text` (3 characters or more): every third one,
    and the last."""
    return [text[i : i + 3] for i in [*range(0, len(text) - 3, 3), len(text) - 3]]


def _fts_match(columns: str, trigrams: list[str], operator: str) -> str:
    """An FTS5 query for all (`operator` AND) or any (OR) of the trigrams in `columns`."""
    quoted = ['"' + t.replace('"', '""') + '"' for t in trigrams]
    return f"{columns} : ({f' {operator} '.join(quoted)})"


def _sql_lower(text: str | None) -> str | None:
    return None if text is None else str(text).lower()


def _search_text(text: str | None) -> str:
    return f"{_sql_lower(text) or ''}{_PAD * 2}"


def _trigrams(*texts: str | None) -> str:
    """The distinct trigrams of the texts as indexed, as a JSON list."""
    found = {t[i : i + 3] for t in map(_search_text, texts) for i in range(len(t) - 2)}
    return json.dumps(sorted(found))


def _pair_code(pair: str) -> int:
    """Two characters as `file_pairs` holds them: their code points side by side."""
    return ord(pair[0]) << 21 | ord(pair[1])


def _pairs(*texts: str | None) -> str:
    """The distinct 2-character runs of the texts, lowercased, as a JSON list of codes."""
    found = {
        _pair_code(t[i : i + 2]) for t in map(_sql_lower, texts) if t for i in range(len(t) - 1)
    }
    return json.dumps(sorted(found))


def _reader(user_id: int) -> str:
    """A user's code in the index's `readers` and `owner` columns (see `_PUBLIC`)."""
    if not 0 <= user_id < _CODE_BASE**3:
        raise ValueError(f"user id {user_id} is out of the search index's range")
    digits = (user_id // _CODE_BASE**2, user_id // _CODE_BASE % _CODE_BASE, user_id % _CODE_BASE)
    return "\x1e" + "".join(chr(_CODE_FIRST + d) for d in digits) + "\x1e"


def _header_kind(manifest: bytes) -> str:
    return kind_and_files(manifest)[0]


def _header_files(manifest: bytes) -> int:
    return kind_and_files(manifest)[1]


def _file_entry(row: sqlite3.Row) -> FileEntry:
    keywords = [k for k in row[4].split("\n") if k]
    return FileEntry(
        row[0], row[1], row[2], row[3], keywords, row[5], row[6], row[7], row[8], row[9], row[10]
    )


def _user(row: sqlite3.Row, disabled: bool = False) -> User:
    return User(row[0], row[1], row[2], KeyBundle(row[3], row[4]), disabled)


def add_sql_functions(db: sqlite3.Connection) -> None:
    """The functions the schema's triggers and the search call: every connection that
    writes to `files` needs them."""
    # SQLite's lower() and LIKE fold ASCII only; search folds like Python does.
    db.create_function("sfs_lower", 1, _sql_lower, deterministic=True)
    db.create_function("sfs_search_text", 1, _search_text, deterministic=True)
    db.create_function("sfs_trigrams", 2, _trigrams, deterministic=True)  # schema 2 to 5
    db.create_function("sfs_reader", 1, _reader, deterministic=True)
    db.create_function("sfs_pairs", 2, _pairs, deterministic=True)  # schema 10
    db.create_function("sfs_header_kind", 1, _header_kind, deterministic=True)  # schema 9
    db.create_function("sfs_header_files", 1, _header_files, deterministic=True)


class SqliteStore:
    """The embedded store. Safe to share between threads: each gets its own connection."""

    def __init__(self, path: Path) -> None:
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StorageError(
                "sfs-broker needs SQLite 3.34 or newer (the search index uses the FTS5 trigram"
                f" tokenizer); this Python has SQLite {sqlite3.sqlite_version}"
            )
        self._path = path
        self._limits = MemoryLimits()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # trigram -> (files holding it, when counted): which trigrams a search asks for.
        self._holding: dict[str, tuple[int, float]] = {}
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
                add_sql_functions(db)
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
            for statement in _statements(_MIGRATIONS[target]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")

    def limit_state(self) -> MemoryLimits:
        """In this process: an SQLite index serves one broker."""
        return self._limits

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
            "SELECT id, username, password_hash, rsa_public, curve_public, disabled FROM users"
            " WHERE username = ?",
            (username,),
        )
        return _user(rows[0], bool(rows[0][5])) if rows else None

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
            " WHERE s.token_hash = ? AND s.expires_at > ? AND u.disabled = 0",
            (token_hash, now),
        )
        if not rows:
            return None
        # Slide the expiry in coarse steps so that most requests stay read-only; steps
        # of at most a tenth of the lifetime, so that short sessions slide too.
        step = min(_EXPIRY_STEP, max(1, (extend_to - now) // 10))
        if rows[0][5] < extend_to - step:
            with self._transaction() as db:
                db.execute(
                    "UPDATE sessions SET expires_at = ? WHERE token_hash = ?",
                    (extend_to, token_hash),
                )
        return _user(rows[0])

    def generation(self) -> int:
        return int(self._query("SELECT n FROM generation")[0][0])

    def delete_session(self, token_hash: bytes) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    # --- presence ------------------------------------------------------------------------

    def set_online(self, user_id: int, endpoint: str, until: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO presence (user_id, endpoint, online_until)"
                " SELECT id, ?, ? FROM users WHERE id = ? AND disabled = 0"
                " ON CONFLICT (user_id) DO UPDATE SET endpoint = excluded.endpoint,"
                " online_until = excluded.online_until",
                (endpoint, until, user_id),
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

    def add_file(
        self,
        owner_id: int,
        entry: FileEntry,
        access: Sequence[str] | None,
        quota: Quota | None = None,
    ) -> None:
        with self._transaction() as db:
            if quota is not None:
                self._check_quota(db, owner_id, entry, quota)
            # Not INSERT OR REPLACE: the rows it replaces would bypass the delete trigger.
            # The old access list goes with the old row (ON DELETE CASCADE).
            db.execute("DELETE FROM files WHERE file_id = ?", (entry.file_id,))
            # The access list before the file (its foreign key checked at COMMIT), so that
            # the insert trigger indexes the file with all its readers at once.
            db.execute("PRAGMA defer_foreign_keys = ON")
            for username in access or ():
                db.execute(
                    "INSERT OR IGNORE INTO access (file_id, user_id)"
                    " SELECT ?, id FROM users WHERE username = ?",
                    (entry.file_id, username),
                )
            db.execute(
                "INSERT INTO files (file_id, owner_id, name, size, keywords, manifest,"
                " signature, public, shared_at, grant_signature, signed_access, kind,"
                " file_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    entry.grant,
                    None if access is None else json.dumps(list(access)),
                    entry.kind,
                    entry.files,
                ),
            )

    @staticmethod
    def _check_quota(db: sqlite3.Connection, owner_id: int, entry: FileEntry, quota: Quota) -> None:
        used = db.execute(
            "SELECT files, manifest_bytes FROM usage WHERE user_id = ?", (owner_id,)
        ).fetchone()
        files, size = used or (0, 0)
        replaced = db.execute(  # sharing a manifest again replaces it: it counts once
            "SELECT length(manifest) FROM files WHERE file_id = ? AND owner_id = ?",
            (entry.file_id, owner_id),
        ).fetchone()
        if replaced is not None:
            files, size = files - 1, size - replaced[0]
        if files >= quota.files or size + len(entry.manifest) > quota.manifest_bytes:
            raise QuotaExceeded(files, size, len(entry.manifest))

    def remove_file(self, file_id: str, owner_id: int) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM files WHERE file_id = ? AND owner_id = ?", (file_id, owner_id)
            )
        return cursor.rowcount > 0

    def search(
        self,
        user_id: int,
        terms: Sequence[str],
        owner: str | None,
        limit: int,
        now: int,
        budget: int = SEARCH_BUDGET,
    ) -> Found:
        params: dict[str, object] = {"now": now, "budget": budget, "me": user_id}
        mine = _reader(user_id)
        params["public"], params["mine"] = _PUBLIC, mine
        # `match`: FTS5 query parts, all of which must match; `exact`: checks of each row
        # the index hands out, before it counts as a candidate; `short`: checks of each
        # candidate (terms of 1 character, which no index narrows); `pairs`: the codes of
        # the 2-character terms, whose files `file_pairs` lists.
        match: list[str] = []
        exact, short, indexed, pairs = [], [], [], []
        for i, term in enumerate(term.lower() for term in terms):
            params[f"t{i}"] = term
            if len(term) == 2:
                params[f"p{i}"] = _pair_code(term)
                pairs.append(f":p{i}")
                continue
            name, keywords = "s.name", "s.keywords"
            if _PAD in term:  # never in a term from the service, which splits on whitespace
                name, keywords = (f"substr({c}, 1, length({c}) - 2)" for c in (name, keywords))
            holds = f"(instr({name}, :t{i}) OR instr({keywords}, :t{i}))"
            if len(term) < 2:
                short.append(holds)
                continue
            if _PAD not in term:
                indexed.append(term)
            if len(term) > 3 or _PAD in term:
                exact.append(holds)
        if indexed:
            # Files that hold the terms hold these trigrams; instr drops those that hold
            # them elsewhere than side by side.
            match.append(_fts_match("{name keywords}", self._narrowing(indexed), "AND"))
        if owner is not None:
            found = self._query("SELECT id FROM users WHERE username = ?", (owner,))
            if not found:
                return Found()
            match.append(_fts_match("owner", [_reader(found[0][0])[1:-1]], "AND"))
        # The candidates: the visible files that hold every long term, newest first.
        # Two ways to the same rows: the index's readers phrase, exact but slow when the
        # caller sees most files (its list is most of the index); or the rows the index
        # hands out for the terms, with the readers checked on each, which is fast unless
        # the caller sees few of them. The second first, until it read `_SCAN_CAP` rows
        # the caller cannot see.
        hold_short = " AND ".join(short) or "1"
        readers = _fts_match("readers", [_PUBLIC[1:-1], mine[1:-1]], "OR")
        ways = [
            (match, "instr(s.readers, :public) OR instr(s.readers, :mine)", _SCAN_CAP),
            ([*match, readers], "1", None),
        ]
        for parts, visible, cap in ways:
            params["match"] = " AND ".join(parts)
            held = [
                f"EXISTS (SELECT 1 FROM file_pairs p WHERE p.pair = {pair}"
                " AND p.sort_key = s.rowid)"
                for pair in pairs
            ]
            if parts or not pairs:
                source, order = "file_search s", "s.rowid"
                source += " WHERE file_search MATCH :match" if parts else " WHERE 1"
            else:  # the first pair's files, newest first, each looked up in the index
                source = (
                    "file_pairs d CROSS JOIN file_search s ON s.rowid = d.sort_key"
                    f" WHERE d.pair = {pairs[0]}"
                )
                order, held = "d.sort_key", held[1:]
            checks = " AND ".join(exact) or "1"
            if held:  # first (CASE: SQLite would test them last): reads no text
                checks = f"CASE WHEN {' AND '.join(held)} THEN {checks} ELSE 0 END"
            candidates = (
                f"SELECT s.rowid AS k, s.name, s.keywords, s.readers FROM {source}"
                f" AND {checks} ORDER BY {order} DESC"
            )
            sql = f"SELECT s.k, {hold_short}, {visible} FROM ({candidates}) s"
            if (examined := self._examine(sql, params, limit, budget, cap)) is not None:
                break
        keys, partial = examined or ([], False)  # (the second way has no cap)
        rows = self._query(
            f"SELECT {_FILE_COLUMNS}, EXISTS (SELECT 1 FROM presence p"
            " WHERE p.user_id = f.owner_id AND p.online_until > :now)"
            " FROM files f JOIN users u ON u.id = f.owner_id"
            " WHERE f.sort_key IN (SELECT value FROM json_each(:keys))"
            # The index's readers decide; the rule itself, on the hits, to be sure.
            f" AND {_VISIBLE}",
            {"keys": json.dumps(keys), "me": user_id, "now": now},
        )
        rows.sort(key=lambda row: (-row[7], row[0]))
        return Found([Hit(_file_entry(row), bool(row[11])) for row in rows[:limit]], partial)

    def _narrowing(self, terms: list[str]) -> list[str]:
        """The trigrams a search asks the index for (terms of 3 characters or more): for
        one term, every third one and the last (`_cover`); for several, the rarest of
        each one's cover. FTS5 intersects the lists of all it is given before it hands out a row, so
        fewer and rarer lists are faster: two common words took 4-14 ms with the covers
        of both, 1-2 ms so. Counting costs ~1 ms a trigram the first time, too much for
        one term, whose cover is as good."""
        if len(terms) == 1:
            return _cover(terms[0])
        counts = _COUNTS_PER_SEARCH  # bounds the work a long query can ask for

        def rarity(trigram: str) -> tuple[int, str]:
            nonlocal counts
            known = self._holding.get(trigram)
            if known is not None and time.monotonic() - known[1] < _HOLDING_AGE:
                return known[0], trigram
            if counts == 0:
                return _HOLDING_COUNTED, trigram  # as if common
            counts -= 1
            return self._rows_holding(trigram), trigram

        return list(dict.fromkeys(min(_cover(term), key=rarity) for term in terms))

    def _rows_holding(self, trigram: str) -> int:
        """How many files hold `trigram`, up to `_HOLDING_COUNTED`, kept for
        `_HOLDING_AGE` seconds (a guess of speed only: the answers never depend on it).
        Counting reads that much of the trigram's list, ~1 ms at 1M files."""
        row = self._query(
            "SELECT count(*) FROM (SELECT 1 FROM file_search WHERE file_search MATCH ? LIMIT ?)",
            (_fts_match("{name keywords}", [trigram], "AND"), _HOLDING_COUNTED),
        )
        count = int(row[0][0])
        if len(self._holding) >= _HOLDING_KEPT:
            self._holding.clear()
        self._holding[trigram] = (count, time.monotonic())
        return count

    def _examine(
        self, sql: str, params: dict[str, object], limit: int, budget: int, cap: int | None
    ) -> tuple[list[int], bool] | None:
        """Read the candidates (`sql`: sort key, whether the file holds the short terms,
        whether the caller sees it; newest first) one second at a time, until `limit`
        hits or `budget` candidates; the sort keys of the hits, and whether the budget
        stopped it (`partial`). None if it read more than `cap` rows the caller may not
        see first (so at most `budget` + `cap` rows in all). Within a
        second the index hands out files as they were shared, while the budget takes
        them by file id: so it reads whole seconds, and cuts the last one by file id."""
        hits: list[int] = []
        examined = 0
        hidden = 0  # rows the caller may not see: what the cap bounds

        def visible(rows: Iterable[sqlite3.Row]) -> Iterator[sqlite3.Row]:
            nonlocal hidden
            for row in rows:
                if row[2]:
                    yield row
                    continue
                hidden += 1
                if cap is not None and hidden > cap:
                    raise _TooManyRows

        try:
            cursor = self._connection().execute(sql, params)
            try:
                rows = visible(cursor)
                for _, group in itertools.groupby(rows, key=lambda row: row[0] >> _SEQ_BITS):
                    if len(hits) >= limit:
                        return hits, False
                    if examined >= budget:
                        return hits, True  # a candidate past the budget
                    second = list(group)
                    if examined + len(second) > budget:
                        second = self._first_in_order(second, budget - examined)
                        hits += [row[0] for row in second if row[1]]
                        return hits, len(hits) < limit  # the rest of the second is past it
                    examined += len(second)
                    hits += [row[0] for row in second if row[1]]
            finally:
                cursor.close()
        except _TooManyRows:
            return None
        except sqlite3.Error as exc:
            raise StorageError(f"database error: {exc}") from exc
        return hits, False

    def _first_in_order(self, rows: list[sqlite3.Row], count: int) -> list[sqlite3.Row]:
        """The first `count` rows (sort key first) in search order: by file id, after
        `shared_at` for the times before 1970 that share the key's second 0."""
        by_key = {row[0]: row for row in rows}
        ids = self._query(
            "SELECT file_id, sort_key FROM files WHERE sort_key IN"
            " (SELECT value FROM json_each(?)) ORDER BY shared_at DESC, file_id LIMIT ?",
            (json.dumps(list(by_key)), count),
        )
        return [by_key[key] for _, key in ids]

    def visible_file(self, file_id: str, user_id: int) -> FileEntry | None:
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files f JOIN users u ON u.id = f.owner_id"
            f" WHERE f.file_id = :file_id AND {_VISIBLE}",
            {"file_id": file_id, "me": user_id},
        )
        return _file_entry(rows[0]) if rows else None

    def files_by_prefix(self, user_id: int, prefix: str, limit: int) -> list[IdMatch]:
        # A range scan of the primary key: ids are lowercase hex, so every id that
        # starts with the prefix sorts before the prefix followed by "g".
        rows = self._query(
            "SELECT f.file_id, u.username, f.name FROM files f JOIN users u ON u.id = f.owner_id"
            f" WHERE f.file_id >= :low AND f.file_id < :high AND {_VISIBLE}"
            " ORDER BY f.file_id LIMIT :limit",
            {"low": prefix, "high": prefix + "g", "me": user_id, "limit": limit},
        )
        return [IdMatch(row[0], row[1], row[2]) for row in rows]

    def online_holders(self, file_id: str, now: int) -> list[Presence]:
        """The owner, if online, then the online seeders: at most `MAX_HOLDERS`."""
        online = "JOIN presence p ON p.user_id = u.id AND p.online_until > :now AND u.disabled = 0"
        columns = "u.username, p.endpoint, u.rsa_public, u.curve_public, p.online_until"
        owner = self._query(
            f"SELECT {columns} FROM files f JOIN users u ON u.id = f.owner_id {online}"
            " WHERE f.file_id = :file_id",
            {"file_id": file_id, "now": now},
        )
        seeders = self._query(
            f"SELECT {columns} FROM holders h JOIN users u ON u.id = h.user_id {online}"
            " WHERE h.file_id = :file_id ORDER BY p.online_until DESC LIMIT :limit",
            {"file_id": file_id, "now": now, "limit": MAX_HOLDERS - len(owner)},
        )
        return [
            Presence(row[0], row[1], KeyBundle(row[2], row[3]), row[4]) for row in owner + seeders
        ]

    def signed_access(self, file_id: str) -> list[str] | None:
        """The access list as the owner signed it; None for every user."""
        rows = self._query("SELECT signed_access FROM files WHERE file_id = ?", (file_id,))
        if not rows or rows[0][0] is None:
            return None
        return list(json.loads(rows[0][0]))

    def add_holder(self, file_id: str, user_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO holders (file_id, user_id) VALUES (?, ?)",
                (file_id, user_id),
            )

    def remove_holder(self, file_id: str, user_id: int) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM holders WHERE file_id = ? AND user_id = ?", (file_id, user_id)
            )
            return cursor.rowcount > 0

    def stats(self, now: int) -> Stats:
        users = self._query(
            "SELECT u.username, u.disabled = 0 AND EXISTS (SELECT 1 FROM presence p"
            " WHERE p.user_id = u.id AND p.online_until > ?) FROM users u ORDER BY u.username",
            (now,),
        )
        files = self._query("SELECT count(*) FROM files")[0][0]
        online = self._query(
            "SELECT u.username, p.endpoint, p.online_until FROM presence p"
            " JOIN users u ON u.id = p.user_id WHERE p.online_until > ? AND u.disabled = 0"
            " ORDER BY u.username",
            (now,),
        )
        return Stats(
            [(row[0], bool(row[1])) for row in users],
            files,
            [(row[0], row[1], row[2]) for row in online],
        )

    # --- operators -----------------------------------------------------------------------

    def accounts(self, now: int) -> list[Account]:
        rows = self._query(
            "SELECT u.username, u.created_at, coalesce(g.files, 0), u.disabled = 0 AND EXISTS"
            " (SELECT 1 FROM presence p WHERE p.user_id = u.id AND p.online_until > ?),"
            " u.disabled FROM users u LEFT JOIN usage g ON g.user_id = u.id"
            " ORDER BY u.username",
            (now,),
        )
        return [Account(r[0], r[1], r[2], bool(r[3]), bool(r[4])) for r in rows]

    def set_disabled(self, username: str, disabled: bool) -> bool:
        with self._transaction() as db:
            found = db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
            if found is None:
                return False
            db.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), found[0]))
            if disabled:
                db.execute("DELETE FROM sessions WHERE user_id = ?", (found[0],))
                db.execute("DELETE FROM presence WHERE user_id = ?", (found[0],))
        return True

    def delete_user(self, username: str) -> bool:
        with self._transaction() as db:
            found = db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
            if found is None:
                return False
            # Its files first, one statement each, so that the search index's triggers
            # see them go; the rest goes with the user (ON DELETE CASCADE).
            db.execute("DELETE FROM files WHERE owner_id = ?", (found[0],))
            db.execute("DELETE FROM users WHERE id = ?", (found[0],))
        return True
