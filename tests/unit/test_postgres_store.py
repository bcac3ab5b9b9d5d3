"""What is particular to the PostgreSQL store: its schema, several brokers on one
database, and its errors. test_store_contract.py holds what every backend must do."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sfs.broker import postgres_store
from sfs.broker.migrate import copy_index
from sfs.broker.postgres_store import SCHEMA_VERSION, PostgresStore, describe
from sfs.broker.store import SqliteStore
from sfs.broker.store_contract import FileEntry, Quota, QuotaExceeded
from sfs.broker.throttle import Challenges, LoginThrottle
from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import Refused
from tests.postgres import REQUIRE, Cluster, unavailable
from tests.unit import test_store_contract as contract
from tests.unit.tree_records import assert_filled_in, rows_to_fill_in

HASH = b"$2b$04$" + b"h" * 53


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def entry(n: int, name: str = "file.txt") -> FileEntry:
    return FileEntry(f"{n:032x}", "alice", name, 1, ["Kw"], b"m" * 10, b"sig", 100)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_url)
    yield store
    store.close()


def in_threads(count: int, work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(n: int) -> None:
        start.wait()
        try:
            work(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_files_by_prefix_is_a_range_scan_of_the_primary_key(
    store: PostgresStore, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = store.add_user("alice", HASH, KeyBundle(b"rsa", b"\x01" * 32), now=1)
    for n in range(50):
        store.add_file(alice.id, entry(n), None)
    asked: list[tuple[str, Any]] = []
    query = store._query

    def recorded(statement: str, params: Any = (), prepare: bool | None = None) -> Any:
        asked.append((statement, params))
        return query(statement, params, prepare)

    monkeypatch.setattr(store, "_query", recorded)
    assert [m.file_id for m in store.files_by_prefix(alice.id, f"{7:032x}", 10)] == [f"{7:032x}"]
    [(statement, params)] = asked
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("SET enable_seqscan = off")  # 50 rows: a table this small is read whole
        plan = "\n".join(row[0] for row in db.execute(f"EXPLAIN {statement}", params))
    assert "Index Cond: ((file_id >= " in plan and "AND (file_id < " in plan, plan


def test_schema_version_folded_columns_and_soft_presence(
    store: PostgresStore, postgres_url: str
) -> None:
    assert sql(postgres_url, "SELECT version FROM sfs_schema") == [(SCHEMA_VERSION,)]
    alice = store.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
    store.add_file(alice.id, entry(1, "İSTANBUL.txt"), None)
    # Folded by Python's str.lower, not by the database's lower().
    assert sql(postgres_url, "SELECT folded_name, folded_keywords FROM files") == [
        ("i̇stanbul.txt", "kw")
    ]
    persistence = sql(
        postgres_url,
        "SELECT relname, relpersistence FROM pg_class WHERE relname IN ('presence', 'files')"
        " ORDER BY relname",
    )
    assert persistence == [("files", "p"), ("presence", "u")]  # u: unlogged


def test_a_database_from_a_newer_version_is_refused(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    sql(postgres_url, "UPDATE sfs_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade sfs"):
        PostgresStore(postgres_url)
    assert sql(postgres_url, "SELECT version FROM sfs_schema") == [(SCHEMA_VERSION + 1,)]


def test_brokers_starting_together_migrate_once(postgres_url: str) -> None:
    stores: list[PostgresStore] = []
    errors = in_threads(3, lambda n: stores.append(PostgresStore(postgres_url, pool_size=1)))
    for store in stores:
        store.close()
    assert errors == []
    assert sql(postgres_url, "SELECT version FROM sfs_schema") == [(SCHEMA_VERSION,)]


def test_two_brokers_share_users_sessions_and_files(postgres_url: str) -> None:
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        alice = first.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
        first.add_session(b"token", alice.id, expires_at=100, now=0)
        assert second.session_user(b"token", now=50, extend_to=100) == alice
        second.add_file(alice.id, entry(1), None)
        assert [h.file.file_id for h in first.search(alice.id, ["file"], None, 10, 0)] == [
            entry(1).file_id
        ]
        second.delete_session(b"token")
        assert first.session_user(b"token", now=50, extend_to=100) is None
    finally:
        first.close()
        second.close()


def test_the_quota_holds_across_brokers_adding_at_once(postgres_url: str) -> None:
    stores = [PostgresStore(postgres_url, pool_size=1) for _ in range(4)]
    try:
        alice = stores[0].add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
        quota = Quota(files=1, manifest_bytes=1000)
        errors = in_threads(4, lambda n: stores[n].add_file(alice.id, entry(n), None, quota))
        assert len(errors) == 3 and all(isinstance(e, QuotaExceeded) for e in errors)
        assert stores[0].stats(now=0).files == 1
    finally:
        for store in stores:
            store.close()


def test_a_bad_url_is_a_storage_error_without_the_password() -> None:
    with pytest.raises(StorageError, match="not a valid PostgreSQL URL") as refused:
        PostgresStore("postgresql://sfs:hunter2@[::1/x?sslmode")
    assert "hunter2" not in str(refused.value)
    assert describe("postgresql://sfs:hunter2@db:5433/index") == "postgresql://sfs@db:5433/index"


def test_pg_dump_and_pg_restore_keep_the_index(postgres_cluster: Cluster, tmp_path: Path) -> None:
    # The backup and restore the README documents, with this cluster's own binaries.
    dump = tmp_path / "sfs.dump"
    with postgres_cluster.database() as url:
        store = PostgresStore(url)
        alice = store.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
        store.add_file(alice.id, entry(1, "Report.pdf"), ["bob"])
        store.add_session(b"token", alice.id, expires_at=100, now=0)
        store.close()
        tool = str(postgres_cluster.bindir / "pg_dump")
        subprocess.run([tool, "-Fc", "-d", url, "-f", str(dump)], check=True, timeout=60)
    with postgres_cluster.database() as restored:
        tool = str(postgres_cluster.bindir / "pg_restore")
        subprocess.run([tool, "-d", restored, str(dump)], check=True, timeout=60)
        store = PostgresStore(restored)
        try:
            assert store.get_user("alice") == alice
            assert store.session_user(b"token", now=1, extend_to=1) == alice
            assert [h.file.name for h in store.search(alice.id, ["REPORT"], None, 9, 0)] == [
                "Report.pdf"
            ]
            assert store.signed_access(entry(1).file_id) == ["bob"]
            bob = store.add_user("bob", HASH, KeyBundle(b"r", b"b" * 32), now=2)
            assert bob.id > alice.id
        finally:
            store.close()


def test_without_postgresql_tests_skip_unless_ci_requires_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        unavailable("PostgreSQL is not installed")
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="must run"):
        unavailable("PostgreSQL is not installed")


def test_brokers_share_the_login_throttle_and_the_challenges(postgres_url: str) -> None:
    brokers = [PostgresStore(postgres_url, pool_size=2) for _ in range(4)]
    try:
        clock = lambda: 1000.0  # noqa: E731
        gates = [LoginThrottle(b.limit_state(), clock, allowed=40, lockout=30) for b in brokers]
        # 40 failures from four brokers at once: none is lost, so the key is locked.
        errors = in_threads(4, lambda n: [gates[n].failed("login-user:alice") for _ in range(10)])
        assert errors == []
        for gate in gates:
            with pytest.raises(Refused, match="too many failed logins"):
                gate.check("login-user:alice")
        # A challenge issued by one broker is redeemed at another, once.
        issued = Challenges(brokers[0].limit_state(), clock, per_address=5).issue(b"k", "a")
        redeem = Challenges(brokers[1].limit_state(), clock, per_address=5).redeem
        redeem(issued, b"k")
        with pytest.raises(Refused, match="unknown or expired challenge"):
            Challenges(brokers[2].limit_state(), clock, per_address=5).redeem(issued, b"k")
    finally:
        for broker in brokers:
            broker.close()


def test_load_builds_the_file_indexes_again_and_the_readers(
    store: PostgresStore, postgres_url: str
) -> None:
    def indexes() -> list[tuple[str, str]]:
        return sql(
            postgres_url,
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'files' ORDER BY 1",
        )

    made_by_migrations = indexes()
    store.load(
        [
            ("users", ("id", "username", "password_hash", "rsa_public", "curve_public",
                       "created_at", "disabled"),
             [(7, "alice", HASH, b"r", b"a" * 32, 1, False),
              (9, "bob", HASH, b"r", b"b" * 32, 1, False)]),
            ("files", ("file_id", "owner_id", "name", "size", "keywords", "manifest",
                       "signature", "public", "shared_at", "grant_signature", "signed_access"),
             [(f"{1:032x}", 7, "shared.txt", 1, "", b"m", b"s", 0, 5, b"", '["bob"]'),
              (f"{2:032x}", 7, "public.txt", 1, "", b"m", b"s", 1, 6, b"", None)]),
            ("access", ("file_id", "user_id"), [(f"{1:032x}", 9)]),
        ]
    )  # fmt: skip
    assert indexes() == made_by_migrations
    assert [(a.username, a.files) for a in store.accounts(0)] == [("alice", 2), ("bob", 0)]
    readers = sql(postgres_url, "SELECT name, readers FROM files ORDER BY name")
    assert readers == [("public.txt", [0, 7]), ("shared.txt", [7, 9])]
    assert [h.file.name for h in store.search(9, ["txt"], None, 10, 0)] == [
        "public.txt",
        "shared.txt",
    ]


def test_schema_6_reads_each_share_s_kind_and_files_from_its_stored_header(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_store, "SCHEMA_VERSION", 5)
    old = PostgresStore(postgres_url)
    alice = old.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
    old.close()
    for n, manifest in enumerate(rows_to_fill_in(), start=1):
        sql(
            postgres_url,
            "INSERT INTO files (file_id, owner_id, name, size, keywords, manifest, signature,"
            " public, shared_at, grant_signature, folded_name, folded_keywords, readers)"
            " VALUES (%s, %s, %s, 0, '', %s, '', true, %s, '', %s, '', ARRAY[0, %s::bigint])",
            (f"{n:032x}", alice.id, f"share{n}", manifest, n, f"share{n}", alice.id),
        )
    monkeypatch.undo()
    store = PostgresStore(postgres_url)
    try:
        assert_filled_in(store, alice.id, [f"{n:032x}" for n in (1, 2, 3)])
    finally:
        store.close()
    assert sql(postgres_url, "SELECT version FROM sfs_schema") == [(SCHEMA_VERSION,)]


def test_migrate_copies_each_share_s_kind_and_files(
    store: PostgresStore, postgres_url: str, tmp_path: Path
) -> None:
    source = SqliteStore(tmp_path / "broker.db")
    alice = source.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
    folder = dataclasses.replace(entry(1, "photos"), kind="folder", files=600)
    source.add_file(alice.id, folder, None)
    source.add_file(alice.id, entry(2), None)
    source.close()
    copy_index(tmp_path / "broker.db", store)
    assert store.visible_file(folder.file_id, alice.id) == folder
    assert [(h.file.kind, h.file.files) for h in store.search(alice.id, [], None, 5, 9)] == [
        ("folder", 600),
        ("file", 1),
    ]


# (first walk, most of a further walk): indexes only; a walk of one row, then of at most
# three at a time; a walk of two rows, then the indexes.
_WAYS = {"index": (0, 0), "walk1": (1, 3), "walk2-index": (2, 0)}


def _walk_ways(monkeypatch: pytest.MonkeyPatch, way: str, trigram_list: bool) -> None:
    """`way` of `_WAYS`; with `trigram_list`, a walk goes through the list of the rarest
    trigram of the terms even with an owner (whose files are fewer here), else through
    the newest files (of the owner) whatever the terms."""
    first, most = _WAYS[way]
    monkeypatch.setattr(postgres_store, "_FIRST_WALK", first)
    monkeypatch.setattr(postgres_store, "_MOST_WALK", most)
    walked = postgres_store._UNKNOWN_ROWS if trigram_list else -1
    monkeypatch.setattr(PostgresStore, "_files_walked", staticmethod(lambda db, params: walked))


@pytest.mark.parametrize(
    ("contract_test", "way"),
    [
        (test, way)
        for test in (
            contract.test_private_files_of_others_change_nothing_in_a_search,
            contract.test_a_search_past_its_budget_says_partial,
            contract.test_a_user_who_sees_nothing_finds_nothing_and_nothing_partial,
            contract.test_search_is_newest_first_whatever_the_order_of_sharing,
            contract.test_a_term_without_a_run_of_letters_and_two_common_words_say_partial,
            contract.test_a_two_character_term_narrows_the_candidates_a_single_one_does_not,
        )
        for way in _WAYS
    ],
    ids=lambda value: (
        value if isinstance(value, str) else value.__name__.removeprefix("test_")[:24]
    ),
)
@pytest.mark.parametrize("trigram_list", [True, False], ids=["trigram-list", "newest"])
def test_every_way_to_the_candidates_answers_as_the_contract(
    monkeypatch: pytest.MonkeyPatch,
    store: PostgresStore,
    contract_test: Any,
    way: str,
    trigram_list: bool,
) -> None:
    # A search walks a list newest first (the files holding the rarest trigram of its
    # terms, or the newest files: `_FIRST_WALK` rows, then further walks of at most
    # `_MOST_WALK` rows while that looks cheaper), and otherwise asks the indexes for the
    # rest: every mix of them, switching at any row, gives the contract's answers.
    _walk_ways(monkeypatch, way, trigram_list)
    users = {
        name: store.add_user(name, HASH, KeyBundle(b"rsa-%d" % i, bytes([i]) * 32), now=1)
        for i, name in enumerate(("alice", "bob", "carol"), start=1)
    }
    contract_test(store=store, users=users)


@pytest.mark.parametrize("way", list(_WAYS))
@pytest.mark.parametrize("trigram_list", [True, False], ids=["trigram-list", "newest"])
def test_terms_no_trigram_narrows_answer_as_the_others(
    monkeypatch: pytest.MonkeyPatch, store: PostgresStore, way: str, trigram_list: bool
) -> None:
    # "t.p" and "é.b" hold no run of 3 letters: pg_trgm's indexes answer them by the
    # other terms, or read through the trigram index whole; `file_trigrams` has them.
    # The hits are the same every way.
    _walk_ways(monkeypatch, way, trigram_list)
    alice = store.add_user("alice", HASH, KeyBundle(b"rsa", b"\x01" * 32), now=1)
    names = ["report.pdf", "rapport.pdf", "report.txt", "é.b report", "é.bx", "REPORT.PDF"]
    for n, name in enumerate(names):
        store.add_file(alice.id, FileEntry(f"{n:032x}", "alice", name, 1, [], b"m", b"s", n), None)
    for terms, expected in [
        (["t.p"], ["REPORT.PDF", "rapport.pdf", "report.pdf"]),
        (["t.p", "report"], ["REPORT.PDF", "report.pdf"]),
        (["É.B", "report"], ["é.b report"]),
        (["é.b"], ["é.bx", "é.b report"]),
    ]:
        found = store.search(alice.id, terms, None, 10, 0, budget=2)
        assert [hit.file.name for hit in found] == expected[:2], terms
        assert found.partial is (len(expected) > 2), terms


def test_a_copied_index_lays_the_files_out_by_time(
    store: PostgresStore, postgres_url: str, tmp_path: Path
) -> None:
    # A search walks the newest files first: a copy laid out by time (as a broker's own
    # shares are) reads a few neighbouring rows per page instead of one page per row.
    from sfs.broker.migrate import copy_index
    from sfs.broker.store import SqliteStore

    source = SqliteStore(tmp_path / "broker.db")
    alice = source.add_user("alice", HASH, KeyBundle(b"rsa", b"\x01" * 32), now=1)
    times = [5, 1, 9, 3, 7, 2, 8]
    for n, shared_at in enumerate(times):  # ids in another order than the times
        source.add_file(alice.id, entry(n, f"at-{shared_at}"), None)
        source._connection().execute(
            "UPDATE files SET shared_at = ? WHERE file_id = ?", (shared_at, f"{n:032x}")
        )
    source.close()
    copy_index(tmp_path / "broker.db", store)
    laid_out = sql(postgres_url, "SELECT shared_at FROM files ORDER BY ctid")
    assert [row[0] for row in laid_out] == sorted(times)


def test_a_share_made_while_its_owner_is_being_disabled_is_nobody_s_to_read(
    store: PostgresStore, postgres_url: str
) -> None:
    """`set_disabled` empties the readers of the owner's files in its transaction; a file
    added meanwhile by another broker must not keep the readers of an enabled owner.
    Here the disabling transaction is held open, as a slower broker's would be. What
    orders them: both bump the one `generation` row in their transaction (its triggers),
    so the share waits for the disabling to commit, then computes its readers (without
    those triggers this test fails: `[0, 1]`)."""
    alice = store.add_user("alice", HASH, KeyBundle(b"rsa", b"\x01" * 32), now=1)
    with psycopg.connect(postgres_url) as disabling:
        disabling.execute("UPDATE users SET disabled = true WHERE id = %s", (alice.id,))
        disabling.execute(
            f"UPDATE files f SET readers = {postgres_store._READERS} FROM users u"
            " WHERE u.id = f.owner_id AND f.owner_id = %s",
            (alice.id,),
        )
        adding = threading.Thread(target=store.add_file, args=(alice.id, entry(1), None))
        adding.start()
        adding.join(2)  # without the owner's row locked, the share is in by now
        disabling.commit()
    adding.join(10)
    assert not adding.is_alive()
    assert sql(postgres_url, "SELECT readers FROM files") == [([],)]


def _trigrams_of_files(url: str) -> set[tuple[int, int, str]]:
    """What `file_trigrams` should hold: every 3-character and 2-character run of each
    file's folded name and of its folded keywords (computed here in Python), with its time
    and id."""
    wanted = set()
    for file_id, shared_at, name, keywords in sql(
        url, "SELECT file_id, shared_at, folded_name, folded_keywords FROM files"
    ):
        for text in (name, keywords):
            for width in (2, 3):
                for i in range(len(text) - width + 1):
                    run = text[i : i + width]
                    wanted.add((postgres_store.gram_code(run), shared_at, file_id))
    return wanted


def _trigram_rows(url: str) -> set[tuple[int, int, str]]:
    rows = sql(url, "SELECT trigram, shared_at, file_id FROM file_trigrams")
    assert len(rows) == len(set(rows))  # each trigram of a file once
    return set(rows)


def test_the_trigram_table_follows_every_write(store: PostgresStore, postgres_url: str) -> None:
    # A search walks the list of one trigram newest first: the table must hold exactly
    # the trigrams of the files as they are, whatever wrote them.
    alice = store.add_user("alice", HASH, KeyBundle(b"rsa", b"\x01" * 32), now=1)
    bob = store.add_user("bob", HASH, KeyBundle(b"rsa", b"\x02" * 32), now=1)
    store.add_file(alice.id, FileEntry(f"{1:032x}", "alice", f"Résumé {contract.CYRILLIC_A}.JPG", 1,
                                       ["Kw one", "two"], b"m", b"s", 5), None)  # fmt: skip
    store.add_file(bob.id, entry(2, "bob's.txt"), ["alice"])
    store.add_file(bob.id, entry(3, "gone.txt"), None)
    assert _trigram_rows(postgres_url) == _trigrams_of_files(postgres_url)
    assert (
        postgres_store.trigram_code(f"{contract.CYRILLIC_A}.j"),
        5,
        f"{1:032x}",
    ) in _trigram_rows(postgres_url)
    # Shared again with another name, keywords and time; removed; its owner deleted.
    store.add_file(alice.id, FileEntry(f"{1:032x}", "alice", "renamed", 1, ["new"], b"m",
                                       b"s", 9), None)  # fmt: skip
    assert store.remove_file(f"{3:032x}", bob.id)
    assert _trigram_rows(postgres_url) == _trigrams_of_files(postgres_url)
    assert store.delete_user("bob")
    assert _trigram_rows(postgres_url) == _trigrams_of_files(postgres_url)
    assert {row[2] for row in _trigram_rows(postgres_url)} == {f"{1:032x}"}


def test_schema_7_fills_the_trigram_table_for_the_files_there(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_store, "SCHEMA_VERSION", 6)
    old = PostgresStore(postgres_url)
    alice = old.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
    for n in range(1, 4):
        old.add_file(alice.id, entry(n, f"Old share {n}.pdf"), None)
    old.close()
    monkeypatch.undo()
    store = PostgresStore(postgres_url)
    try:
        assert len(_trigram_rows(postgres_url)) > 3 * 10
        assert _trigram_rows(postgres_url) == _trigrams_of_files(postgres_url)
        assert [h.file.name for h in store.search(alice.id, ["SHARE 2"], None, 5, 0)] == [
            "Old share 2.pdf"
        ]
    finally:
        store.close()
    assert sql(postgres_url, "SELECT version FROM sfs_schema") == [(SCHEMA_VERSION,)]


def test_schema_8_adds_the_pairs_of_the_files_there(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_store, "SCHEMA_VERSION", 7)
    old = PostgresStore(postgres_url)
    alice = old.add_user("alice", HASH, KeyBundle(b"r", b"a" * 32), now=1)
    for n in range(1, 4):
        old.add_file(alice.id, entry(n, f"Old share {n}.pdf"), None)
    old.close()
    assert postgres_store.gram_code("e ") not in {row[0] for row in _trigram_rows(postgres_url)}
    monkeypatch.undo()
    store = PostgresStore(postgres_url)
    try:
        assert _trigram_rows(postgres_url) == _trigrams_of_files(postgres_url)
        assert [h.file.name for h in store.search(alice.id, ["2.", "share"], None, 5, 0)] == [
            "Old share 2.pdf"
        ]
    finally:
        store.close()
    assert sql(postgres_url, "SELECT version FROM sfs_schema") == [(SCHEMA_VERSION,)]


def test_load_fills_the_trigram_table(store: PostgresStore, postgres_url: str) -> None:
    store.load(
        [
            ("users", ("id", "username", "password_hash", "rsa_public", "curve_public",
                       "created_at", "disabled"),
             [(7, "alice", HASH, b"r", b"a" * 32, 1, False)]),
            ("files", ("file_id", "owner_id", "name", "size", "keywords", "manifest",
                       "signature", "public", "shared_at", "grant_signature", "signed_access"),
             [(f"{1:032x}", 7, "Copied.TXT", 1, "a\nbc", b"m", b"s", 1, 5, b"", None),
              (f"{2:032x}", 7, "другой", 1, "", b"m", b"s", 1, 6, b"", None)]),
        ]
    )  # fmt: skip
    assert _trigram_rows(postgres_url) == _trigrams_of_files(postgres_url)
    pairs = len("copied.txt") - 1 + len("a\nbc") - 1 + len("другой") - 1
    assert len(_trigram_rows(postgres_url)) == len("copied.txt") - 2 + 2 + 4 + pairs
