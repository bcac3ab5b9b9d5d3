"""A hostile owner signs a tree that would write outside the download folder, collide on
a case-insensitive disk, or lie about its counts: `get` refuses it with one line naming
the first bad entry, before a byte is written anywhere (the index is checked whole, by
`tree_index.IndexReader`, before the download opens its staging folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfs.common import protocol
from sfs.common.errors import IntegrityError
from sfs.common.manifest import file_id_of
from sfs.common.tree import FILE, FOLDER, LINK, Entry
from sfs.peer import transfer
from sfs.peer.node import Peer
from sfs.peer.registry import Share
from tests.integration.conftest import Network
from tests.trees import MTIME_NS, crafted_tree


def file(path: str, size: int = 3) -> Entry:
    return Entry(path, FILE, size, 0o644, MTIME_NS)


def folder(path: str) -> Entry:
    return Entry(path, FOLDER, 0, 0o755, MTIME_NS)


def link(path: str, target: str) -> Entry:
    return Entry(path, LINK, 0, 0o777, MTIME_NS, target)


HOSTILE = {
    "traversal": ([file("../evil")], "entry '../evil': "),
    "absolute": ([file("/etc/evil")], "entry '/etc/evil': "),
    "dot-dot inside": ([folder("a"), file("a/../../evil")], "entry 'a/../../evil': "),
    "folder not listed": ([file("a/b")], "entry 'a/b': "),
    "case collision": ([file("README"), file("readme")], "entry 'readme': "),
    "file is a folder prefix": ([file("a"), file("a/b")], "entry 'a/b': "),
    "link out": ([link("l", "../../etc")], "entry 'l': "),
    "absolute link": ([link("l", "/etc/passwd")], "entry 'l': "),
    "control character": ([file("a\x1bb")], "entry 'a\\x1bb': "),
}


def publish_crafted(
    monkeypatch: pytest.MonkeyPatch,
    network: Network,
    tmp_path: Path,
    tree_entries: list[Entry],
    **kw: object,
) -> tuple[Peer, str]:
    """alice, hostile, shares a crafted tree, and her holder serves its pages unchecked
    (an honest holder checks its own index, and would refuse to serve this one)."""
    alice = network.add("alice", serve=True)
    files = [entry for entry in tree_entries if entry.kind == FILE]
    data = b"x" * sum(entry.size for entry in files)
    tree = crafted_tree(
        tree_entries,
        data,
        owner="alice",
        owner_fp=alice.identity.fingerprint,
        **kw,  # type: ignore[arg-type]
    )
    header = tree.header_bytes
    signature = alice.identity.sign(header)
    file_id = file_id_of(header)
    grant = alice.identity.sign(protocol.grant_payload(file_id, None))
    assert alice.broker.publish(alice._token(), header, signature, None, grant) == file_id
    (tmp_path / "tree").mkdir()
    alice.registry.add(
        Share(file_id, tmp_path / "tree", "tree", len(data), header, signature, None, [], 0,
              pages=tree.packed_pages)
    )  # fmt: skip
    monkeypatch.setattr(transfer, "index_of", lambda *args, **kwargs: tree.index)
    return alice, file_id


def written(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


@pytest.mark.parametrize(("entries", "named"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_tree_is_refused_before_a_byte_is_written(
    network: Network,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    entries: list[Entry],
    named: str,
) -> None:
    _alice, file_id = publish_crafted(monkeypatch, network, tmp_path, entries)
    bob = network.add("bob")
    before = written(network.root)
    with pytest.raises(IntegrityError) as refused:
        bob.get(file_id)
    message = str(refused.value)
    assert message.startswith(f"unsafe tree: {named}"), message
    assert "\n" not in message
    new = written(network.root) - before
    assert not [path for path in new if "download" in str(path) or "evil" in str(path)], new


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ((2, 0, 0), "unsafe tree: the entries hold 1 files, 1 folders, 0 links, 3 bytes; "),
        ((2, 1, 0), "alice: the signed entry page 0 holds the wrong number of entries"),
    ],
    ids=["same total, other kinds", "more entries than listed"],
)
def test_counts_that_lie_are_refused(
    network: Network,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    counts: tuple[int, int, int],
    message: str,
) -> None:
    _alice, file_id = publish_crafted(
        monkeypatch, network, tmp_path, [folder("a"), file("a/b")], counts=counts
    )
    bob = network.add("bob")
    with pytest.raises(IntegrityError) as refused:
        bob.get(file_id)
    assert str(refused.value).startswith(message), refused.value
    assert not bob.config.download_dir.exists() or not any(bob.config.download_dir.iterdir())
