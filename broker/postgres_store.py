"""The PostgreSQL store: the index on a database server, shared by several brokers.

`PostgresStore` implements `Store` (`sfs.broker.store_contract` says what each method
means) with psycopg 3 and a connection pool; every value is a bound parameter. The
broker creates and migrates the schema itself, under an advisory lock so that brokers
starting together migrate once; `sfs_schema` holds the version.

Search folds case in Python (`str.lower`, as the SQLite store does): `files` keeps the
folded name and keywords beside the originals, and a term is looked for with LIKE in
them. PostgreSQL's `lower()` folds by the database's locale and differs from Python's,
so it is never used. pg_trgm GIN indexes on the folded columns let LIKE '%term%' skip
files without the term's trigrams (terms of 3 characters or more); LIKE itself then
decides, so the index changes speed only, never answers. `files.readers` lists who may
see a file (0 for every user; empty while the owner is disabled), with a GIN index: a
search's candidates are the files whose readers include the caller or 0 and that hold
every term of 2 characters or more, newest first, at most the search's budget
(`SEARCH_BUDGET`); 1-character terms are checked on each of them.

The store, not the planner, chooses how a search reaches its candidates (the planner
cannot tell how common a term is among the files one user sees, and its guesses cost
seconds at a million files): a walk, newest first, that checks each row, `_FIRST_WALK`
rows; then more of the walk while, at the rate it found candidates and hits so far, that
settles the answer in fewer rows than the indexes would hand out; else the indexes for
the files past the walk, with bitmap scans only (trigrams, readers, owner). With a term
of 2 characters or more, the walk is of `file_trigrams` (schema 7): every 3-character
run of each file's folded name and keywords (and every 2-character run, schema 8), with
the file's time and id, in a b-tree that hands out one trigram's (or pair's) files
newest first, as FTS5's lists are in SQLite. A
search walks the list of its rarest trigram (ANALYZE's statistics say which), merged
with one more list in the same order (another trigram's, or the owner's files), and
reads only the files on both. The pg_trgm indexes, used past the walk, hold only the
characters the database's ctype calls letters: with the C locale no non-ASCII ones, so
create the database with a UTF-8 ctype (`LC_CTYPE 'C.UTF-8'`) (docs/PERFORMANCE.md).

Presence is an UNLOGGED table: heartbeats write it all the time, and a database crash
may empty it, which heartbeats repair within one presence lifetime. Everything else is
ordinary (logged) tables: a commit survives any broker's SIGKILL.

The database URL may hold a password: it is never logged nor put in a message
(`describe` shows the URL without it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from sfs.broker.cache import LEASE
from sfs.broker.generation_reads import GenerationReads
from sfs.broker.postgres_limits import PostgresLimits
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
    User,
    UsernameTaken,
)
from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle
from sfs.common.tree import FOLDER_MARK, kind_and_files

SCHEMA_VERSION = 8
CONNECT_TIMEOUT = 10  # seconds to reach the server, and to wait for a pooled connection
_EXPIRY_STEP = 300  # seconds; as in the SQLite store
_MIGRATION_LOCK = 0x5F5_0001  # pg_advisory_xact_lock key: one broker migrates at a time

# `f` a file, `u` its owner: who may see it (`files.readers`). Kept by every write that
# changes what it depends on: add_file, set_disabled, delete_user, load.
_READERS = """CASE WHEN u.disabled THEN '{}'::bigint[] ELSE
    (CASE WHEN f.public THEN ARRAY[0::bigint] ELSE '{}'::bigint[] END) || f.owner_id
    || ARRAY(SELECT a.user_id FROM access a WHERE a.file_id = f.file_id ORDER BY a.user_id)
    END"""
_PUBLIC = 0  # in `readers`: every user
# How a search reaches its candidates (`PostgresStore.search`): a walk of the newest files
# reads `_FIRST_WALK` rows, then further walks of at most `_MOST_WALK` rows each while
# they look cheaper than the indexes.
_FIRST_WALK = 300
_MOST_WALK = 40_000
# What a file handed out by a bitmap scan of the indexes costs, in files walked (a
# trigram recheck and a sort besides the read; and files laid out by time, as shares
# arrive and `migrate` copies them, put ~6 rows a walk reads on each page: 20,000 rows
# walked read 3,383 pages, 9,513 rows from a bitmap 11,428).
_INDEX_ROW_COST = 4
# A walk goes on to the end of a trigram's list when at most this many files are left in
# it, whatever it found so far: cheaper than the bitmaps of common trigrams.
_WHOLE_LIST = 10_000
# Lists a walk merges: the rarest trigram's files, less those missing from the other
# (another trigram's, or the owner's files). With a third, the planner's estimate of the
# first two's files (as if independent) falls below one, and it probes the third row by
# row: 6,336 probes, 15 of the 20 ms of a search for two words.
_MERGED = 2
# A row of a merged list (index only) against a file walked by the owner's index (read
# and checked): ~0.1 against ~10 µs at 1M files. The trigram's list is walked, merged
# with the owner's, unless it holds this many times more rows than the owner has files.
_MERGED_ROW_RATIO = 50
_UNKNOWN_ROWS = 10**12  # a table's size before it was ever analyzed
_STATISTICS_AGE = 60.0  # seconds the trigrams' statistics are kept (`_trigram_statistics`)

# The trigram table (schema 7): filled in one statement for the files already there (by
# the migration and by `load`), in the order of its index, so that a list's rows lie
# together; its one index is what a search walks.
_FILL_TRIGRAMS = """
    INSERT INTO file_trigrams (trigram, shared_at, file_id)
        SELECT t, f.shared_at, f.file_id
        FROM files f, sfs_file_trigrams(f.folded_name, f.folded_keywords) t
        ORDER BY 1, 2 DESC, 3;
