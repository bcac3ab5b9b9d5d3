"""The store contract (sfs.broker.store_contract), the same tests against every backend:
SQLite, and PostgreSQL on a throwaway cluster (tests/postgres.py). Backend-specific tests
live in test_broker_store.py (SQLite) and test_postgres_store.py."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfs.broker.postgres_store import PostgresStore
from sfs.broker.store import SqliteStore
from sfs.broker.store_contract import (
    MAX_HOLDERS,
    FileEntry,
    IdMatch,
    Presence,
    Quota,
    QuotaExceeded,
    Store,
    User,
    UsernameTaken,
)
from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle
from tests.postgres import Cluster

HASH = b"$2b$04$" + b"h" * 53
BACKENDS = ["sqlite", "postgres"]


def bundle_for(n: int) -> KeyBundle:
    return KeyBundle(b"rsa-der-%d" % n, bytes([n]) * 32)


def entry(
    file_id: str,
    owner: str = "alice",
    name: str = "file.txt",
    keywords: list[str] | None = None,
    shared_at: int = 100,
    size: int = 10,
) -> FileEntry:
    return FileEntry(
        file_id,
        owner,
        name,
        size,
        keywords or [],
        b"manifest:" + file_id.encode(),
        b"sig",
        shared_at,
    )


CYRILLIC_A = "\u0430"  # looks like the Latin a


def fid(n: int) -> str:
    return f"{n:032x}"


Opener = Callable[[], Store]


@contextlib.contextmanager
def new_database(backend: str, request: pytest.FixtureRequest, tmp: Path) -> Iterator[Opener]:
    """An empty database of the backend, and how to open a store on it."""
    if backend == "sqlite":
        yield lambda: SqliteStore(tmp / "broker.db")
        return
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    with cluster.database() as url:
        yield lambda: PostgresStore(url)


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    with new_database(request.param, request, tmp_path) as open_store:
        yield open_store


@pytest.fixture
def store(opener: Opener) -> Iterator[Store]:
    store = opener()
    yield store
    store.close()


@pytest.fixture
def users(store: Store) -> dict[str, User]:
    return {
        name: store.add_user(name, HASH, bundle_for(i), now=1)
        for i, name in enumerate(("alice", "bob", "carol"), start=1)
    }


def test_add_and_get_user(store: Store) -> None:
    alice = store.add_user("alice", HASH, bundle_for(1), now=1)
    bob = store.add_user("bob", b"other", bundle_for(2), now=1)
    assert alice.id != bob.id
    assert store.get_user("alice") == User(alice.id, "alice", HASH, bundle_for(1))
    assert store.get_user("bob") == bob
    assert store.get_user("nobody") is None
    assert store.get_user("ALICE") is None


def test_add_user_refuses_a_taken_username(store: Store) -> None:
    alice = store.add_user("alice", HASH, bundle_for(1), now=1)
    with pytest.raises(UsernameTaken, match="alice"):
        store.add_user("alice", b"other hash", bundle_for(2), now=2)
    assert issubclass(UsernameTaken, StorageError)
    assert store.get_user("alice") == alice


def test_add_user_refuses_a_transport_key_in_use(store: Store) -> None:
    store.add_user("alice", HASH, bundle_for(1), now=1)
    with pytest.raises(UsernameTaken):
        store.add_user("alice2", HASH, KeyBundle(b"other rsa", bundle_for(1).curve_public), now=2)
    assert store.get_user("alice2") is None
    # a failed insert leaves the store usable
    assert store.add_user("bob", HASH, bundle_for(2), now=3).username == "bob"


def test_unknown_users_keeps_the_order_asked(store: Store, users: dict[str, User]) -> None:
    assert store.unknown_users([]) == []
    assert store.unknown_users(["alice", "bob"]) == []
    assert store.unknown_users(["zed", "alice", "eve", "Bob"]) == ["zed", "eve", "Bob"]


def test_session_is_valid_until_it_expires(store: Store, users: dict[str, User]) -> None:
    store.add_session(b"t1", users["alice"].id, expires_at=1000, now=0)
    assert store.session_user(b"t1", now=999, extend_to=999) == users["alice"]
    assert store.session_user(b"t1", now=1000, extend_to=2000) is None
    assert store.session_user(b"nope", now=0, extend_to=0) is None


def test_a_short_session_used_often_stays_alive(store: Store, users: dict[str, User]) -> None:
    # A 60 s lifetime used every 30 s: coarse 300 s steps would never slide it.
    store.add_session(b"t", users["alice"].id, expires_at=60, now=0)
    for now in range(30, 600, 30):
        assert store.session_user(b"t", now=now, extend_to=now + 60) == users["alice"]
    assert store.session_user(b"t", now=630, extend_to=630) is None  # left to expire


def test_a_session_needs_an_existing_user(store: Store) -> None:
    with pytest.raises(StorageError):
        store.add_session(b"t" * 32, user_id=999, expires_at=10, now=0)
    assert store.session_user(b"t" * 32, now=0, extend_to=0) is None


def test_delete_session(store: Store, users: dict[str, User]) -> None:
    store.add_session(b"a", users["alice"].id, expires_at=1000, now=0)
    store.add_session(b"b", users["alice"].id, expires_at=1000, now=0)
    store.delete_session(b"a")
    store.delete_session(b"never existed")
    assert store.session_user(b"a", now=1, extend_to=1) is None
    assert store.session_user(b"b", now=1, extend_to=1) == users["alice"]


def test_stats_counts_users_files_and_presence(store: Store, users: dict[str, User]) -> None:
    empty = store.stats(now=0)
    assert empty.users == [("alice", False), ("bob", False), ("carol", False)]
    assert (empty.files, empty.online) == (0, [])

    store.add_file(users["alice"].id, entry(fid(1)), None)
    store.add_file(users["bob"].id, entry(fid(2), owner="bob"), ["alice"])
    store.set_online(users["carol"].id, "tcp://c:1", until=50)
    store.set_online(users["alice"].id, "tcp://a:1", until=100)
    stats = store.stats(now=60)
    assert stats.users == [("alice", True), ("bob", False), ("carol", False)]
    assert stats.files == 2
    assert stats.online == [("alice", "tcp://a:1", 100)]
    assert store.stats(now=10).online == [("alice", "tcp://a:1", 100), ("carol", "tcp://c:1", 50)]


def test_set_online_replaces_the_endpoint_and_set_offline_removes_it(
    store: Store, users: dict[str, User]
) -> None:
    alice = users["alice"].id
    store.set_online(alice, "tcp://a:1", until=100)
    store.set_online(alice, "tcp://a:2", until=200)
    assert store.stats(now=150).online == [("alice", "tcp://a:2", 200)]
    store.set_offline(alice)
    store.set_offline(alice)  # twice is fine
    assert store.stats(now=0).online == []


def test_online_holders_are_the_owner_while_present(store: Store, users: dict[str, User]) -> None:
    alice = users["alice"]
    store.add_file(alice.id, entry(fid(1)), None)
    assert store.online_holders(fid(1), now=0) == []
    store.set_online(alice.id, "tcp://a:1", until=100)
    assert store.online_holders(fid(1), now=99) == [Presence("alice", "tcp://a:1", alice.bundle)]
    assert store.online_holders(fid(1), now=100) == []
    assert store.online_holders(fid(2), now=0) == []


def test_online_holders_list_the_owner_then_the_freshest_seeders(
    store: Store, users: dict[str, User]
) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    store.add_file(alice.id, entry(fid(1)), None)
    seeders = [
        store.add_user(f"s{n}", HASH, KeyBundle(b"r", bytes([9, n]) * 16), now=1)
        for n in range(MAX_HOLDERS)
    ]
    for n, seeder in enumerate(seeders):
        store.add_holder(fid(1), seeder.id)
        store.set_online(seeder.id, f"tcp://s:{n}", until=1000 + n)
    store.add_holder(fid(1), bob.id)
    store.add_holder(fid(1), bob.id)  # twice is fine
    store.add_holder(fid(1), carol.id)  # carol is offline
    store.set_online(bob.id, "tcp://b:1", until=5000)
    store.set_online(alice.id, "tcp://a:1", until=50)
    listed = [p.username for p in store.online_holders(fid(1), now=10)]
    expected = ["alice", "bob", *[f"s{n}" for n in reversed(range(MAX_HOLDERS))]]
    assert listed == expected[:MAX_HOLDERS]
    listed = [p.username for p in store.online_holders(fid(1), now=60)]  # alice went offline
    assert listed == expected[1 : MAX_HOLDERS + 1]
    assert store.remove_holder(fid(1), bob.id) is True
    assert store.remove_holder(fid(1), bob.id) is False
    assert "bob" not in [p.username for p in store.online_holders(fid(1), now=10)]


def test_public_file_is_visible_to_everyone(store: Store, users: dict[str, User]) -> None:
    store.add_file(users["alice"].id, entry(fid(1), keywords=["a", "b c"]), None)
    for user in users.values():
        assert store.visible_file(fid(1), user.id) == entry(fid(1), keywords=["a", "b c"])
    assert store.visible_file(fid(2), users["alice"].id) is None


def test_a_folder_keeps_its_kind_and_file_count(store: Store, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    folder = dataclasses.replace(entry(fid(1), name="photos"), kind="folder", files=1234)
    store.add_file(alice.id, folder, None)
    store.add_file(alice.id, entry(fid(2), name="photos.txt", shared_at=50), None)
    assert store.visible_file(fid(1), bob.id) == folder
    hits = store.search(bob.id, ["photos"], None, 10, 0)
    assert [(h.file.name, h.file.kind, h.file.files) for h in hits] == [
        ("photos", "folder", 1234),
        ("photos.txt", "file", 1),
    ]


def test_access_list_limits_who_sees_a_file(store: Store, users: dict[str, User]) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    store.add_file(alice.id, entry(fid(1)), ["bob"])
    store.add_file(alice.id, entry(fid(2)), [])
    assert store.visible_file(fid(1), alice.id) is not None
    assert store.visible_file(fid(1), bob.id) is not None
    assert store.visible_file(fid(1), carol.id) is None
    assert store.visible_file(fid(2), alice.id) is not None
    assert store.visible_file(fid(2), bob.id) is None
    assert {h.file.file_id for h in store.search(bob.id, [], None, 10, 0)} == {fid(1)}
    assert store.search(carol.id, [], None, 10, 0) == []


def test_replacing_a_file_replaces_its_access_list_and_holders(
    store: Store, users: dict[str, User]
) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    store.add_file(alice.id, entry(fid(1), name="v1"), ["bob"])
    store.add_file(alice.id, entry(fid(1), name="v2"), ["carol"])
    assert store.visible_file(fid(1), bob.id) is None
    found = store.visible_file(fid(1), carol.id)
    assert found is not None and found.name == "v2"
    store.add_file(alice.id, entry(fid(1), name="v3"), None)
    assert store.visible_file(fid(1), bob.id) is not None
    assert store.signed_access(fid(1)) is None
    assert store.stats(now=0).files == 1
    store.add_holder(fid(1), bob.id)
    store.add_file(alice.id, entry(fid(1), name="v4"), ["bob", "nobody"])
    assert store.signed_access(fid(1)) == ["bob", "nobody"]  # as signed, unknown names too
    assert store.remove_holder(fid(1), bob.id) is False  # went with the replaced file


def test_remove_file_only_by_its_owner(store: Store, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    store.add_file(alice.id, entry(fid(1)), ["bob"])
    assert store.remove_file(fid(1), bob.id) is False
    assert store.visible_file(fid(1), bob.id) is not None
    assert store.remove_file(fid(1), alice.id) is True
    assert store.visible_file(fid(1), alice.id) is None
    assert store.remove_file(fid(1), alice.id) is False
    assert store.remove_file(fid(9), alice.id) is False
    assert store.signed_access(fid(1)) is None


def test_files_by_prefix_sees_what_search_sees(store: Store, users: dict[str, User]) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    public, to_bob, private, carols = (f"abcdef01{n:024x}" for n in (1, 2, 3, 4))
    store.add_file(alice.id, entry(public, name="public.txt"), None)
    store.add_file(alice.id, entry(to_bob, name="to bob.txt"), ["bob"])
    store.add_file(alice.id, entry(private, name="private.txt"), [])
    store.add_file(carol.id, entry(carols, owner="carol", name="carol's.txt"), ["alice"])
    store.add_file(alice.id, entry("abcdef00" + "f" * 24), None)  # sorts just before
    store.add_file(alice.id, entry("abcdef02" + "0" * 24), None)  # and just after

    def ids(user: User, prefix: str = "abcdef01", limit: int = 10) -> list[str]:
        return [m.file_id for m in store.files_by_prefix(user.id, prefix, limit)]

    assert ids(alice) == [public, to_bob, private, carols]
    assert ids(bob) == [public, to_bob]
    assert ids(carol) == [public, carols]
    assert ids(bob, to_bob) == [to_bob]  # a whole id
    assert ids(bob, private) == []  # one bob may not see: nothing, as if it did not exist
    assert ids(carol, "abcdef01" + "0" * 23 + "2") == []
    assert ids(alice, limit=2) == [public, to_bob]
    assert ids(alice, "abcdef0") == [
        "abcdef00" + "f" * 24,
        public,
        to_bob,
        private,
        carols,
        "abcdef02" + "0" * 24,
    ]
    assert store.files_by_prefix(bob.id, to_bob, 10) == [IdMatch(to_bob, "alice", "to bob.txt")]
    assert store.files_by_prefix(alice.id, carols, 10) == [IdMatch(carols, "carol", "carol's.txt")]


def test_files_by_prefix_finds_exactly_the_ids_that_start_with_it(
    store: Store, users: dict[str, User]
) -> None:
    rng = random.Random(8)
    # Few digits, many shared prefixes, and "f" next to the range's upper end.
    made = sorted({"".join(rng.choice("0f9a") for _ in range(32)) for _ in range(300)})
    for file_id in made:
        store.add_file(users["alice"].id, entry(file_id), None)
    for file_id in made[::7]:
        for length in (8, 9, 10, 12, 32):
            prefix = file_id[:length]
            expected = [i for i in made if i.startswith(prefix)][:10]
            found = store.files_by_prefix(users["bob"].id, prefix, 10)
            assert [m.file_id for m in found] == expected


def test_the_quota_counts_files_and_manifest_bytes_per_owner(
    store: Store, users: dict[str, User]
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
    assert store.remove_file(fid(1), alice)
    store.add_file(alice, entry(fid(4)), None, quota)
    with pytest.raises(QuotaExceeded):
        store.add_file(bob, entry(fid(5), "bob"), None, Quota(10, 2 * size - 1))
    assert store.visible_file(fid(5), bob) is None  # nothing of a refused file is kept
    with pytest.raises(QuotaExceeded):
        store.add_file(alice, entry(fid(5)), None, quota)  # the removal was counted
    store.add_file(bob, entry(fid(5), "bob"), None, quota)


@pytest.mark.parametrize(
    ("terms", "expected"),
    [
        ([], ["ÉTÉ.jpg", "50xxoff.txt", "50%_off.txt", "Report.PDF"]),  # newest first
        (["report"], ["Report.PDF"]),
        (["pdf", "THESIS"], ["Report.PDF"]),
        (["pdf", "nope"], []),
        (["50%"], ["50%_off.txt"]),
        (["%_"], ["50%_off.txt"]),
        (["_"], ["50%_off.txt"]),
        (["%"], ["50%_off.txt"]),
        (["été"], ["ÉTÉ.jpg"]),
        (["ÉTÉ.JPG"], ["ÉTÉ.jpg"]),
        (["ok"], ["ÉTÉ.jpg"]),  # the second keyword
    ],
)
def test_search_terms(
    indexed: Store, users: dict[str, User], terms: list[str], expected: list[str]
) -> None:
    assert names(indexed, users["carol"], terms) == expected


def test_search_owner_filter_and_visibility(indexed: Store, users: dict[str, User]) -> None:
    assert names(indexed, users["carol"], [], owner="bob") == ["ÉTÉ.jpg"]
    assert names(indexed, users["bob"], ["thesis"], owner="bob") == ["b-private"]
    assert names(indexed, users["bob"], ["thesis"]) == ["b-private", "Report.PDF"]
    assert names(indexed, users["carol"], [], owner="nobody") == []


def test_search_limit_and_tie_order(store: Store, users: dict[str, User]) -> None:
    for n in (3, 1, 2):
        store.add_file(users["alice"].id, entry(fid(n), shared_at=5), None)
    hits = store.search(users["bob"].id, [], None, 2, 0)
    assert [h.file.file_id for h in hits] == [fid(1), fid(2)]


def test_search_reports_the_owners_presence(store: Store, users: dict[str, User]) -> None:
    alice = users["alice"]
    store.add_file(alice.id, entry(fid(1)), None)
    store.set_online(alice.id, "tcp://a:1", until=100)
    assert [h.online for h in store.search(alice.id, [], None, 10, now=99)] == [True]
    assert [h.online for h in store.search(alice.id, [], None, 10, now=100)] == [False]


def test_search_is_newest_first_whatever_the_order_of_sharing(
    store: Store, users: dict[str, User]
) -> None:
    # Older files shared after newer ones, and ties broken by file id across inserts.
    for n, shared_at in [(9, 50), (3, 70), (5, 10), (1, 70), (7, 60), (2, 70), (4, 10)]:
        store.add_file(users["alice"].id, entry(fid(n), name=f"doc{n}", shared_at=shared_at), None)
    order = [fid(n) for n in (1, 2, 3, 7, 9, 4, 5)]
    for terms in ([], ["doc"], ["d"]):
        hits = store.search(users["bob"].id, terms, None, 100, 0)
        assert [h.file.file_id for h in hits] == order, terms
        assert [
            h.file.file_id for h in store.search(users["bob"].id, terms, "alice", 100, 0)
        ] == order
    # A limit inside a second of ties still gives the lowest file ids of that second.
    assert [h.file.file_id for h in store.search(users["bob"].id, ["doc"], None, 2, 0)] == order[:2]
    assert [h.file.file_id for h in store.search(users["bob"].id, [], None, 4, 0)] == order[:4]


def test_many_files_in_one_second_keep_their_tie_order(
    store: Store, users: dict[str, User]
) -> None:
    ids = [fid(n) for n in random.Random(7).sample(range(1000), 60)]
    for file_id in ids:
        store.add_file(users["alice"].id, entry(file_id, name="same.txt", shared_at=5), None)
    store.add_file(users["alice"].id, entry(fid(5000), name="same.txt", shared_at=4), None)
    for limit in (1, 10, 60, 61):
        hits = store.search(users["carol"].id, ["same"], None, limit, 0)
        assert [h.file.file_id for h in hits] == [*sorted(ids), fid(5000)][:limit]


def test_a_search_past_its_budget_says_partial(store: Store, users: dict[str, User]) -> None:
    alice, bob = users["alice"].id, users["bob"].id
    store.add_file(bob, entry(fid(1), "bob", "report-old", shared_at=1), [])
    for n in range(2, 8):  # newer, and every other one private to alice
        store.add_file(alice, entry(fid(n), name=f"report-{n}", shared_at=n), [] if n % 2 else None)
    for terms in ([], ["report"], ["re"], ["r", "e"]):
        # Bob's candidates are the files he sees, newest first: 6, 4, 2 and his own 1.
        found = store.search(bob, terms, None, 10, 0, budget=2)
        assert ([h.file.file_id for h in found], found.partial) == ([fid(6), fid(4)], True)
        found = store.search(bob, terms, None, 10, 0, budget=4)
        assert [h.file.file_id for h in found] == [fid(6), fid(4), fid(2), fid(1)]
        assert not found.partial
        # `limit` hits within the budget: complete, whatever lies past it.
        found = store.search(bob, terms, None, 2, 0, budget=2)
        assert ([h.file.file_id for h in found], found.partial) == ([fid(6), fid(4)], False)


def test_a_two_character_term_narrows_the_candidates_a_single_one_does_not(
    store: Store, users: dict[str, User]
) -> None:
    # Short + word: a 2-character term is a term of the candidates, as a word is (files
    # without it are not counted by the budget); a 1-character one is checked on them.
    files = [
        Shared(fid(n), "alice", f"report x7 {n}.txt" if n < 2 else f"report {n}.txt", [], 100 + n,
               None)
        for n in range(6)  # newest first: 5, 4, ... 0; only 0 and 1 hold "x7"
    ] + [Shared(fid(9), "alice", "x7 only.txt", [], 200, ["alice"])]  # fmt: skip
    for f in files:
        item = dataclasses.replace(entry(f.file_id, name=f.name), shared_at=f.shared_at)
        store.add_file(users["alice"].id, item, f.access)
    for terms, limit, budget, hits, partial in [
        (["x7", "report"], 10, 2, [1, 0], False),  # 2 candidates, within the budget
        (["X7", "report"], 1, 1, [1], False),
        (["x7", "report"], 10, 1, [1], True),  # file 0 is past the budget
        (["x7"], 10, 2, [1, 0], False),  # file 9 is alice's alone
        (["7", "report"], 10, 2, [], True),  # checked on the 2 newest reports
        (["7", "report"], 10, 6, [1, 0], False),
        (["x7", "rep", "7"], 10, 2, [1, 0], False),
    ]:
        found = store.search(users["bob"].id, terms, None, limit, 0, budget=budget)
        model = model_search_within(files, "bob", terms, None, limit, budget)
        assert model == ([fid(n) for n in hits], partial), terms
        assert ([h.file.file_id for h in found], found.partial) == model, terms


def test_a_term_without_a_run_of_letters_and_two_common_words_say_partial(
    store: Store, users: dict[str, User]
) -> None:
    # The kinds that read the most on a large index: a term with no run of 3 letters or
    # digits (`a.jp` with a Cyrillic a, U+0430), and two words that many files hold, fewer
    # together.
    alice, bob = users["alice"].id, users["bob"].id
    a = CYRILLIC_A
    names = [f"{a}.jpg", "report minutes", "a.jpg", "report", "minutes",
             f"{a}.jp-minutes report", f"{a}.JPEG", "Minutes of the report", f"{a}.jpg",
             f"report-minutes.{a}.jpg"]  # fmt: skip
    for n, name in enumerate(names, start=1):  # 7 and 9 are private to alice
        store.add_file(alice, entry(fid(n), name=name, shared_at=n), [] if n in (7, 9) else None)
    for terms, limit, budget, hits, partial in [
        ([f"{a.upper()}.JP"], 10, 1, [10], True),
        ([f"{a}.jp"], 10, 2, [10, 6], True),
        ([f"{a}.jp"], 10, 3, [10, 6, 1], False),
        (["report", "minutes"], 10, 1, [10], True),
        (["report", "minutes"], 10, 3, [10, 8, 6], True),
        (["minutes", "report"], 10, 4, [10, 8, 6, 2], False),
        (["minutes", "report"], 2, 2, [10, 8], False),
        ([f"{a}.jp", "minutes"], 10, 1, [10], True),
        ([f"{a}.jp", "minutes", "o"], 10, 2, [10, 6], False),
    ]:
        found = store.search(bob, terms, None, limit, 0, budget=budget)
        assert ([h.file.file_id for h in found], found.partial) == (
            [fid(n) for n in hits],
            partial,
        ), terms
    assert [h.file.file_id for h in store.search(alice, [f"{a}.jp"], None, 10, 0)] == [
        fid(n) for n in (10, 9, 7, 6, 1)
    ]


def test_a_user_who_sees_nothing_finds_nothing_and_nothing_partial(
    store: Store, users: dict[str, User]
) -> None:
    alice, carol = users["alice"].id, users["carol"].id
    for n in range(1, 6):
        store.add_file(alice, entry(fid(n), name=f"private-{n}", shared_at=n), [])
    for terms in ([], ["private"], ["p"]):
        for budget in (1, 3, 5):
            found = store.search(carol, terms, None, 10, 0, budget=budget)
            assert (found, found.partial) == ([], False)


def test_private_files_of_others_change_nothing_in_a_search(
    store: Store, users: dict[str, User]
) -> None:
    # The budget counts only files the caller sees: what bob finds, and whether it is
    # partial, must not tell him whether private files he cannot see hold his terms.
    alice, bob, carol = users["alice"].id, users["bob"].id, users["carol"].id
    store.add_file(alice, entry(fid(1), name="report-a", shared_at=1), None)
    store.add_file(carol, entry(fid(2), name="report-c", keywords=["draft"], shared_at=2), ["bob"])
    store.add_file(bob, entry(fid(3), "bob", "report-b", shared_at=3), [])
    store.add_file(alice, entry(fid(4), name="notes", shared_at=4), None)
    searches = [
        (terms, owner, limit, budget)
        for terms in ([], ["report"], ["rep", "ort"], ["re"], ["r", "e"], ["draft"], ["zz"])
        for owner in (None, "alice", "carol")
        for limit in (1, 2, 10)
        for budget in (1, 2, 3, 10)
    ]

    def answers() -> list[tuple[list[str], bool]]:
        found = [store.search(bob, t, o, lim, 0, budget=b) for t, o, lim, b in searches]
        return [([h.file.file_id for h in f], f.partial) for f in found]

    before = answers()
    # Newer and older private files of alice and carol that hold every term, one
    # shared with alice only; and a file of a user who is then disabled.
    for n in range(10, 30):
        owner = alice if n % 2 else carol
        access = ["alice"] if n % 3 == 0 else []
        shared_at = n if n < 20 else -n
        name = f"report-zz-draft-{n}"
        store.add_file(owner, entry(fid(n), "x", name, ["notes"], shared_at=shared_at), access)
    dave = store.add_user("dave", HASH, bundle_for(9), now=1)
    for n in range(40, 45):
        store.add_file(dave.id, entry(fid(n), "dave", f"report-zz-{n}", shared_at=n), None)
    assert store.set_disabled("dave", True)
    assert answers() == before
    # Alice and carol see their own files, which now change their answers.
    assert store.search(alice, ["zz"], None, 10, 0).partial is False
    assert len(store.search(alice, ["zz"], None, 100, 0)) == 10 + 3


def test_a_term_is_found_only_where_its_trigrams_are_side_by_side(
    store: Store, users: dict[str, User]
) -> None:
    # The index knows which trigrams a name or keywords hold, not where.
    for n, (name, keywords) in enumerate(
        [("abc-bcd", []), ("abc", ["bcd"]), ("bcd abc", ["x"]), ("xabcdx", [])], start=1
    ):
        store.add_file(users["alice"].id, entry(fid(n), name=name, keywords=keywords), None)
    assert names(store, users["bob"], ["abcd"]) == ["xabcdx"]
    assert names(store, users["bob"], ["abc", "bcd"]) == ["abc-bcd", "abc", "bcd abc", "xabcdx"]


def test_search_terms_that_look_like_query_syntax(store: Store, users: dict[str, User]) -> None:
    weird = ['say "hi"', "a AND b", "NEAR(x y)", "col:umn", "star*", "^caret", "{a b}", "-minus"]
    for n, name in enumerate(weird, start=1):
        store.add_file(users["alice"].id, entry(fid(n), name=name, shared_at=n), None)
    for name in weird:
        for term in name.split():
            assert name in names(store, users["bob"], [term]), term
    assert names(store, users["bob"], ['"hi"', "say"]) == ['say "hi"']
    assert names(store, users["bob"], ["AND", "NEAR"]) == []


def test_terms_fold_like_python_not_like_sqlite(store: Store, users: dict[str, User]) -> None:
    # str.lower, as the LIKE search folded: İ lowers to i and a combining dot, the Kelvin
    # sign to k, ẞ to ß (and ß stays itself: no full case folding to "ss"); sigma and final
    # sigma stay apart (FTS5's own folding, case_sensitive 0, would make them one letter).
    sigma, final_sigma, logos = "\u03c3", "\u03c2", "\u03bb\u03cc\u03b3\u03bf"
    files = ["İSTANBUL.txt", "Straße.doc", "ǅemal.odt", "\u212aELVIN.txt", f"{logos}{sigma}.txt"]
    for n, name in enumerate(files, start=1):
        store.add_file(users["alice"].id, entry(fid(n), name=name, shared_at=n), None)
    bob = users["bob"]
    assert names(store, bob, ["i̇stanbul"]) == names(store, bob, ["İSTANBUL"]) == ["İSTANBUL.txt"]
    assert names(store, bob, ["istanbul"]) == []
    assert names(store, bob, ["STRAẞE"]) == names(store, bob, ["aße"]) == ["Straße.doc"]
    assert names(store, bob, ["STRASSE"]) == []
    assert names(store, bob, ["ǆem"]) == ["ǅemal.odt"]
    assert names(store, bob, ["kelvin"]) == names(store, bob, ["KEL"]) == ["\u212aELVIN.txt"]
    assert names(store, bob, [logos[-2:] + sigma]) == [f"{logos}{sigma}.txt"]
    assert names(store, bob, [logos[-2:] + final_sigma]) == []


def test_the_limit_state_is_one_object_per_store(store: Store) -> None:
    state = store.limit_state()
    assert store.limit_state() is state
    with state.atomic():
        assert state.pending_count() == 0


def test_threads_can_share_a_store(store: Store) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                store.add_user(f"user{n}-{i}", HASH, KeyBundle(b"r", bytes([n, i]) * 16), now=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.stats(now=0).users) == 40


def test_reopening_keeps_the_data(opener: Opener) -> None:
    first = opener()
    alice = first.add_user("alice", HASH, bundle_for(1), now=1)
    first.add_file(alice.id, entry(fid(1), keywords=["kw"]), None)
    first.close()

    second = opener()
    try:
        assert second.get_user("alice") == alice
        assert second.visible_file(fid(1), alice.id) == entry(fid(1), keywords=["kw"])
        second.add_user("bob", HASH, bundle_for(2), now=2)  # still writable
    finally:
        second.close()


@pytest.fixture
def indexed(store: Store, users: dict[str, User]) -> Store:
    alice, bob = users["alice"].id, users["bob"].id
    store.add_file(alice, entry(fid(1), name="Report.PDF", keywords=["thesis"], shared_at=10), None)
    store.add_file(alice, entry(fid(2), name="50%_off.txt", shared_at=20), None)
    store.add_file(alice, entry(fid(3), name="50xxoff.txt", shared_at=30), None)
    store.add_file(bob, entry(fid(4), "bob", "ÉTÉ.jpg", ["été", "ok"], shared_at=40), None)
    store.add_file(bob, entry(fid(5), "bob", "b-private", ["thesis"], shared_at=50), [])
    return store


def names(store: Store, user: User, terms: list[str], owner: str | None = None) -> list[str]:
    return [h.file.name for h in store.search(user.id, terms, owner, 100, 0)]


# Search as the contract defines it, to compare against on random data.
ALPHABET = "abAB%_\"' -.éÉİıΣσςß日"


@dataclass(frozen=True)
class Shared:
    file_id: str
    owner: str
    name: str
    keywords: list[str]
    shared_at: int
    access: list[str] | None


_text = st.text(ALPHABET, min_size=1, max_size=8)
_shared = st.builds(
    Shared,
    file_id=st.integers(0, 40).map(fid),
    owner=st.sampled_from(["alice", "bob", "carol"]),
    name=_text,
    keywords=st.lists(_text, max_size=3),
    shared_at=st.integers(-3, 4),
    access=st.none() | st.lists(st.sampled_from(["alice", "bob", "carol"]), max_size=2),
)
_search = st.tuples(
    st.sampled_from(["alice", "bob", "carol"]),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    st.none() | st.sampled_from(["alice", "bob", "carol", "nobody"]),
    st.integers(1, 6),
)


def model_search(
    files: list[Shared], user: str, terms: list[str], owner: str | None, limit: int
) -> list[str]:
    return model_search_within(files, user, terms, owner, limit, len(files) + 1)[0]


def model_search_within(
    files: list[Shared], user: str, terms: list[str], owner: str | None, limit: int, budget: int
) -> tuple[list[str], bool]:
    """The hits and `partial`: the candidates are the files the user sees (of `owner`)
    that hold every term of 2 characters or more, newest first, at most `budget`."""

    def visible(f: Shared) -> bool:
        return f.access is None or f.owner == user or user in f.access

    def holds(f: Shared, term: str) -> bool:
        return term.lower() in f.name.lower() or term.lower() in "\n".join(f.keywords).lower()

    long_terms = [t for t in terms if len(t.lower()) >= 2]
    candidates = [
        f
        for f in files
        if visible(f) and owner in (None, f.owner) and all(holds(f, t) for t in long_terms)
    ]
    candidates.sort(key=lambda f: (-f.shared_at, f.file_id))
    examined = candidates[:budget]
    hits = [f.file_id for f in examined if all(holds(f, t) for t in terms)][:limit]
    return hits, len(hits) < limit and len(candidates) > budget


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=st.lists(_shared, max_size=25), searches=st.lists(_search, min_size=1, max_size=8))
def test_search_answers_as_the_model(
    store: Store,
    users: dict[str, User],
    files: list[Shared],
    searches: list[tuple[str, list[str], str | None, int]],
) -> None:
    # One store for every example, emptied of files after each (through the contract).
    ids = {name: user.id for name, user in users.items()}
    latest: dict[str, Shared] = {}
    try:
        for shared in files:  # a file id shared again replaces the earlier file
            item = entry(shared.file_id, shared.owner, shared.name, shared.keywords)
            item = dataclasses.replace(item, shared_at=shared.shared_at)
            store.add_file(ids[shared.owner], item, shared.access)
            latest[shared.file_id] = shared
        for user, terms, owner, limit in searches:
            hits = store.search(ids[user], terms, owner, limit, 0)
            expected = model_search(list(latest.values()), user, terms, owner, limit)
            assert [h.file.file_id for h in hits] == expected
            assert not hits.partial
            # A store of exactly `budget` files is within it.
            tight = store.search(ids[user], terms, owner, limit, 0, budget=max(1, len(latest)))
            assert ([h.file.file_id for h in tight], tight.partial) == (expected, False)
            # Past the budget: exactly the model's answer within that budget.
            for budget in (1, 3):
                some = store.search(ids[user], terms, owner, limit, 0, budget)
                model = model_search_within(
                    list(latest.values()), user, terms, owner, limit, budget
                )
                assert ([h.file.file_id for h in some], some.partial) == model
    finally:
        for shared in latest.values():
            assert store.remove_file(shared.file_id, ids[shared.owner])


def test_generation_grows_with_every_change_a_cache_depends_on(opener: Opener) -> None:
    """What one store (broker) writes moves the generation that another one reads, and
    what no cache depends on leaves it alone (a presence renewal, a new session, a read)."""
    reader, writer = opener(), opener()
    try:
        alice = writer.add_user("alice", HASH, bundle_for(1), now=1)
        bob = writer.add_user("bob", HASH, bundle_for(2), now=1)
        writer.add_session(b"t" * 32, bob.id, expires_at=1000, now=1)
        writer.set_online(alice.id, "tcp://a:1", until=100)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("share", lambda: writer.add_file(alice.id, entry(fid(1)), ["bob"])),
            ("access change", lambda: writer.add_file(alice.id, entry(fid(1)), ["carol"])),
            ("hold", lambda: writer.add_holder(fid(1), bob.id)),
            ("release", lambda: writer.remove_holder(fid(1), bob.id)),
            ("unshare", lambda: writer.remove_file(fid(1), alice.id)),
            ("presence moves", lambda: writer.set_online(alice.id, "tcp://a:2", until=200)),
            ("offline", lambda: writer.set_offline(alice.id)),
            ("online", lambda: writer.set_online(alice.id, "tcp://a:2", until=300)),
            ("logout", lambda: writer.delete_session(b"t" * 32)),
            ("disable", lambda: writer.set_disabled("bob", True)),
            ("enable", lambda: writer.set_disabled("bob", False)),
            ("delete user", lambda: writer.delete_user("bob")),
        ]
        for what, step in steps:
            before = reader.generation()
            step()
            assert reader.generation() > before, f"{what} did not move the generation"
        quiet: list[tuple[str, Callable[[], object]]] = [
            ("renewal", lambda: writer.set_online(alice.id, "tcp://a:2", until=400)),
            ("login", lambda: writer.add_session(b"u" * 32, alice.id, expires_at=900, now=2)),
            ("session slide", lambda: writer.session_user(b"u" * 32, now=800, extend_to=1800)),
            ("lookup", lambda: writer.visible_file(fid(1), alice.id)),
        ]
        for what, step in quiet:
            before = reader.generation()
            step()
            assert reader.generation() == before, f"{what} moved the generation"
    finally:
        reader.close()
        writer.close()
