"""The operators' part of the store contract (`accounts`, `set_disabled`, `delete_user`),
on SQLite and PostgreSQL alike: what a disabled user loses until enabled, and that a
name deleted and registered again inherits nothing of the old user."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfs.broker.store_contract import Account, Store, User
from tests.unit.test_store_contract import HASH, bundle_for, entry, fid, opener, store, users

__all__ = ["opener", "store", "users"]  # fixtures, shared with the contract suite


def share_all(store: Store, users: dict[str, User]) -> None:
    """alice: a public file, one for bob only; bob: a public file; carol seeds alice's
    public file and bob's; alice, bob and carol are online until 100."""
    store.add_file(users["alice"].id, entry(fid(1), name="public report"), None)
    store.add_file(users["alice"].id, entry(fid(2), name="for bob report"), ["bob"])
    store.add_file(users["bob"].id, entry(fid(3), owner="bob", name="bob report"), None)
    store.add_holder(fid(1), users["carol"].id)
    store.add_holder(fid(3), users["carol"].id)
    for user in users.values():
        store.set_online(user.id, f"tcp://{user.username}:1", until=100)


def found(store: Store, user: User, now: int = 50) -> list[str]:
    return sorted(hit.file.file_id for hit in store.search(user.id, ["report"], None, 50, now))


def holders(store: Store, file_id: str) -> list[str]:
    return [p.username for p in store.online_holders(file_id, now=50)]


def test_accounts_list_every_user(store: Store, users: dict[str, User]) -> None:
    share_all(store, users)
    store.set_offline(users["carol"].id)
    assert store.accounts(now=50) == [
        Account("alice", 1, 2, True, False),
        Account("bob", 1, 1, True, False),
        Account("carol", 1, 0, False, False),
    ]
    assert [a.online for a in store.accounts(now=100)] == [False, False, False]


def test_a_disabled_user_is_refused_and_unlisted_until_enabled(
    store: Store, users: dict[str, User]
) -> None:
    share_all(store, users)
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    store.add_holder(fid(2), bob.id)
    store.add_session(b"bob-token", bob.id, expires_at=1000, now=1)
    store.add_session(b"carol-token", carol.id, expires_at=1000, now=1)

    assert store.set_disabled("bob", True)
    assert not store.set_disabled("nobody", True)
    assert store.get_user("bob") == User(bob.id, "bob", HASH, bundle_for(2), disabled=True)
    assert store.session_user(b"bob-token", now=2, extend_to=3) is None  # ended
    assert store.session_user(b"carol-token", now=2, extend_to=3) == carol
    store.add_session(b"bob-new", bob.id, expires_at=1000, now=2)  # a login that raced it
    assert store.session_user(b"bob-new", now=3, extend_to=4) is None
    store.set_online(bob.id, "tcp://bob:1", until=100)  # a heartbeat that raced it
    assert found(store, alice) == [fid(1), fid(2)]  # bob's file is nobody's to see
    assert found(store, carol) == [fid(1)]
    assert store.visible_file(fid(3), carol.id) is None  # so no lookup lists its holders
    assert holders(store, fid(2)) == ["alice"]  # nor is bob listed where he is one
    assert store.stats(now=50).online == [
        ("alice", "tcp://alice:1", 100),
        ("carol", "tcp://carol:1", 100),
    ]
    assert [(a.username, a.online, a.disabled) for a in store.accounts(now=50)][1] == (
        "bob",
        False,
        True,
    )

    assert store.set_disabled("bob", False)  # nothing was deleted
    store.set_online(bob.id, "tcp://bob:1", until=100)
    assert found(store, carol) == [fid(1), fid(3)]
    assert found(store, bob) == [fid(1), fid(2), fid(3)]
    assert holders(store, fid(3)) == ["bob", "carol"]
    assert holders(store, fid(2)) == ["alice", "bob"]
    assert store.get_user("bob") == bob


def test_a_disabled_seeder_is_not_listed(store: Store, users: dict[str, User]) -> None:
    share_all(store, users)
    assert holders(store, fid(1)) == ["alice", "carol"]
    store.set_disabled("carol", True)
    assert holders(store, fid(1)) == ["alice"]


def test_a_deleted_name_registered_again_inherits_nothing(
    store: Store, users: dict[str, User]
) -> None:
    share_all(store, users)
    alice, carol = users["alice"], users["carol"]
    store.add_holder(fid(2), users["bob"].id)  # bob seeds what alice shared with him
    store.add_session(b"bob-token", users["bob"].id, expires_at=1000, now=1)

    assert store.delete_user("bob")
    assert not store.delete_user("bob")
    assert store.get_user("bob") is None
    assert store.session_user(b"bob-token", now=2, extend_to=3) is None
    assert found(store, carol) == [fid(1)]  # bob's files went with him
    assert store.visible_file(fid(3), alice.id) is None
    assert holders(store, fid(2)) == ["alice"]
    assert store.stats(now=50).files == 2
    assert [a.username for a in store.accounts(now=50)] == ["alice", "carol"]

    new_bob = store.add_user("bob", b"new hash", bundle_for(9), now=5)
    assert new_bob.id != users["bob"].id
    new_bob_sees = found(store, new_bob)
    assert new_bob_sees == [fid(1)]  # not the file alice shared with the old bob
    assert store.visible_file(fid(2), new_bob.id) is None
    store.set_online(new_bob.id, "tcp://new-bob:1", until=100)
    assert holders(store, fid(2)) == ["alice"]  # nor the old bob's seeding
    assert store.accounts(now=50)[1] == Account("bob", 5, 0, True, False)
    # The owner's signed list still names "bob": a signature cannot be edited.
    assert store.signed_access(fid(2)) == ["bob"]
    # A new file shared with the name is the new bob's, as its owner meant then.
    store.add_file(alice.id, entry(fid(4), name="new report"), ["bob"])
    assert found(store, new_bob) == [fid(1), fid(4)]


def test_deleting_a_user_keeps_the_search_index_whole(
    store: Store, users: dict[str, User], tmp_path: Path
) -> None:
    for n in range(5):
        store.add_file(users["bob"].id, entry(fid(10 + n), owner="bob", name=f"r{n} report"), None)
    store.add_file(users["alice"].id, entry(fid(20), name="alice report", shared_at=100), None)
    store.delete_user("bob")
    store.add_file(users["carol"].id, entry(fid(21), owner="carol", name="c report"), None)
    assert found(store, users["alice"]) == [fid(20), fid(21)]


@pytest.mark.parametrize("disabled", [True, False])
def test_set_disabled_twice_is_no_error(
    store: Store, users: dict[str, User], disabled: bool
) -> None:
    assert store.set_disabled("alice", disabled)
    assert store.set_disabled("alice", disabled)
    assert store.get_user("alice") == User(
        users["alice"].id, "alice", HASH, bundle_for(1), disabled=disabled
    )