"""
_TRIGRAM_INDEX = "file_trigrams_newest"
_TRIGRAM_INDEX_DEFINITION = "(trigram, shared_at DESC, file_id)"
# The most common trigrams whose frequencies ANALYZE keeps (the most it allows): with
# them the store picks the rarest trigram of a term without reading any list.
_TRIGRAM_STATISTICS = 10_000

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE TABLE users (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        username TEXT COLLATE "C" NOT NULL UNIQUE,
        password_hash BYTEA NOT NULL,
        rsa_public BYTEA NOT NULL,
        curve_public BYTEA NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BYTEA PRIMARY KEY,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX sessions_by_expiry ON sessions(expires_at);
    CREATE INDEX sessions_by_user ON sessions(user_id);
    -- Soft state, rewritten by every heartbeat: unlogged (emptied by a database crash).
    CREATE UNLOGGED TABLE presence (
        user_id BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        endpoint TEXT NOT NULL,
        online_until BIGINT NOT NULL
    );
    CREATE TABLE files (
        file_id TEXT COLLATE "C" PRIMARY KEY,
        owner_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size BIGINT NOT NULL,
        keywords TEXT NOT NULL,  -- newline-separated
        manifest BYTEA NOT NULL,
        signature BYTEA NOT NULL,
        public BOOLEAN NOT NULL,  -- every registered user may fetch it
        shared_at BIGINT NOT NULL,
        grant_signature BYTEA NOT NULL,
        signed_access TEXT,  -- the access list as signed (JSON); NULL for every user
        folded_name TEXT NOT NULL,  -- str.lower(name), computed by the broker
        folded_keywords TEXT NOT NULL  -- str.lower(keywords)
    );
    CREATE INDEX files_newest ON files(shared_at DESC, file_id);
    CREATE INDEX files_by_owner ON files(owner_id, shared_at DESC, file_id);
    CREATE INDEX files_name_trgm ON files USING gin (folded_name gin_trgm_ops);
    CREATE INDEX files_keywords_trgm ON files USING gin (folded_keywords gin_trgm_ops);
    CREATE TABLE access (
        file_id TEXT COLLATE "C" NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (file_id, user_id)
    );
    CREATE INDEX access_by_user ON access(user_id);
    -- Peers that downloaded a file and serve their copy (seeders); the owner is not here.
    CREATE TABLE holders (
        file_id TEXT COLLATE "C" NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (file_id, user_id)
    );
    CREATE INDEX holders_by_user ON holders(user_id);
    -- What each user's files take, for the quota, kept by a trigger: one row to read.
    CREATE TABLE usage (
        user_id BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        files BIGINT NOT NULL,
        manifest_bytes BIGINT NOT NULL
    );
    CREATE FUNCTION sfs_count_usage() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO usage (user_id, files, manifest_bytes)
                VALUES (NEW.owner_id, 1, octet_length(NEW.manifest))
                ON CONFLICT (user_id) DO UPDATE SET files = usage.files + 1,
                    manifest_bytes = usage.manifest_bytes + excluded.manifest_bytes;
            RETURN NEW;
        END IF;
        UPDATE usage SET files = files - 1,
            manifest_bytes = manifest_bytes - octet_length(OLD.manifest)
            WHERE user_id = OLD.owner_id;
        RETURN OLD;
    END $$;
    CREATE TRIGGER files_usage AFTER INSERT OR DELETE ON files
        FOR EACH ROW EXECUTE FUNCTION sfs_count_usage();
    """,
    2: """
    -- LimitState (sfs.broker.postgres_limits): shared by every broker on the database.
    CREATE TABLE limit_tallies (
        key TEXT COLLATE "C" PRIMARY KEY,
        count INTEGER NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        until DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX limit_tallies_by_until ON limit_tallies(until);
    CREATE TABLE limit_challenges (
        challenge BYTEA PRIMARY KEY,
        seq BIGINT GENERATED ALWAYS AS IDENTITY,  -- the order they were issued in
        expires DOUBLE PRECISION NOT NULL,
        client_key BYTEA,
        address TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX limit_challenges_by_address ON limit_challenges(address, seq);
    CREATE INDEX limit_challenges_by_expiry ON limit_challenges(expires);
    """,
    3: """
    -- An operator's `sfs-broker user disable`: refused and unlisted, nothing deleted.
    ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT false;
    """,
    4: """
    -- The caches' generation (sfs.broker.cache): as in the SQLite store, every change a
    -- cached session or lookup depends on adds one in the writer's transaction. A row, not
    -- a sequence: nextval() is seen before the change commits.
    CREATE TABLE generation (n BIGINT NOT NULL);
    INSERT INTO generation (n) VALUES (0);
    CREATE FUNCTION sfs_next_generation() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE generation SET n = n + 1;
        RETURN NULL;
    END $$;
    -- Every login deletes the expired sessions: only a deletion of some counts.
    CREATE FUNCTION sfs_next_generation_if_gone() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM gone) THEN
            UPDATE generation SET n = n + 1;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER generation_sessions AFTER DELETE ON sessions
        REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION sfs_next_generation_if_gone();
    CREATE TRIGGER generation_users AFTER UPDATE OR DELETE ON users
        FOR EACH STATEMENT EXECUTE FUNCTION sfs_next_generation();
    CREATE TRIGGER generation_files AFTER INSERT OR UPDATE OR DELETE ON files
        FOR EACH STATEMENT EXECUTE FUNCTION sfs_next_generation();
    CREATE TRIGGER generation_access AFTER INSERT OR UPDATE OR DELETE ON access
        FOR EACH STATEMENT EXECUTE FUNCTION sfs_next_generation();
    CREATE TRIGGER generation_holders AFTER INSERT OR UPDATE OR DELETE ON holders
        FOR EACH STATEMENT EXECUTE FUNCTION sfs_next_generation();
    CREATE TRIGGER generation_presence_change AFTER INSERT OR DELETE ON presence
        FOR EACH ROW EXECUTE FUNCTION sfs_next_generation();
    CREATE TRIGGER generation_presence_move AFTER UPDATE ON presence
        FOR EACH ROW WHEN (OLD.endpoint IS DISTINCT FROM NEW.endpoint)
        EXECUTE FUNCTION sfs_next_generation();
    """,
    5: f"""
    -- Who may see each file (`_READERS`), so that search reads only what its caller may
    -- see, through a GIN index: 0 for every user, the owner, the users on the access list;
    -- none while the owner is disabled.
    ALTER TABLE files ADD COLUMN readers BIGINT[] NOT NULL DEFAULT '{{}}';
    UPDATE files f SET readers = {_READERS} FROM users u WHERE u.id = f.owner_id;
    CREATE INDEX files_readers ON files USING gin (readers);
    """,
    6: """
    -- A share's kind and number of files, from its owner-signed tree header, for search.
    -- Existing rows get theirs from their stored header after this (`_BACKFILLS`).
    ALTER TABLE files ADD COLUMN kind TEXT NOT NULL DEFAULT 'file';
    ALTER TABLE files ADD COLUMN file_count BIGINT NOT NULL DEFAULT 1;
    """,
    7: f"""
    -- Each 3-character run of a file's folded name and of its folded keywords (every
    -- character counts, as in SQLite's FTS5 trigrams), as a number (`trigram_code`), with
    -- the file's time and id: the b-tree hands out the files holding one trigram newest
    -- first, which a search walks (`PostgresStore.search`). Kept by a trigger on files.
    CREATE FUNCTION sfs_trigrams(text) RETURNS SETOF bigint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT (ascii(c[i])::bigint << 42) | (ascii(c[i + 1])::bigint << 21)
            | ascii(c[i + 2])
        FROM (SELECT string_to_array($1, NULL) AS c) s,
            generate_series(1, cardinality(c) - 2) i
    $$;
    CREATE FUNCTION sfs_file_trigrams(name text, keywords text) RETURNS SETOF bigint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT sfs_trigrams(name) UNION SELECT sfs_trigrams(keywords)
    $$;
    CREATE TABLE file_trigrams (
        trigram BIGINT NOT NULL,
        shared_at BIGINT NOT NULL,
        file_id TEXT COLLATE "C" NOT NULL
    );
    CREATE FUNCTION sfs_index_trigrams() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN  -- through the b-tree, one probe per trigram
            DELETE FROM file_trigrams WHERE trigram IN
                (SELECT sfs_file_trigrams(OLD.folded_name, OLD.folded_keywords))
                AND shared_at = OLD.shared_at AND file_id = OLD.file_id;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO file_trigrams (trigram, shared_at, file_id)
                SELECT t, NEW.shared_at, NEW.file_id
                FROM sfs_file_trigrams(NEW.folded_name, NEW.folded_keywords) t;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER files_trigrams
        AFTER INSERT OR DELETE OR UPDATE OF folded_name, folded_keywords, shared_at, file_id
        ON files FOR EACH ROW EXECUTE FUNCTION sfs_index_trigrams();
    SET LOCAL maintenance_work_mem = '256MB';
    SET LOCAL work_mem = '256MB';
    {_FILL_TRIGRAMS}
    CREATE INDEX {_TRIGRAM_INDEX} ON file_trigrams {_TRIGRAM_INDEX_DEFINITION};
    -- The search chooses the rarest trigram of its terms from these statistics.
    ALTER TABLE file_trigrams ALTER COLUMN trigram SET STATISTICS {_TRIGRAM_STATISTICS};
    ANALYZE file_trigrams;
    """,
    8: f"""
    -- Each 2-character run too (`gram_code`: below every trigram's number), in the same
    -- table and b-tree: a 2-character term has a list of its own, merged with a word's
    -- as a trigram's is. The trigger reads `sfs_file_trigrams`, which now gives both.
    CREATE FUNCTION sfs_bigrams(text) RETURNS SETOF bigint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT (ascii(c[i])::bigint << 21) | ascii(c[i + 1])
        FROM (SELECT string_to_array($1, NULL) AS c) s,
            generate_series(1, cardinality(c) - 1) i
    $$;
    CREATE OR REPLACE FUNCTION sfs_file_trigrams(name text, keywords text)
        RETURNS SETOF bigint LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT sfs_trigrams(name) UNION SELECT sfs_trigrams(keywords)
        UNION SELECT sfs_bigrams(name) UNION SELECT sfs_bigrams(keywords)
    $$;
    SET LOCAL maintenance_work_mem = '256MB';
    SET LOCAL work_mem = '256MB';
    DROP INDEX {_TRIGRAM_INDEX};  -- built again once, after the rows (faster than row by row)
    INSERT INTO file_trigrams (trigram, shared_at, file_id)
        SELECT b, f.shared_at, f.file_id
        FROM files f,
            LATERAL (SELECT sfs_bigrams(f.folded_name) UNION
                SELECT sfs_bigrams(f.folded_keywords)) g(b)
        ORDER BY 1, 2 DESC, 3;
    CREATE INDEX {_TRIGRAM_INDEX} ON file_trigrams {_TRIGRAM_INDEX_DEFINITION};
    ANALYZE file_trigrams;
    """,
}

