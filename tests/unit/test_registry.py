"""sfs.peer.registry: the local share registry (file id -> path, access list)."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfs.common.errors import StorageError
from sfs.peer.registry import Share, ShareRegistry


def make_share(number: int, access: list[str] | None = None, **changes: object) -> Share:
    share = Share(
        file_id=f"{number:032x}",
        path=Path(f"/home/alice/files/file{number}.bin"),
        name=f"file{number}.bin",
        size=1000 * number,
        manifest=bytes([number]) * 50,
        signature=bytes([number + 1]) * 384,
        access=access,
        keywords=["report", f"k{number}"],
        shared_at=1_700_000_000 + number,
    )
    return dataclasses.replace(share, **changes)  # type: ignore[arg-type]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ShareRegistry]:
    registry = ShareRegistry(tmp_path / "shares.db")
    try:
        yield registry
    finally:
        registry.close()


@pytest.mark.parametrize("access", [None, [], ["bob"], ["bob", "carol.d", "e_f-9"]])
def test_add_then_get_round_trips(registry: ShareRegistry, access: list[str] | None) -> None:
    share = make_share(1, access)
    registry.add(share)
    assert registry.get(share.file_id) == share


def test_access_none_and_empty_list_stay_distinct(registry: ShareRegistry) -> None:
    registry.add(make_share(1, None))
    registry.add(make_share(2, []))
    everyone, nobody = registry.get(make_share(1).file_id), registry.get(make_share(2).file_id)
    assert everyone is not None and everyone.access is None
    assert nobody is not None and nobody.access == []


def test_get_unknown_is_none(registry: ShareRegistry) -> None:
    assert registry.get("f" * 32) is None


def test_remove(registry: ShareRegistry) -> None:
    registry.add(make_share(1))
    registry.add(make_share(2))
    assert registry.remove(make_share(1).file_id) is True
    assert registry.get(make_share(1).file_id) is None
    assert registry.remove(make_share(1).file_id) is False
    assert registry.all() == [make_share(2)]


def test_all_is_ordered_by_sharing_time(registry: ShareRegistry) -> None:
    shares = [make_share(3), make_share(1, ["bob"]), make_share(2, [])]
    for share in shares:
        registry.add(share)
    assert registry.all() == sorted(shares, key=lambda s: s.shared_at)


def test_empty_registry(registry: ShareRegistry) -> None:
    assert registry.all() == []


def test_adding_the_same_file_id_replaces_it(registry: ShareRegistry) -> None:
    registry.add(make_share(1, None))
    changed = make_share(1, ["bob"], path=Path("/elsewhere/file.bin"))
    registry.add(changed)
    assert registry.all() == [changed]


def test_unusual_paths_and_names_round_trip(registry: ShareRegistry) -> None:
    share = make_share(1, path=Path("/data/with space/ünï'cödé\"; DROP TABLE shares;--"))
    registry.add(share)
    assert registry.get(share.file_id) == share


def test_shares_persist_and_the_file_is_private(tmp_path: Path) -> None:
    first = ShareRegistry(tmp_path / "shares.db")
    first.add(make_share(1, ["bob"]))
    first.close()
    second = ShareRegistry(tmp_path / "shares.db")
    try:
        assert second.all() == [make_share(1, ["bob"])]
    finally:
        second.close()
    assert stat.S_IMODE((tmp_path / "shares.db").stat().st_mode) == 0o600


def test_two_registries_on_one_file_see_each_other(tmp_path: Path) -> None:
    """`sfs-peer share` and a running `sfs-peer serve` share the database."""
    writer, reader = ShareRegistry(tmp_path / "s.db"), ShareRegistry(tmp_path / "s.db")
    try:
        writer.add(make_share(4))
        assert reader.get(make_share(4).file_id) == make_share(4)
        writer.remove(make_share(4).file_id)
        assert reader.get(make_share(4).file_id) is None
    finally:
        writer.close()
        reader.close()


def test_a_share_changed_by_another_connection_is_seen_at_once(tmp_path: Path) -> None:
    """`get` keeps what it found until the database changes: the holder asks for every
    chunk, so a row replaced elsewhere (a copy downloaded again to another path) must
    show."""
    writer, reader = ShareRegistry(tmp_path / "s.db"), ShareRegistry(tmp_path / "s.db")
    try:
        writer.add(make_share(4))
        assert reader.get(make_share(4).file_id) == reader.get(make_share(4).file_id)
        moved = make_share(4, path=Path("/elsewhere/file4.bin"))
        writer.add(moved)
        assert reader.get(moved.file_id) == moved
    finally:
        writer.close()
        reader.close()


def test_opening_a_second_registry_keeps_the_first_one_current(tmp_path: Path) -> None:
    """`serve` reads the registry on its loop and opens a second connection for the seed
    keeper, while `share` and `unshare` write from other processes. Opening the second
    once closed a file descriptor of the database, which drops every POSIX lock of the
    process on it: the first connection then read a stale snapshot for good (it went on
    serving an unshared file, and never saw a new one)."""
    path = tmp_path / "shares.db"
    file_id = make_share(5).file_id
    code = (
        "import sys; from pathlib import Path; from sfs.peer.registry import ShareRegistry;"
        " from tests.unit.test_registry import make_share; registry = ShareRegistry(Path("
        "sys.argv[1])); registry.add(make_share(5)) if sys.argv[2] == 'add' else"
        " registry.remove(make_share(5).file_id)"
    )

    def in_another_process(what: str) -> None:
        root = Path(__file__).parents[2]  # where `tests` imports from
        subprocess.run([sys.executable, "-c", code, str(path), what], check=True, cwd=root)

    serving = ShareRegistry(path)
    second = ShareRegistry(path)
    try:
        in_another_process("add")
        assert serving.get(file_id) == make_share(5)
        in_another_process("remove")
        assert serving.get(file_id) is None
    finally:
        second.close()
        serving.close()


def test_a_file_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "shares.db"
    path.write_bytes(b"this is not an sqlite database, just some text" * 100)
    with pytest.raises(StorageError, match="share registry"):
        ShareRegistry(path)


def test_a_registry_in_a_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        ShareRegistry(tmp_path / "missing" / "shares.db")


@pytest.mark.parametrize(
    ("access", "user", "allowed"),
    [
        (None, "bob", True),
        (None, "anyone", True),
        ([], "bob", False),
        (["bob"], "bob", True),
        (["bob"], "carol", False),
        (["bob", "carol"], "carol", True),
        (["bob"], "bo", False),
        (["bob"], "bobby", False),
        (["bob"], "", False),
    ],
)
def test_share_allows(access: list[str] | None, user: str, allowed: bool) -> None:
    assert make_share(1, access).allows(user) is allowed
