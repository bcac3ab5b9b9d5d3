"""sfs.broker.store: what is particular to the SQLite store (schema, migration, the FTS5
index, the file); test_store_contract.py holds what every backend must do."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sfs.broker import store as store_module
from sfs.broker.store import (
    SCHEMA_VERSION,
    Quota,
    QuotaExceeded,
    SqliteStore,
    User,
)
from sfs.common.errors import StorageError
from tests.unit import test_store_contract as contract
from tests.unit.test_store_contract import (
    HASH,
    bundle_for,
    entry,
    fid,
)
from tests.unit.tree_records import assert_filled_in, rows_to_fill_in


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(db_path)
    yield store
    store.close()


@pytest.fixture
def users(store: SqliteStore) -> dict[str, User]:
    return {
        name: store.add_user(name, HASH, bundle_for(i), now=1)
        for i, name in enumerate(("alice", "bob", "carol"), start=1)
    }


# --- schema and the database file ------------------------------------------------------------


def test_new_database_records_the_schema_version(store: SqliteStore, db_path: Path) -> None:
    assert SCHEMA_VERSION >= 1
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {r[0] for r in rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "sessions", "presence", "files", "access"} <= tables


def test_database_uses_wal_and_foreign_keys(store: SqliteStore, db_path: Path) -> None:
    assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]
    with pytest.raises(StorageError):  # a session for a user that does not exist
        store.add_session(b"t" * 32, user_id=999, expires_at=10, now=0)


def test_reopening_keeps_the_data_and_the_version(db_path: Path) -> None:
    first = SqliteStore(db_path)
    alice = first.add_user("alice", HASH, bundle_for(1), now=1)
    first.add_file(alice.id, entry(fid(1), keywords=["kw"]), None)
    first.close()

    second = SqliteStore(db_path)
    try:
        assert second.get_user("alice") == alice
        assert second.visible_file(fid(1), alice.id) == entry(fid(1), keywords=["kw"])
        second.add_user("bob", HASH, bundle_for(2), now=2)  # still writable
    finally:
        second.close()
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_a_database_from_a_newer_version_is_refused(db_path: Path) -> None:
    SqliteStore(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SqliteStore(db_path)
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]  # left alone


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an sqlite database, just some text" * 100)
    with pytest.raises(StorageError, match="database"):
        SqliteStore(db_path)


def test_an_unreachable_path_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        SqliteStore(tmp_path / "missing-dir" / "broker.db")


def test_database_files_are_private_even_with_a_lax_umask(db_path: Path) -> None:
    old = os.umask(0)
    try:
        store = SqliteStore(db_path)
        try:
            store.add_user("alice", HASH, bundle_for(1), now=1)
            for path in (db_path, db_path.with_name("broker.db-wal")):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        finally:
            store.close()
    finally:
        os.umask(old)


# --- users -------------------------------------------------------------------------------------


# --- sessions ---------------------------------------------------------------------------------


def session_expiry(db_path: Path, token_hash: bytes) -> int | None:
    found = rows(db_path, "SELECT expires_at FROM sessions WHERE token_hash = ?", (token_hash,))
    return found[0][0] if found else None


def test_session_expiry_slides_in_coarse_steps(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    day = 24 * 3600
    store.add_session(b"t", users["alice"].id, expires_at=day, now=0)
    store.session_user(b"t", now=10, extend_to=day + 200)  # within 300 s: not worth a write
    assert session_expiry(db_path, b"t") == day
    store.session_user(b"t", now=20, extend_to=day + 400)
    assert session_expiry(db_path, b"t") == day + 400
    assert store.session_user(b"t", now=day + 300, extend_to=day + 300) == users["alice"]


def test_add_session_drops_expired_sessions(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    store.add_session(b"old", users["alice"].id, expires_at=100, now=0)
    store.add_session(b"live", users["bob"].id, expires_at=500, now=0)
    store.add_session(b"new", users["alice"].id, expires_at=600, now=100)
    assert {r[0] for r in rows(db_path, "SELECT token_hash FROM sessions")} == {b"live", b"new"}


# --- presence and stats ---------------------------------------------------------------------


# --- files: visibility ----------------------------------------------------------------------


def test_replacing_a_file_replaces_its_access_list(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    store.add_file(alice.id, entry(fid(1), name="v1"), ["bob"])
    store.add_file(alice.id, entry(fid(1), name="v2"), ["carol"])
    assert store.visible_file(fid(1), bob.id) is None
    found = store.visible_file(fid(1), carol.id)
    assert found is not None and found.name == "v2"
    store.add_file(alice.id, entry(fid(1), name="v3"), None)
    assert store.visible_file(fid(1), bob.id) is not None
    assert rows(db_path, "SELECT count(*) FROM access") == [(0,)]
    assert store.stats(now=0).files == 1


# --- files: quota ---------------------------------------------------------------------------


def usage(path: Path) -> dict[int, tuple[int, int]]:
    """Each user's files and manifest bytes as the triggers kept them, and recounted."""
    kept = {u: (f, b) for u, f, b in rows(path, "SELECT * FROM usage WHERE files > 0")}
    counted = rows(
        path,
        "SELECT owner_id, count(*), sum(length(manifest)) FROM files GROUP BY owner_id",
    )
    assert kept == {u: (f, b) for u, f, b in counted}
    return kept