# The secondary indexes of `files` as the migrations made them: `load` drops them while
# it copies, and builds them again.
_FILE_INDEXES = {
    "files_newest": "(shared_at DESC, file_id)",
    "files_by_owner": "(owner_id, shared_at DESC, file_id)",
    "files_name_trgm": "USING gin (folded_name gin_trgm_ops)",
    "files_keywords_trgm": "USING gin (folded_keywords gin_trgm_ops)",
    "files_readers": "USING gin (readers)",
}

_FILE_COLUMNS = (
    "f.file_id, u.username, f.name, f.size, f.keywords, f.manifest, f.signature, f.shared_at,"
    " f.grant_signature, f.kind, f.file_count"
)
# `u` is the file's owner (every query that uses this joins it): a disabled one's files
# are nobody's to see.
_VISIBLE = """(NOT u.disabled AND (f.public OR f.owner_id = %(me)s
    OR EXISTS (SELECT 1 FROM access a WHERE a.file_id = f.file_id AND a.user_id = %(me)s)))"""

Row = tuple[Any, ...]
Connection = psycopg.Connection[Row]


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """The URL as it may be shown: without its password, or the bare scheme if it does
    not parse."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://…"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _fold(text: str) -> str:
    return text.lower()


def trigram_code(run: str) -> int:
    """A run of 3 characters as `file_trigrams` holds it (`sfs_trigrams` in SQL): their
    code points side by side, 21 bits each."""
    return ord(run[0]) << 42 | ord(run[1]) << 21 | ord(run[2])


def gram_code(run: str) -> int:
    """A run of 2 or 3 characters as `file_trigrams` holds it (2: `sfs_bigrams`, schema
    8): no code point is 0, so a pair's number is below every trigram's."""
    if len(run) == 2:
        return ord(run[0]) << 21 | ord(run[1])
    return trigram_code(run)


def _grams(term: str) -> list[int]:
    """The lists of `file_trigrams` that hold every file holding `term` (2 characters or
    more): the term's own, if 2 characters, else its trigrams."""
    width = min(len(term), 3)
    return [gram_code(term[i : i + width]) for i in range(len(term) - width + 1)]


