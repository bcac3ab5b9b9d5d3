"""sfs.peer.tree_scan: real folders under tmp_path, scanned without following links."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from blake3 import blake3

from sfs.common.errors import StorageError, UsageError
from sfs.common.tree import (
    Entry,
    decode_header,
    verify_entry_page,
    verify_hash_page,
    verify_header,
)
from sfs.common.tree_rules import TreeChecker, check_totals
from sfs.peer.keys import Identity, create_identity
from sfs.peer.stamps import stamp_of
from sfs.peer.tree_scan import build_tree, hash_chunks, scan_tree


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return create_identity(tmp_path_factory.mktemp("alice"), "alice")


def make_folder(root: Path) -> Path:
    top = root / "share"
    (top / "src" / "pkg").mkdir(parents=True)
    (top / "empty").mkdir()
    (top / "README").write_bytes(b"hello")
    (top / "src" / "pkg" / "a.py").write_bytes(b"x" * 100)
    (top / "src" / "pkg-notes").write_bytes(b"")
    (top / "src" / "pkg" / "a.py").chmod(0o4750)  # setuid is never shared
    (top / "src" / "up").symlink_to("..")
    (top / "src" / "readme").symlink_to("../README")
    return top


def paths(entries: list[Entry]) -> list[tuple[str, str]]:
    return [(e.path, e.kind) for e in entries]


def test_a_folder_is_scanned_in_index_order_without_following_links(tmp_path: Path) -> None:
    top = make_folder(tmp_path)
    scan = scan_tree(top)
    assert (scan.kind, scan.name, scan.root) == ("folder", "share", top)
    assert paths(scan.entries) == [
        ("README", "file"),
        ("empty", "folder"),
        ("src", "folder"),
        ("src/pkg", "folder"),
        ("src/pkg/a.py", "file"),
        ("src/pkg-notes", "file"),  # after everything inside src/pkg
        ("src/readme", "link"),
        ("src/up", "link"),
    ]
    by_path = {e.path: e for e in scan.entries}
    assert by_path["src/pkg/a.py"].mode == 0o750
    assert by_path["src/pkg/a.py"].mtime_ns == os.stat(top / "src/pkg/a.py").st_mtime_ns
    assert by_path["src/up"].target == ".."
    assert by_path["empty"].size == 0
    assert scan.sources == [
        str(top / "README"),
        str(top / "src/pkg/a.py"),
        str(top / "src/pkg-notes"),
    ]
    assert scan.size == 105


def test_one_file_is_a_tree_of_one_entry(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"abc")
    scan = scan_tree(path)
    assert (scan.kind, paths(scan.entries), scan.sources) == (
        "file",
        [("report.pdf", "file")],
        [str(path)],
    )


def test_names_are_stored_in_nfc(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    (top / "cafe\u0301").write_bytes(b"1")  # NFD, as macOS writes it
    scan = scan_tree(top)
    assert paths(scan.entries) == [("caf\u00e9", "file")]
    assert scan.sources == [str(top / "cafe\u0301")]  # read from the name on disk


def test_links_that_leave_the_tree_are_refused_with_the_list(tmp_path: Path) -> None:
    top = make_folder(tmp_path)
    (top / "etc").symlink_to("/etc")
    (top / "src" / "out").symlink_to("../../elsewhere")
    with pytest.raises(UsageError) as caught:
        scan_tree(top)
    message = str(caught.value)
    assert "point outside it (--skip-unsafe leaves them out)" in message
    assert "'etc -> /etc'" in message
    assert "'src/out -> ../../elsewhere'" in message

    scan = scan_tree(top, skip_unsafe=True)
    assert sorted(scan.unsafe_skipped) == ["etc", "src/out"]
    assert "etc" not in {e.path for e in scan.entries}


def test_a_link_leaving_through_another_link_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "t"
    (top / "a").mkdir(parents=True)
    (top / "a" / "l").symlink_to("..")
    (top / "a" / "m").symlink_to("l/..")  # lexically a/, really the tree's parent
    with pytest.raises(UsageError, match="entry 'a/m': link target leaves the share through"):
        scan_tree(top)


def test_fifos_and_sockets_are_skipped_and_listed(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    (top / "keep").write_bytes(b"k")
    os.mkfifo(top / "pipe")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(top / "sock"))
        scan = scan_tree(top)
    finally:
        server.close()
    assert sorted(scan.special_skipped) == ["pipe", "sock"]
    assert paths(scan.entries) == [("keep", "file")]


def test_names_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    (Path(os.fsencode(top).decode()) / os.fsdecode(b"bad\xff")).write_bytes(b"")
    with pytest.raises(UsageError, match="names that are not UTF-8"):
        scan_tree(top)


def test_names_equal_after_case_folding_are_refused(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    (top / "Notes").write_bytes(b"")
    (top / "notes").write_bytes(b"")
    with pytest.raises(UsageError, match="entry 'notes': same name as 'Notes' after case"):
        scan_tree(top)


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A folder `nobody` can reach: pytest's tmp_path sits under a 0700 folder."""
    with tempfile.TemporaryDirectory(prefix="sfs-tree-scan-") as name:
        Path(name).chmod(0o755)
        yield Path(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root (CI runs as root)")
def test_unreadable_files_are_refused_with_the_list(world_readable_dir: Path) -> None:
    """Runs the scan as `nobody`: CI runs as root, and root reads every file (DESIGN §11)."""
    top = world_readable_dir / "t"
    (top / "sub").mkdir(parents=True)
    for path in (top, top / "sub"):
        path.chmod(0o755)
    for name, mode in (("open", 0o644), ("secret", 0o600), ("sub/private", 0o600)):
        (top / name).write_bytes(b"x")
        (top / name).chmod(mode)
    locked = top / "locked"
    locked.mkdir(mode=0o700)
    script = "import sys; from pathlib import Path; from sfs.peer.tree_scan import scan_tree; "
    script += "scan_tree(Path(sys.argv[1]))"
    result = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", script, str(top)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode != 0
    assert "StorageError: cannot read in" in result.stderr
    assert "'locked', 'secret', 'sub/private'" in result.stderr
    assert "'open'" not in result.stderr


def test_chunk_hashes_cover_the_stream_in_entry_order(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    contents = {f"f{i}": bytes([i]) * (i * 7) for i in range(12)}
    for name, data in contents.items():
        (top / name).write_bytes(data)
    scan = scan_tree(top)
    stream = b"".join(contents[e.path] for e in scan.entries)
    chunk = 64
    hashes, stamps = hash_chunks(scan, chunk)
    expected = b"".join(
        blake3(stream[i : i + chunk]).digest() for i in range(0, len(stream), chunk)
    )
    assert hashes == expected
    assert stamps == []  # a folder keeps no stamp per file: memory at 100,000 files


def test_a_file_share_keeps_its_stamp(tmp_path: Path) -> None:
    path = tmp_path / "one"
    path.write_bytes(b"x" * 100)
    _, stamps = hash_chunks(scan_tree(path), 64)
    assert stamps == [stamp_of(path.stat())]


def test_a_folder_keeps_a_source_path_only_where_the_name_on_disk_differs(
    tmp_path: Path,
) -> None:
    top = tmp_path / "t"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "plain").write_bytes(b"1")
    (top / "cafe\u0301").write_bytes(b"2")  # NFD on disk, NFC in the tree
    scan = scan_tree(top)
    assert scan.odd_sources == {"caf\u00e9": str(top / "cafe\u0301")}
    assert scan.sources == [str(top / "cafe\u0301"), str(top / "sub" / "plain")]


def test_a_file_changed_after_the_scan_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    (top / "a").write_bytes(b"12345")
    scan = scan_tree(top)
    (top / "a").write_bytes(b"123456")
    with pytest.raises(StorageError, match="changed while the share was built"):
        hash_chunks(scan, 64)


def test_a_built_tree_verifies_as_a_requester_would(tmp_path: Path, alice: Identity) -> None:
    top = make_folder(tmp_path)
    built = build_tree(top, alice, ["code"])
    header = verify_header(built.header_bytes, built.signature, alice.bundle)
    assert header == decode_header(built.header_bytes) == built.header
    assert (header.files, header.folders, header.links, header.size) == (3, 3, 2, 105)
    assert header.chunk_count == 1 and header.chunk_size == 1024 * 1024
    checker = TreeChecker()
    for index, page in enumerate(built.entry_pages):
        for entry in verify_entry_page(header, index, page):
            checker.add(entry)
    check_totals(header, checker.finish())
    assert (
        verify_hash_page(header, 0, built.hash_pages[0]) == blake3(b"hello" + b"x" * 100).digest()
    )