def test_the_quota_counts_files_and_manifest_bytes_per_owner(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    alice, bob = users["alice"].id, users["bob"].id
    size = len(entry(fid(1)).manifest)  # the same for every fid
    quota = Quota(files=2, manifest_bytes=10 * size)
    store.add_file(alice, entry(fid(1)), None, quota)
    store.add_file(alice, entry(fid(2)), ["bob"], quota)
    store.add_file(alice, entry(fid(2)), None, quota)  # replacing: still two files
    with pytest.raises(QuotaExceeded) as over:
        store.add_file(alice, entry(fid(3)), None, quota)
    assert (over.value.files, over.value.manifest_bytes, over.value.adding) == (2, 2 * size, size)
    store.add_file(bob, entry(fid(3), "bob"), None, quota)  # bob has his own
    assert usage(db_path) == {alice: (2, 2 * size), bob: (1, size)}
    assert store.remove_file(fid(1), alice)
    store.add_file(alice, entry(fid(4)), None, quota)
    with pytest.raises(QuotaExceeded):
        store.add_file(bob, entry(fid(5), "bob"), None, Quota(10, 2 * size - 1))
    assert usage(db_path) == {alice: (2, 2 * size), bob: (1, size)}
    assert store.visible_file(fid(5), bob) is None  # nothing of a refused file is kept


# --- files: search ------------------------------------------------------------------------


def names(store: SqliteStore, user: User, terms: list[str], owner: str | None = None) -> list[str]:
    return [h.file.name for h in store.search(user.id, terms, owner, 100, 0)]


# --- search index (schema 2): order, ties, staying in step, the same answers as LIKE ----------


def test_search_reads_no_more_rows_than_it_needs(
    store: SqliteStore, users: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What keeps search fast with a million files: rows come newest first and the search
    # stops reading after `limit` of them (plus the rest of the last one's second).
    for n in range(300):
        store.add_file(users["alice"].id, entry(fid(n), name=f"file-{n}", shared_at=n // 3), None)
    connection, fetched = store._connection(), []

    class Counted:
        def __init__(self, cursor: sqlite3.Cursor) -> None:
            self.cursor = cursor

        def __iter__(self) -> Iterator[Any]:
            for row in self.cursor:
                fetched.append(row)
                yield row

        def fetchall(self) -> list[Any]:
            return self.cursor.fetchall()

        def close(self) -> None:
            self.cursor.close()

    class Connection:
        def execute(self, *args: Any) -> Counted:
            return Counted(connection.execute(*args))

    monkeypatch.setattr(store, "_connection", Connection)
    for terms, owner in [([], None), (["file"], None), (["fi"], None), ([], "alice")]:
        fetched.clear()
        hits = store.search(users["bob"].id, terms, owner, 10, 0)
        assert [h.file.file_id for h in hits] == [
            fid(n) for n in [297, 298, 299, 294, 295, 296, 291, 292, 293, 288]
        ]
        assert len(fetched) == 13  # 9 from seconds 99-97, 3 from 96, 1 from 95


def test_files_by_prefix_is_a_range_scan_of_the_primary_key(
    store: SqliteStore, users: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(50):
        store.add_file(users["alice"].id, entry(fid(n)), None)
    connection, asked = store._connection(), []

    class Recorded:
        def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
            asked.append((sql, params))
            return connection.execute(sql, params)

    monkeypatch.setattr(store, "_connection", Recorded)
    found = store.files_by_prefix(users["bob"].id, fid(7), 10)
    assert [m.file_id for m in found] == [fid(7)]
    [(sql, params)] = asked
    plan = " ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "SEARCH f USING INDEX sqlite_autoindex_files_1 (file_id>? AND file_id<?)" in plan
    assert "SCAN f" not in plan


def index_rows(db_path: Path) -> int:
    # A plain connection, without the store's SQL functions, can read the index.
    return int(rows(db_path, "SELECT count(*) FROM file_search")[0][0])


def test_the_index_follows_replace_and_remove(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    alice, bob = users["alice"], users["bob"]
    store.add_file(alice.id, entry(fid(1), name="first-name.txt", keywords=["alpha"]), None)
    store.add_file(alice.id, entry(fid(2), name="other.txt"), None)
    store.add_file(alice.id, entry(fid(1), name="second-name.txt", keywords=["beta"]), ["bob"])
    assert index_rows(db_path) == 2
    assert names(store, bob, ["first"]) == names(store, bob, ["alpha"]) == []
    assert names(store, bob, ["second"]) == names(store, bob, ["beta"]) == ["second-name.txt"]
    assert store.remove_file(fid(1), alice.id)
    assert names(store, bob, ["second"]) == []
    assert index_rows(db_path) == 1
    assert names(store, bob, ["other"]) == ["other.txt"]


def test_short_terms_are_found_anywhere_in_names_and_keywords(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    # The end of a name or of the last keyword starts no trigram of its own: the padding.
    files = [("ab", []), ("x.q", ["ok"]), ("z", ["de", "f"]), ("日本", [])]
    for n, (name, keywords) in enumerate(files, start=1):
        store.add_file(users["alice"].id, entry(fid(n), name=name, keywords=keywords), None)
    bob = users["bob"]
    for term, expected in [
        ("a", ["ab"]), ("b", ["ab"]), ("ab", ["ab"]), ("q", ["x.q"]), (".q", ["x.q"]),
        ("k", ["x.q"]), ("ok", ["x.q"]), ("z", ["z"]), ("f", ["z"]), ("e", ["z"]),
        ("本", ["日本"]), ("日本", ["日本"]), ("ba", []), ("qx", []), ("本日", []),
    ]:  # fmt: skip
        assert names(store, bob, [term]) == expected, term


def test_a_term_with_the_padding_character_is_matched_as_before(
    store: SqliteStore, users: dict[str, User]
) -> None:
    store.add_file(users["alice"].id, entry(fid(1), name="a\x1fb"), None)
    store.add_file(users["alice"].id, entry(fid(2), name="ab"), None)
    assert (
        names(store, users["bob"], ["\x1f"]) == names(store, users["bob"], ["A\x1f"]) == ["a\x1fb"]
    )
    assert names(store, users["bob"], ["b\x1f"]) == []


def test_owner_filter_is_exact_whatever_the_user_ids(store: SqliteStore, db_path: Path) -> None:
    # The index finds an owner by the trigrams of "<id>": "<12" and "23>" are those of
    # user 123, and of user 1223 too.
    db = sqlite3.connect(db_path)
    for user_id in (123, 1223, 12, 23):
        db.execute(
            "INSERT INTO users (id, username, password_hash, rsa_public, curve_public,"
            " created_at) VALUES (?, ?, ?, ?, ?, 1)",
            (user_id, f"u{user_id}", HASH, b"r", user_id.to_bytes(32, "big")),
        )
    db.commit()
    db.close()
    for user_id in (123, 1223, 12, 23):
        store.add_file(user_id, entry(fid(user_id), f"u{user_id}", f"of-{user_id}"), None)
    for user_id in (123, 1223, 12, 23):
        assert names(store, User(1, "x", HASH, bundle_for(1)), [], f"u{user_id}") == [
            f"of-{user_id}"
        ]


@pytest.mark.parametrize("cap", [0, 1, 4, 10**9], ids=["phrase", "cap1", "cap4", "scan"])
@pytest.mark.parametrize(
    "contract_test",
    [
        contract.test_private_files_of_others_change_nothing_in_a_search,
        contract.test_a_search_past_its_budget_says_partial,
        contract.test_a_user_who_sees_nothing_finds_nothing_and_nothing_partial,
        contract.test_search_answers_as_the_model,
        contract.test_a_two_character_term_narrows_the_candidates_a_single_one_does_not,
    ],
    ids=["private", "partial", "sees-nothing", "model", "short+word"],
)
def test_both_ways_to_the_visible_files_answer_as_the_contract(
    monkeypatch: pytest.MonkeyPatch,
    store: SqliteStore,
    users: dict[str, User],
    cap: int,
    contract_test: Any,
) -> None:
    # A search reads the index by its terms and checks each row's readers for at most
    # `_SCAN_CAP` rows, then asks the index for the caller's readers: both ways, and a
    # switch from one to the other part way, give the contract's answers.
    monkeypatch.setattr(store_module, "_SCAN_CAP", cap)
    contract_test(store=store, users=users)


@pytest.mark.parametrize("terms", [["z"], ["z", "data"], []], ids=["short", "short+word", "none"])
def test_files_the_caller_sees_do_not_count_towards_the_switch(
    monkeypatch: pytest.MonkeyPatch, store: SqliteStore, users: dict[str, User], terms: list[str]
) -> None:
    # The switch to the readers' phrase bounds what a caller who sees few files reads;
    # a caller who sees every file reads its budget of rows by its terms alone, and does
    # not read them again by the phrase (which cost most of "short + word" at 1M files).
    monkeypatch.setattr(store_module, "_SCAN_CAP", 3)
    for n in range(1, 9):
        store.add_file(users["alice"].id, entry(fid(n), name=f"data-{n}", shared_at=n), None)
    ways: list[int | None] = []
    examine = store._examine

    def recorded(*args: Any) -> Any:
        ways.append(args[-1])  # the cap: None for the phrase
        return examine(*args)

    monkeypatch.setattr(store, "_examine", recorded)
    found = store.search(users["bob"].id, terms, None, 10, 0, budget=5)
    assert (len(found), found.partial) == (0 if terms else 5, True)
    assert ways == [3]


def test_a_search_of_several_words_asks_the_index_for_the_rarest_trigram_of_each(
    monkeypatch: pytest.MonkeyPatch, store: SqliteStore, users: dict[str, User]
) -> None:
    # FTS5 intersects the lists of every trigram it is asked for before it hands out a
    # row: two common words took 4-14 ms at 1M files with every third trigram of each
    # (`_cover`), 1-2 ms with the rarest of each, the rest checked by instr.
    names_ = ["report", "report", "report", "reportage", "repair", "summary", "report summary"]
    for n, name in enumerate(names_, start=1):
        store.add_file(users["alice"].id, entry(fid(n), name=name, shared_at=n), None)
    asked: list[object] = []
    examine = store._examine

    def recorded(sql: str, params: dict[str, object], *rest: Any) -> Any:
        asked.append(params["match"])
        return examine(sql, params, *rest)

    monkeypatch.setattr(store, "_examine", recorded)
    assert names(store, users["bob"], ["REPORT", "summary"]) == ["report summary"]
    # Of each cover: "rep" is in 6 files, "ort" in 5; "sum", "mar" and "ary" in 2 each
    # (a tie goes by text).
    assert asked == ['{name keywords} : ("ort" AND "ary")']
    asked.clear()
    # One term: its cover, as before (counting would cost more than it saves).
    assert names(store, users["bob"], ["report"]) == [
        "report summary",
        "reportage",
        "report",
        "report",
        "report",
    ]
    assert asked == ['{name keywords} : ("rep" AND "ort")']
    # A query of many words counts a few trigrams; the others count as common.
    counted: list[str] = []
    count = store._rows_holding
    monkeypatch.setattr(store, "_rows_holding", lambda t: counted.append(t) or count(t))
    monkeypatch.setattr(store_module, "_COUNTS_PER_SEARCH", 2)
    store._holding.clear()
    asked.clear()
    assert names(store, users["bob"], ["report", "summary", "repair"]) == []
    assert counted == ["rep", "ort"]
    assert asked == ['{name keywords} : ("ort" AND "ary" AND "rep")']  # "rep" known


# --- migration from schema 1 -------------------------------------------------------------------


def make_v1_database(path: Path) -> None:
    """A database as the schema-1 broker wrote it: its script, its statements."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys=ON")
    for statement in store_module._MIGRATIONS[1].split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    for n, name in enumerate(["alice", "bob", "carol"], start=1):
        db.execute(
            "INSERT INTO users (username, password_hash, rsa_public, curve_public, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (name, HASH, bundle_for(n).rsa_public, bundle_for(n).curve_public, 1),
        )
    v1_files = [  # file, owner id, name, keywords, public, shared_at
        (fid(1), 1, "Report.PDF", "thesis", 1, 10),
        (fid(2), 1, "ÉTÉ.jpg", "été\nok", 1, 20),
        (fid(4), 2, "tie-b.txt", "", 1, 30),
        (fid(3), 2, "tie-a.txt", "", 1, 30),
        (fid(5), 2, "b-private", "thesis", 0, 40),
        (fid(6), 1, "old.txt", "", 1, -5),
    ]
    for file_id, owner_id, name, keywords, public, shared_at in v1_files:
        db.execute(
            "INSERT OR REPLACE INTO files (file_id, owner_id, name, size, keywords, manifest,"
            " signature, public, shared_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                file_id,
                owner_id,
                name,
                10,
                keywords,
                b"m:" + file_id.encode(),
                b"sig",
                public,
                shared_at,
            ),
        )
    db.execute("INSERT INTO access (file_id, user_id) VALUES (?, 1)", (fid(5),))
    db.close()


def test_a_schema_1_database_is_migrated(db_path: Path) -> None:
    make_v1_database(db_path)
    store = SqliteStore(db_path)
    try:
        alice, bob, carol = (store.get_user(n) for n in ("alice", "bob", "carol"))
        assert alice is not None and bob is not None and carol is not None
        assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert index_rows(db_path) == 6
        everything = ["b-private", "tie-a.txt", "tie-b.txt", "ÉTÉ.jpg", "Report.PDF", "old.txt"]
        assert names(store, alice, []) == everything
        assert names(store, carol, []) == everything[1:]  # b-private: bob and alice only
        assert names(store, alice, ["thesis"]) == ["b-private", "Report.PDF"]
        assert names(store, carol, ["thesis"]) == ["Report.PDF"]
        assert names(store, carol, ["été"]) == names(store, carol, ["ok"]) == ["ÉTÉ.jpg"]
        assert names(store, carol, ["ti"]) == ["tie-a.txt", "tie-b.txt"]
        assert names(store, carol, [], owner="bob") == ["tie-a.txt", "tie-b.txt"]
        found = store.visible_file(fid(1), carol.id)
        assert found is not None and found.keywords == ["thesis"]

        # Files shared after the migration sort among the old ones and leave the index
        # with them; a file from the same second as two old ones goes between them.
        store.add_file(bob.id, entry(fid(7), "bob", "tie-new.txt", shared_at=30), None)
        store.add_file(bob.id, entry(fid(0), "bob", "tie-0.txt", shared_at=30), None)
        assert names(store, carol, ["tie"]) == [
            "tie-0.txt",
            "tie-a.txt",
            "tie-b.txt",
            "tie-new.txt",
        ]
        assert store.remove_file(fid(3), bob.id)
        assert names(store, carol, ["tie"]) == ["tie-0.txt", "tie-b.txt", "tie-new.txt"]
        assert index_rows(db_path) == 7
        assert usage(db_path) == {alice.id: (3, 3 * 34), bob.id: (4, 2 * 34 + 2 * 41)}  # schema 4
    finally:
        store.close()


def test_schema_9_reads_each_share_s_kind_and_files_from_its_stored_header(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 8)
    old = SqliteStore(db_path)
    alice = old.add_user("alice", HASH, bundle_for(1), now=1)
    old.close()
    db = sqlite3.connect(db_path, isolation_level=None)
    store_module.add_sql_functions(db)
    for n, manifest in enumerate(rows_to_fill_in(), start=1):
        db.execute(
            "INSERT INTO files (file_id, owner_id, name, size, keywords, manifest, signature,"
            " public, shared_at) VALUES (?, ?, ?, 0, '', ?, x'', 1, ?)",
            (fid(n), alice.id, f"share{n}", manifest, n),
        )
    db.close()
    monkeypatch.undo()
    store = SqliteStore(db_path)
    try:
        assert_filled_in(store, alice.id, [fid(n) for n in (1, 2, 3)])
    finally:
        store.close()
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def pair_rows(db_path: Path) -> set[tuple[int, int]]:
    found = rows(db_path, "SELECT pair, sort_key FROM file_pairs")
    assert len(found) == len(set(found))
    return set(found)


def pairs_of_files(db_path: Path) -> set[tuple[int, int]]:
    """What `file_pairs` should hold: every 2-character run of each file's lowercased name
    and of its lowercased keywords (computed here in Python), with its sort key."""
    wanted = set()
    for name, keywords, sort_key in rows(db_path, "SELECT name, keywords, sort_key FROM files"):
        for text in (name.lower(), keywords.lower()):
            for i in range(len(text) - 1):
                wanted.add((ord(text[i]) << 21 | ord(text[i + 1]), sort_key))
    return wanted


def test_the_pairs_table_follows_every_write(
    store: SqliteStore, users: dict[str, User], db_path: Path
) -> None:
    # A 2-character term's files come from `file_pairs`: it must hold exactly the pairs of
    # the files as they are, whatever wrote them.
    alice, bob = users["alice"], users["bob"]
    store.add_file(alice.id, entry(fid(1), name="Résumé İ.JPG", keywords=["Kw", "two"]), None)
    store.add_file(bob.id, entry(fid(2), "bob", "bob's.txt", shared_at=100), ["alice"])
    store.add_file(bob.id, entry(fid(3), "bob", "gone.txt", shared_at=100), None)
    assert pair_rows(db_path) == pairs_of_files(db_path)
    assert len(pair_rows(db_path)) > 20
    store.add_file(alice.id, entry(fid(1), name="renamed", keywords=["new"], shared_at=9), None)
    assert store.remove_file(fid(3), bob.id)
    assert pair_rows(db_path) == pairs_of_files(db_path)
    assert store.delete_user("bob")
    assert pair_rows(db_path) == pairs_of_files(db_path)
    assert names(store, alice, ["ne", "ed"]) == ["renamed"]


def test_schema_10_fills_the_pairs_table_for_the_files_there(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 9)
    old = SqliteStore(db_path)
    alice = old.add_user("alice", HASH, bundle_for(1), now=1)
    for n in range(1, 4):
        old.add_file(alice.id, entry(fid(n), name=f"Old share {n}.pdf", shared_at=n), None)
    old.close()
    monkeypatch.undo()
    store = SqliteStore(db_path)
    try:
        assert pair_rows(db_path) == pairs_of_files(db_path)
        assert names(store, alice, ["2.", "share"]) == ["Old share 2.pdf"]
    finally:
        store.close()
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_an_old_sqlite_is_refused_with_a_clear_message(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StorageError, match=r"SQLite 3\.34 or newer.*3\.31\.1"):
        SqliteStore(db_path)


def test_each_store_s_schema_version_is_its_newest_migration() -> None:
    """Two branches that each added a migration once left a store a version short."""
    from sfs.broker import postgres_store, store

    for module in (store, postgres_store):
        migrations = module._MIGRATIONS  # type: ignore[attr-defined]
        assert sorted(migrations) == list(range(1, len(migrations) + 1)), module.__name__
        assert max(migrations) == module.SCHEMA_VERSION, module.__name__