def _like_pattern(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _file_entry(row: Row) -> FileEntry:
    keywords = [k for k in row[4].split("\n") if k]
    return FileEntry(
        row[0],
        row[1],
        row[2],
        int(row[3]),
        keywords,
        bytes(row[5]),
        bytes(row[6]),
        int(row[7]),
        bytes(row[8]),
        row[9],
        int(row[10]),
    )


def _backfill_kinds(db: Connection) -> None:
    """Schema 6: each existing share's kind and file count, read from its stored header.
    A file header always says one file (the column default), so only the headers that may
    be folders' are read, streamed: a large index is never held in memory at once."""
    with db.cursor(name="sfs_backfill_kinds") as rows, db.cursor() as updates:
        rows.execute(
            "SELECT file_id, manifest FROM files WHERE position(%s::bytea in manifest) > 0",
            (FOLDER_MARK,),
        )
        while batch := rows.fetchmany(1000):
            changed = [
                (kind, files, file_id)
                for file_id, manifest in batch
                for kind, files in [kind_and_files(bytes(manifest))]
                if kind == "folder"
            ]
            if changed:
                updates.executemany(
                    "UPDATE files SET kind = %s, file_count = %s WHERE file_id = %s", changed
                )


# Python run after a migration's SQL, in its transaction.
_BACKFILLS: dict[int, Callable[[Connection], None]] = {6: _backfill_kinds}


def _user(row: Row, disabled: bool = False) -> User:
    return User(row[0], row[1], bytes(row[2]), KeyBundle(bytes(row[3]), bytes(row[4])), disabled)


class _Examined:
    """The candidates of a search examined so far, in hit order: at most `budget`, until
    `limit` hits (store_contract). `partial` is None until the answer is settled."""

    def __init__(self, limit: int, budget: int) -> None:
        self.limit, self.budget = limit, budget
        self.count = 0
        self.hits: list[str] = []
        self.partial: bool | None = None

    @property
    def wanted(self) -> int:
        """Candidates that may still decide the answer: the rest of the budget and one
        past it (which makes the answer partial)."""
        return self.budget + 1 - self.count

    def feed(self, candidates: Iterable[tuple[str, bool]]) -> None:
        """The next candidates (file id, whether it holds the short terms)."""
        for file_id, holds in candidates:
            if self.partial is not None:
                return
            if self.count == self.budget:  # a candidate past the budget
                self.partial = True
                return
            self.count += 1
            if holds:
                self.hits.append(file_id)
                if len(self.hits) == self.limit:
                    self.partial = False


@dataclass(frozen=True)
class _Way:
    """The conditions of one search: `scope` on every file walked (the owner), `long`
    on a candidate (the terms of 2 characters or more), `holds` on a hit (the others)."""

    scope: list[str]
    long: list[str]
    holds: str
    # For the indexes: `long`, with the terms the trigram indexes cannot narrow written
    # as filters when another term can; `narrowed`: whether one can.
    indexed: list[str]
    narrowed: bool
    by_terms: bool


def _has_trigram(term: str, beyond_ascii: bool) -> bool:
    """Whether pg_trgm can narrow LIKE '%term%': a run of 3 letters or digits (ASCII
    ones only, if the database's ctype knows no others). A guess of speed only."""
    run = 0
    for char in term:
        run = run + 1 if char.isalnum() and (beyond_ascii or char.isascii()) else 0
        if run == 3:
            return True
    return False


def _after(params: dict[str, object], table: str = "f") -> list[str]:
    """The condition for the files past those walked (hit order), if any were; `table`
    has their `shared_at` and `file_id`."""
    if "after_at" not in params:
        return []
    return [
        f"{table}.shared_at <= %(after_at)s",
        f"({table}.shared_at < %(after_at)s OR {table}.file_id > %(after_id)s)",
    ]


def _next_walk(examined: _Examined, walked: int, left: int, narrowed: bool, whole_list: int) -> int:
    """How many more files to walk (at most `_MOST_WALK`), or 0 to ask the indexes: the
    walk goes on while, at the rate it found candidates and hits so far, it would settle
    the answer (or reach the end of its list, `left` files on) in fewer rows than the
    indexes would hand out for the files left (about as many as the candidates among
    them if a term narrows them, else all; each costing `_INDEX_ROW_COST` rows of a walk).
    A list of at most `whole_list` files left is walked to its end whatever the rate."""
    if _MOST_WALK <= 0:
        return 0
    if left < 0:  # longer than the estimate said: guess as long again
        left = walked
    if left <= whole_list:
        return min(_MOST_WALK, left + 1)  # and one past: the end of the list is seen
    if examined.count == 0:  # the caller may see none: the readers' index
        return 0
    rate = examined.count / walked
    to_settle = examined.wanted / rate
    if examined.hits:
        hits_left = examined.limit - len(examined.hits)
        to_settle = min(to_settle, hits_left * walked / len(examined.hits))
    if min(to_settle, left) > (rate if narrowed else 1) * left * _INDEX_ROW_COST:
        return 0
    return min(_MOST_WALK, int(to_settle * 1.25) + 100)


@dataclass(frozen=True)
class _TrigramStatistics:
    """How many rows of `file_trigrams` hold each common trigram, as ANALYZE last
    counted them (its most common values); every other trigram is at most `rest`."""

    common: dict[int, float]
    rest: float
    read_at: float

    @classmethod
    def of(cls, row: Row | None, read_at: float) -> _TrigramStatistics:
        rows = float(row[0]) if row and row[0] is not None and row[0] >= 0 else -1.0
        if row is None or rows < 0 or row[1] is None:  # never analyzed: nothing known
            return cls({}, float(_UNKNOWN_ROWS), read_at)
        values, freqs, distinct = row[1], row[2], float(row[3] or 0)
        common = {int(v): f * rows for v, f in zip(values, freqs, strict=True)}
        if distinct < 0:  # a fraction of the rows
            distinct = -distinct * rows
        others = max(1.0, distinct - len(common))
        rest = (1.0 - sum(freqs)) * rows / others
        return cls(common, min([rest, *common.values()]), read_at)

    def held(self, trigram: int) -> float:
        return self.common.get(trigram, self.rest)

    def lists(self, terms: Sequence[str]) -> tuple[list[int], int]:
        """Which trigrams' lists a search walks (terms of 2 characters or more; a pair is
        one list of its own, `gram_code`): the rarest of all the terms' trigrams; then
        the rarest of each other term, then of the trigrams that share no character with
        the first (the least likely to be held by the same files), then of any, `_MERGED`
        in all; and about how many files hold the first."""

        def rarity(trigram: int) -> tuple[float, int]:
            return self.held(trigram), trigram

        runs = [_grams(term) for term in terms]
        first = min((t for run in runs for t in run), key=rarity)
        own = next(run for run in runs if first in run)
        at = own.index(first)
        others = sorted((min(run, key=rarity) for run in runs if first not in run), key=rarity)
        apart = sorted((t for i, t in enumerate(own) if abs(i - at) >= 3), key=rarity)
        chosen = [first]
        for trigram in [*others, *apart, *sorted(own, key=rarity)]:
            if len(chosen) == _MERGED:
                break
            if trigram not in chosen:
                chosen.append(trigram)
        return chosen, int(self.held(first))


class PostgresStore:
    """A pool of connections to one database; safe to share between threads."""

    def __init__(self, url: str, pool_size: int = 4) -> None:
        self._url = url
        self._where = describe(url)
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StorageError(f"database: not a valid PostgreSQL URL ({self._where})") from exc
        with self._error_context("cannot set up"):
            first = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True)
        try:
            with self._error_context("cannot set up"):
                self._check_encoding(first)
                self._migrate(first)
                # Which letters pg_trgm indexes depends on the database's ctype.
                row = first.execute("SELECT show_trgm('данные') <> '{}'::text[]").fetchone()
                self._trigrams_beyond_ascii = bool(row and row[0])
        finally:
            first.close()
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            timeout=CONNECT_TIMEOUT,
            # Autocommit: a lone statement needs no COMMIT round trip; several run in
            # db.transaction() (`_transaction`).
            kwargs={"connect_timeout": CONNECT_TIMEOUT, "autocommit": True},
            check=ConnectionPool.check_connection,  # a server restart drops idle ones
            name="sfs-store",
        )
        try:
            with self._error_context("cannot connect to"):
                self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except BaseException:
            self._pool.close()  # and its threads
            raise
        self._limits = PostgresLimits(self._pool, self._where)
        self._trigram_stats: _TrigramStatistics | None = None

    # --- connection handling -----------------------------------------------------------

    @contextmanager
    def _error_context(self, doing: str) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise StorageError(f"{doing} the database {self._where}: {self._reason(exc)}") from exc

    def _reason(self, exc: psycopg.Error) -> str:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        password = conninfo_to_dict(self._url).get("password")
        if password:  # a server never echoes it, but a message is no place to risk it
            reason = reason.replace(str(password), "***")
        return reason

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A pooled connection inside one transaction: committed when the block ends,
        rolled back if it raises."""
        with self._error_context("error in"), self._pool.connection() as db, db.transaction():
            yield db

    def _query(
        self,
        sql: str,
        params: Sequence[object] | dict[str, object] = (),
        prepare: bool | None = None,
    ) -> list[Row]:
        """One statement, atomic on its own. `prepare`: psycopg prepares a statement
        run 5 times (None); False plans each run for its values."""
        with self._error_context("error in"), self._pool.connection() as db:
            return db.execute(sql, params, prepare=prepare).fetchall()

    @staticmethod
    def _check_encoding(db: Connection) -> None:
        row = db.execute("SHOW server_encoding").fetchone()
        if row is None or row[0] != "UTF8":
            raise StorageError(
                f"the database uses the encoding {row[0] if row else '?'}; sfs needs UTF8"
                " (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
            )

    def _migrate(self, db: Connection) -> None:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS sfs_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM sfs_schema").fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"the database {self._where} has schema version {version}, newer than"
                    f" this sfs-broker understands ({SCHEMA_VERSION}); upgrade sfs"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                try:
                    db.execute(_MIGRATIONS[target])
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise StorageError(
                        f"cannot create the schema in {self._where}: {self._reason(exc)}"
                        " (the broker's role must own the database; pg_trgm must be"
                        " installed: CREATE EXTENSION pg_trgm)"
                    ) from exc
                if target in _BACKFILLS:
                    _BACKFILLS[target](db)
                db.execute("DELETE FROM sfs_schema")
                db.execute("INSERT INTO sfs_schema (version) VALUES (%s)", (target,))

    def close(self) -> None:
        self._pool.close()

    def limit_state(self) -> PostgresLimits:
        return self._limits

    # --- bulk copy (sfs-broker migrate) ------------------------------------------------

    def holds_an_index(self) -> bool:
        row = self._query("SELECT EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM files)")
        return bool(row[0][0])

    def load(self, tables: Iterable[tuple[str, Sequence[str], Iterable[Row]]]) -> None:
        """Copy rows in, table by table, in one transaction (COPY). Rows of `files` are
        given without the folded columns: they are computed here, as `add_file` does.
        Users keep their ids; new ones are numbered after the highest."""
        with self._transaction() as db:
            # Indexes built once at the end are many times faster than kept row by row
            # (GIN above all): a million files in minutes rather than an hour.
            db.execute("SET LOCAL maintenance_work_mem = '256MB'")
            for name in _FILE_INDEXES:
                db.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
            # The usage trigger would update one owner's row once per file: thousands of
            # versions of one row in one transaction, each found by walking the others.
            # One count at the end instead.
            db.execute("ALTER TABLE files DISABLE TRIGGER files_usage")
            # The trigram table likewise: filled in one statement at the end.
            db.execute("ALTER TABLE files DISABLE TRIGGER files_trigrams")
            db.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(_TRIGRAM_INDEX)))
            for table, columns, rows in tables:
                names = list(columns)
                if table == "files":
                    rows = self._with_folded(names, rows)
                    names += ["folded_name", "folded_keywords"]
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, names))
                )
                with db.cursor().copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
            db.execute(
                "SELECT setval(pg_get_serial_sequence('users', 'id'), coalesce(max(id), 1),"
                " max(id) IS NOT NULL) FROM users"
            )
            db.execute("ALTER TABLE files ENABLE TRIGGER files_usage")
            db.execute(
                "INSERT INTO usage (user_id, files, manifest_bytes)"
                " SELECT owner_id, count(*), sum(octet_length(manifest)) FROM files"
                " GROUP BY owner_id"
            )
            # Without a join, the update walks the table in order and writes each row's
            # new version in that order: the copy stays laid out by time.
            owner_disabled = "(SELECT u.disabled FROM users u WHERE u.id = f.owner_id)"
            db.execute(
                f"UPDATE files f SET readers = {_READERS.replace('u.disabled', owner_disabled)}"
            )
            for name, definition in _FILE_INDEXES.items():
                db.execute(f"CREATE INDEX {name} ON files {definition}")
            db.execute("ALTER TABLE files ENABLE TRIGGER files_trigrams")
            db.execute("SET LOCAL work_mem = '256MB'")
            db.execute(_FILL_TRIGRAMS)
            db.execute(
                f"CREATE INDEX {_TRIGRAM_INDEX} ON file_trigrams {_TRIGRAM_INDEX_DEFINITION}"
            )
        with self._error_context("error in"), self._pool.connection() as db:
            db.execute("ANALYZE")  # statistics for the planner, which knows no rows yet

    @staticmethod
    def _with_folded(columns: list[str], rows: Iterable[Row]) -> Iterator[Row]:
        name, keywords, public = (columns.index(c) for c in ("name", "keywords", "public"))
        for row in rows:
            fixed = list(row)
            fixed[public] = bool(fixed[public])
            yield (*fixed, _fold(row[name]), _fold(row[keywords]))

    def dump(self, table: str, columns: Sequence[str], order: Sequence[str]) -> Iterator[Row]:
        """Every row of a table, in key order (to check a copy)."""
        statement = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.Identifier(table),
            sql.SQL(", ").join(map(sql.Identifier, order)),
        )
        with self._transaction() as db, db.cursor(name="sfs_dump") as cursor:
            cursor.execute(statement)
            yield from cursor

    # --- users and sessions ------------------------------------------------------------

    def add_user(self, username: str, password_hash: bytes, bundle: KeyBundle, now: int) -> User:
        try:
            rows = self._query(
                "INSERT INTO users (username, password_hash, rsa_public, curve_public,"
                " created_at) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (username, password_hash, bundle.rsa_public, bundle.curve_public, now),
            )
        except StorageError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise UsernameTaken(f"the username {username!r} is taken") from exc
            raise
        return User(int(rows[0][0]), username, password_hash, bundle)

    def get_user(self, username: str) -> User | None:
        rows = self._query(
            "SELECT id, username, password_hash, rsa_public, curve_public, disabled FROM users"
            " WHERE username = %s",
            (username,),
        )
        return _user(rows[0], bool(rows[0][5])) if rows else None

    def add_session(self, token_hash: bytes, user_id: int, expires_at: int, now: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE expires_at <= %s", (now,))
            db.execute(
                "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES (%s, %s, %s)",
                (token_hash, user_id, expires_at),
            )

    def session_user(self, token_hash: bytes, now: int, extend_to: int) -> User | None:
        rows = self._query(
            "SELECT u.id, u.username, u.password_hash, u.rsa_public, u.curve_public,"
            " s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.token_hash = %s AND s.expires_at > %s AND NOT u.disabled",
            (token_hash, now),
        )
        if not rows:
            return None
        # As SQLite: slide in coarse steps, so that most requests only read. Never
        # backwards, whichever broker writes last.
        step = min(_EXPIRY_STEP, max(1, (extend_to - now) // 10))
        if rows[0][5] < extend_to - step:
            self._query(
                "UPDATE sessions SET expires_at = greatest(expires_at, %s)"
                " WHERE token_hash = %s RETURNING 1",
                (extend_to, token_hash),
            )
        return _user(rows[0])

    def generation_reads(self) -> GenerationReads:
        """Reads of `generation` for a broker's socket thread, on connections of their
        own, that never block it (`sfs.broker.generation_reads`)."""
        return GenerationReads(self._url, connect_timeout=CONNECT_TIMEOUT)

    def generation(self) -> int:
        return int(self._query("SELECT n FROM generation", prepare=True)[0][0])

    def delete_session(self, token_hash: bytes) -> None:
        self._query("DELETE FROM sessions WHERE token_hash = %s RETURNING 1", (token_hash,))

    # --- presence ------------------------------------------------------------------------

    def set_online(self, user_id: int, endpoint: str, until: int) -> None:
        self._query(
            "INSERT INTO presence (user_id, endpoint, online_until)"
            " SELECT id, %s, %s FROM users WHERE id = %s AND NOT disabled"
            " ON CONFLICT (user_id) DO UPDATE SET endpoint = excluded.endpoint,"
            " online_until = excluded.online_until RETURNING 1",
            (endpoint, until, user_id),
        )

    def set_offline(self, user_id: int) -> None:
        self._query("DELETE FROM presence WHERE user_id = %s RETURNING 1", (user_id,))

    # --- files ---------------------------------------------------------------------------

    def unknown_users(self, usernames: Sequence[str]) -> list[str]:
        if not usernames:
            return []
        rows = self._query(
            "SELECT username FROM users WHERE username = ANY(%s)", (list(usernames),)
        )
        known = {row[0] for row in rows}
        return [name for name in usernames if name not in known]

    def add_file(
        self,
        owner_id: int,
        entry: FileEntry,
        access: Sequence[str] | None,
        quota: Quota | None = None,
    ) -> None:
        keywords = "\n".join(entry.keywords)
        with self._transaction() as db:
            if quota is not None:
                self._check_quota(db, owner_id, entry, quota)
            # The old access list and holders go with the old row (ON DELETE CASCADE).
            # Its trigger takes the `generation` row, which `set_disabled` (and any other
            # writer of users, files or access) holds until it commits: the readers
            # computed below see an owner disabled meanwhile.
            db.execute("DELETE FROM files WHERE file_id = %s", (entry.file_id,))
            db.execute(
                "INSERT INTO files (file_id, owner_id, name, size, keywords, manifest,"
                " signature, public, shared_at, grant_signature, signed_access,"
                " folded_name, folded_keywords, kind, file_count)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    entry.file_id,
                    owner_id,
                    entry.name,
                    entry.size,
                    keywords,
                    entry.manifest,
                    entry.signature,
                    access is None,
                    entry.shared_at,
                    entry.grant,
                    None if access is None else json.dumps(list(access)),
                    _fold(entry.name),
                    _fold(keywords),
                    entry.kind,
                    entry.files,
                ),
            )
            if access:
                db.execute(
                    "INSERT INTO access (file_id, user_id) SELECT %s, id FROM users"
                    " WHERE username = ANY(%s) ON CONFLICT DO NOTHING",
                    (entry.file_id, list(access)),
                )
            self._set_readers(db, "f.file_id = %s", (entry.file_id,))

    @staticmethod
    def _set_readers(db: Connection, which: str, params: Sequence[object]) -> None:
        """Compute `files.readers` again for the files `which` (a condition on `f`)."""
        db.execute(
            f"UPDATE files f SET readers = {_READERS} FROM users u"
            f" WHERE u.id = f.owner_id AND {which}",
            params,
        )

    @staticmethod
    def _check_quota(db: Connection, owner_id: int, entry: FileEntry, quota: Quota) -> None:
        # Lock the owner's usage row first: two brokers adding for one owner at once
        # then check one after the other.
        db.execute(
            "INSERT INTO usage (user_id, files, manifest_bytes) VALUES (%s, 0, 0)"
            " ON CONFLICT (user_id) DO NOTHING",
            (owner_id,),
        )
        used = db.execute(
            "SELECT files, manifest_bytes FROM usage WHERE user_id = %s FOR UPDATE", (owner_id,)
        ).fetchone()
        files, size = (int(used[0]), int(used[1])) if used else (0, 0)
        replaced = db.execute(  # sharing a manifest again replaces it: it counts once
            "SELECT octet_length(manifest) FROM files WHERE file_id = %s AND owner_id = %s",
            (entry.file_id, owner_id),
        ).fetchone()
        if replaced is not None:
            files, size = files - 1, size - int(replaced[0])
        if files >= quota.files or size + len(entry.manifest) > quota.manifest_bytes:
            raise QuotaExceeded(files, size, len(entry.manifest))

    def remove_file(self, file_id: str, owner_id: int) -> bool:
        rows = self._query(
            "DELETE FROM files WHERE file_id = %s AND owner_id = %s RETURNING 1",
            (file_id, owner_id),
        )
        return bool(rows)

    def search(
        self,
        user_id: int,
        terms: Sequence[str],
        owner: str | None,
        limit: int,
        now: int,
        budget: int = SEARCH_BUDGET,
    ) -> Found:
        # The candidates are the files the user sees (of the owner) that hold every term
        # of 2 characters or more; 1-character terms are checked on each (`holds`). The store
        # picks the way to them itself, as a planner cannot see how common a term is
        # among the files one user sees: a walk, newest first, of the files that hold the
        # rarest trigram of the terms (`file_trigrams`), or of the owner's files if they
        # are far fewer, or of every file if no term is 2 characters long; each checked.
        # If that does not settle the answer, more of the walk while it finds candidates
        # often enough to be cheaper, else the indexes (trigrams, readers, owner) for the
        # files past the walk. Both hand out candidates in hit order.
        params: dict[str, object] = {"readers": [_PUBLIC, user_id]}
        long, short, narrowing, filters = list[str](), list[str](), list[str](), list[str]()
        trigrams: list[str] = []  # the terms of 2 characters or more, for `file_trigrams`
        for i, term in enumerate(_fold(term) for term in terms):
            params[f"t{i}"] = _like_pattern(term)
            holds = f"(f.folded_name LIKE %(t{i})s OR f.folded_keywords LIKE %(t{i})s)"
            # The same test in a form no index answers.
            filter_ = (f"((f.folded_name || '') LIKE %(t{i})s OR (f.folded_keywords"
                       f" || '') LIKE %(t{i})s)")  # fmt: skip
            if len(term) < 2:
                short.append(holds)
                continue
            trigrams.append(term)
            if len(term) == 2:  # no pg_trgm index narrows it: `file_trigrams` does
                long.append(filter_)
                filters.append(filter_)
                continue
            long.append(holds)
            if _has_trigram(term, self._trigrams_beyond_ascii):
                narrowing.append(holds)
            else:
                filters.append(filter_)
        scope: list[str] = []
        if owner is not None:
            found = self._query("SELECT id FROM users WHERE username = %s", (owner,))
            if not found:
                return Found()
            params["owner"] = found[0][0]
            scope.append("f.owner_id = %(owner)s")
        way = _Way(
            scope,
            long,
            " AND ".join(short) or "true",
            indexed=[*narrowing, *filters] if narrowing else long,
            narrowed=bool(narrowing),
            # Whether `indexed` may use the pg_trgm indexes (else the readers' index).
            by_terms=any(len(term) > 2 for term in trigrams),
        )
        examined = _Examined(limit, budget)
        with self._transaction() as db:
            listed = self._files_walked(db, params)
            if trigrams:
                walk, holding = self._trigram_statistics(db).lists(trigrams)
                if holding <= listed * _MERGED_ROW_RATIO:
                    params["trigram"], listed = walk[0], holding
                    # The owner's files are a list merged as well (`_walk`).
                    merged = walk[1 : _MERGED - 1 if "owner" in params else _MERGED]
                    params.update({f"also{i}": also for i, also in enumerate(merged)})
            walked, rows = 0, _FIRST_WALK
            while rows > 0 and examined.partial is None:
                read = self._walk(db, examined, params, way, rows)
                walked += read
                if examined.partial is None:
                    if read < rows:  # every file of the walk read, no candidate left
                        examined.partial = False
                    else:
                        whole = _WHOLE_LIST if "trigram" in params else 0
                        rows = _next_walk(examined, walked, listed - walked, way.narrowed, whole)
            if examined.partial is None:
                self._by_indexes(db, examined, params, way)
        rows_found = self._query(
            # The owner's presence last, after the file's columns.
            f"SELECT {_FILE_COLUMNS}, EXISTS (SELECT 1 FROM presence p"
            " WHERE p.user_id = f.owner_id AND p.online_until > %(now)s)"
            " FROM files f JOIN users u ON u.id = f.owner_id"
            # `readers` decided; the rule of visibility itself on the hits, to be sure.
            f" WHERE f.file_id = ANY(%(ids)s) AND {_VISIBLE}",
            {"ids": examined.hits, "me": user_id, "now": now},
        )
        rows_found.sort(key=lambda row: (-row[7], row[0]))
        return Found(
            [Hit(_file_entry(row), bool(row[-1])) for row in rows_found], bool(examined.partial)
        )

    @staticmethod
    def _files_walked(db: Connection, params: dict[str, object]) -> int:
        """How many files a walk without a trigram would read at most: the owner's, or
        all (estimates)."""
        if "owner" in params:
            total = db.execute("SELECT files FROM usage WHERE user_id = %(owner)s", params)
        else:
            total = db.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = 'files'::regclass"
            )
        known = total.fetchone()
        return int(known[0]) if known and int(known[0]) >= 0 else _UNKNOWN_ROWS

    def _trigram_statistics(self, db: Connection) -> _TrigramStatistics:
        """How common each trigram is, from ANALYZE's statistics of `file_trigrams`, read
        again when older than `_STATISTICS_AGE` seconds (they change only with ANALYZE)."""
        cached = self._trigram_stats
        if cached is not None and time.monotonic() - cached.read_at < _STATISTICS_AGE:
            return cached
        row = db.execute(
            "SELECT c.reltuples::bigint, s.most_common_vals::text::bigint[],"
            " s.most_common_freqs, s.n_distinct FROM pg_class c LEFT JOIN pg_stats s"
            " ON s.schemaname = current_schema() AND s.tablename = 'file_trigrams'"
            " AND s.attname = 'trigram' WHERE c.oid = 'file_trigrams'::regclass"
        ).fetchone()
        stats = _TrigramStatistics.of(row, time.monotonic())
        self._trigram_stats = stats
        return stats

    @staticmethod
    def _walk(
        db: Connection, examined: _Examined, params: dict[str, object], way: _Way, rows: int
    ) -> int:
        """Walk the next `rows` files (of the owner; holding `params["trigram"]`, if
        given) newest first, past those walked before, feeding their candidates to
        `examined` until it is settled. A cursor hands them out a few at a time, so that
        a search settled early reads no further. The position of the last file it read
        (`rows` if it read them all)."""
        if "trigram" in params:
            # The trigram's list in its b-tree's order, less the files without the other
            # trigrams chosen or of another owner (lists in the same order, which the
            # planner merges), before each row's file is read by its key.
            listed = "file_trigrams x JOIN files f ON f.file_id = x.file_id"
            where = ["x.trigram = %(trigram)s", *_after(params, "x")]
            where += [
                f"EXISTS (SELECT 1 FROM file_trigrams y WHERE y.trigram = %({also})s"
                " AND y.shared_at = x.shared_at AND y.file_id = x.file_id)"
                for also in params
                if also.startswith("also")
            ]
            if "owner" in params:
                where.append(
                    "EXISTS (SELECT 1 FROM files o WHERE o.owner_id = %(owner)s"
                    " AND o.shared_at = x.shared_at AND o.file_id = x.file_id)"
                )
            order = "x.shared_at DESC, x.file_id"
        else:
            listed, where = "files f", [*way.scope, *_after(params)]
            order = "f.shared_at DESC, f.file_id"
        candidate = " AND ".join(["f.readers && %(readers)s::bigint[]", *way.long])
        cursor = db.cursor(name="sfs_walk")
        cursor.execute(
            f"SELECT f.n, f.file_id, f.shared_at, {way.holds}, {candidate} FROM"
            " (SELECT f.file_id, f.shared_at, f.readers, f.folded_name, f.folded_keywords,"
            f" row_number() OVER (ORDER BY {order}) AS n"
            f" FROM {listed} WHERE {' AND '.join(where) or 'true'} ORDER BY {order}"
            f" LIMIT %(rows)s) f WHERE ({candidate}) OR f.n = %(rows)s",
            {**params, "rows": rows},
        )
        read, size = 0, max(1, examined.limit - len(examined.hits))  # all may be hits
        try:
            while examined.partial is None:
                asked = min(size, examined.wanted + 1)  # and the last file, if not one
                found = cursor.fetchmany(asked)
                for n, file_id, shared_at, holds, is_candidate in found:
                    read = n
                    if n == rows:
                        params["after_at"], params["after_id"] = shared_at, file_id
                    if is_candidate:
                        examined.feed([(file_id, bool(holds))])
                        if examined.partial is not None:
                            break
                if len(found) < asked:
                    break
                size *= 2
        finally:
            cursor.close()
        return int(read)

    @staticmethod
    def _by_indexes(
        db: Connection, examined: _Examined, params: dict[str, object], way: _Way
    ) -> None:
        """Feed `examined` the candidates past the walk (all, if none), from the indexes:
        the trigram indexes for the terms, else the owner's, else the readers' (whose
        lists for "every user" are most files: only when nothing else narrows); never a
        walk of the newest files (that is what the walk could not settle) nor a read of
        the whole table. Bitmap scans only."""
        readers = "f.readers && %(readers)s::bigint[]"
        if way.by_terms or way.scope:  # a filter only, not the index
            readers = "(f.readers || '{}'::bigint[]) && %(readers)s::bigint[]"
        where = " AND ".join([readers, *way.indexed, *way.scope, *_after(params)])
        db.execute(
            "SELECT set_config('enable_indexscan', 'off', true),"
            " set_config('enable_indexonlyscan', 'off', true),"
            " set_config('enable_seqscan', 'off', true)"
        )
        found = db.execute(
            f"SELECT f.file_id, {way.holds} FROM files f WHERE {where}"
            " ORDER BY f.shared_at DESC, f.file_id LIMIT %(wanted)s",
            {**params, "wanted": examined.wanted},
            prepare=False,  # the plan depends on how common the terms are
        ).fetchall()
        examined.feed((row[0], bool(row[1])) for row in found)
        if examined.partial is None:  # fewer than asked: no candidate left
            examined.partial = False

    def visible_file(self, file_id: str, user_id: int) -> FileEntry | None:
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files f JOIN users u ON u.id = f.owner_id"
            f" WHERE f.file_id = %(file_id)s AND {_VISIBLE}",
            {"file_id": file_id, "me": user_id},
        )
        return _file_entry(rows[0]) if rows else None

    def files_by_prefix(self, user_id: int, prefix: str, limit: int) -> list[IdMatch]:
        # A range scan of the primary key: ids are lowercase hex, so every id that
        # starts with the prefix sorts before the prefix followed by "g".
        rows = self._query(
            "SELECT f.file_id, u.username, f.name FROM files f JOIN users u ON u.id = f.owner_id"
            f" WHERE f.file_id >= %(low)s AND f.file_id < %(high)s AND {_VISIBLE}"
            " ORDER BY f.file_id LIMIT %(limit)s",
            {"low": prefix, "high": prefix + "g", "me": user_id, "limit": limit},
        )
        return [IdMatch(row[0], row[1], row[2]) for row in rows]

    def online_holders(self, file_id: str, now: int) -> list[Presence]:
        # A heartbeat that raced a `user disable` may have left a presence: not listed.
        online = (
            "JOIN presence p ON p.user_id = u.id AND p.online_until > %(now)s AND NOT u.disabled"
        )
        columns = "u.username, p.endpoint, u.rsa_public, u.curve_public, p.online_until"
        rows = self._query(  # one statement: the owner first, then the freshest seeders
            f"(SELECT 0, {columns} FROM files f JOIN users u ON u.id = f.owner_id {online}"
            " WHERE f.file_id = %(file_id)s)"
            f" UNION ALL (SELECT 1, {columns} FROM holders h"
            f" JOIN users u ON u.id = h.user_id {online} WHERE h.file_id = %(file_id)s"
            " ORDER BY p.online_until DESC LIMIT %(limit)s)"
            " ORDER BY 1, 6 DESC",
            {"file_id": file_id, "now": now, "limit": MAX_HOLDERS},
        )
        return [
            Presence(row[1], row[2], KeyBundle(bytes(row[3]), bytes(row[4])), int(row[5]))
            for row in rows[:MAX_HOLDERS]
        ]

    def signed_access(self, file_id: str) -> list[str] | None:
        rows = self._query("SELECT signed_access FROM files WHERE file_id = %s", (file_id,))
        if not rows or rows[0][0] is None:
            return None
        return list(json.loads(rows[0][0]))

    def add_holder(self, file_id: str, user_id: int) -> None:
        self._query(
            "INSERT INTO holders (file_id, user_id) VALUES (%s, %s)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (file_id, user_id),
        )

    def remove_holder(self, file_id: str, user_id: int) -> bool:
        rows = self._query(
            "DELETE FROM holders WHERE file_id = %s AND user_id = %s RETURNING 1",
            (file_id, user_id),
        )
        return bool(rows)

    def stats(self, now: int) -> Stats:
        with self._transaction() as db:
            users = db.execute(
                "SELECT u.username, NOT u.disabled AND EXISTS (SELECT 1 FROM presence p"
                " WHERE p.user_id = u.id AND p.online_until > %s) FROM users u"
                " ORDER BY u.username",
                (now,),
            ).fetchall()
            files = db.execute("SELECT count(*) FROM files").fetchone()
            online = db.execute(
                "SELECT u.username, p.endpoint, p.online_until FROM presence p"
                " JOIN users u ON u.id = p.user_id WHERE p.online_until > %s"
                " AND NOT u.disabled ORDER BY u.username",
                (now,),
            ).fetchall()
        return Stats(
            [(row[0], bool(row[1])) for row in users],
            int(files[0]) if files else 0,
            [(row[0], row[1], int(row[2])) for row in online],
        )

    # --- operators -----------------------------------------------------------------------

    def accounts(self, now: int) -> list[Account]:
        rows = self._query(
            "SELECT u.username, u.created_at, coalesce(g.files, 0), NOT u.disabled AND EXISTS"
            " (SELECT 1 FROM presence p WHERE p.user_id = u.id AND p.online_until > %s),"
            " u.disabled FROM users u LEFT JOIN usage g ON g.user_id = u.id"
            " ORDER BY u.username",
            (now,),
        )
        return [Account(r[0], int(r[1]), int(r[2]), bool(r[3]), bool(r[4])) for r in rows]

    def set_disabled(self, username: str, disabled: bool) -> bool:
        with self._transaction() as db:
            found = db.execute(
                "UPDATE users SET disabled = %s WHERE username = %s RETURNING id",
                (disabled, username),
            ).fetchone()
            if found is None:
                return False
            if disabled:  # every broker reads sessions from here: refused from now on
                db.execute("DELETE FROM sessions WHERE user_id = %s", (found[0],))
                db.execute("DELETE FROM presence WHERE user_id = %s", (found[0],))
            self._set_readers(db, "f.owner_id = %s", (found[0],))
        time.sleep(LEASE)  # an operator's change: every broker's cache holds it on return
        return True

    def delete_user(self, username: str) -> bool:
        # Sessions, presence, files (with their access lists and holders), its place on
        # access lists and its copies go with it: ON DELETE CASCADE.
        with self._transaction() as db:
            found = db.execute(
                "DELETE FROM users WHERE username = %s RETURNING id", (username,)
            ).fetchone()
            if found is None:
                return False
            db.execute(  # off the readers of the files whose access lists named it
                "UPDATE files SET readers = array_remove(readers, %s)"
                " WHERE readers @> ARRAY[%s::bigint]",
                (found[0], found[0]),
            )
        time.sleep(LEASE)  # as in set_disabled
        return True
