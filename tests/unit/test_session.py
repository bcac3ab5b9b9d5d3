"""sfs.peer.session: the broker session token kept on disk."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from sfs.common.errors import KeyFileError, StorageError
from sfs.peer.session import NotLoggedIn, Session, clear_session, load_session, save_session

LATER = int(time.time()) + 3600


def test_save_then_load(tmp_path: Path) -> None:
    session = Session("alice", "tok-123", LATER)
    save_session(tmp_path, session)
    assert load_session(tmp_path, "alice") == session


def test_saving_again_replaces_the_session(tmp_path: Path) -> None:
    save_session(tmp_path, Session("alice", "old", LATER))
    save_session(tmp_path, Session("alice", "new", LATER + 5))
    assert load_session(tmp_path, "alice") == Session("alice", "new", LATER + 5)


def test_the_session_file_is_private(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        save_session(tmp_path, Session("alice", "secret-token", LATER))
    finally:
        os.umask(previous)
    path = tmp_path / "session.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_bytes())["token"] == "secret-token"


def test_a_readable_session_file_is_refused(tmp_path: Path) -> None:
    save_session(tmp_path, Session("alice", "secret-token", LATER))
    (tmp_path / "session.json").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod"):
        load_session(tmp_path, "alice")


def test_no_session_means_not_logged_in(tmp_path: Path) -> None:
    with pytest.raises(NotLoggedIn, match="sfs-peer login"):
        load_session(tmp_path, "alice")


def test_the_broker_not_the_saved_expiry_decides(tmp_path: Path) -> None:
    # The broker extends a session each time it is used, so the expiry saved at login
    # is out of date: a session past it still loads, and the broker says if it is over.
    save_session(tmp_path, Session("alice", "tok", int(time.time()) - 3600))
    assert load_session(tmp_path, "alice").token == "tok"


def test_another_users_session_means_not_logged_in(tmp_path: Path) -> None:
    save_session(tmp_path, Session("bob", "tok", LATER))
    with pytest.raises(NotLoggedIn, match="bob") as caught:
        load_session(tmp_path, "alice")
    assert "sfs-peer login" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"username": "alice", "token": "t"}',
        b'{"username": "alice", "expires_at": 99999999999}',
        b'{"username": "alice", "token": "t", "expires_at": "soon"}',
        b'{"username": "alice", "token": "t", "expires_at": null}',
        b'{"username": "alice", "token": "", "expires_at": 1}',
        b'{"username": "alice", "token": "' + b"t" * 129 + b'", "expires_at": 1}',
        b'{"username": "alice", "token": "t\\n", "expires_at": 1}',
    ],
)
def test_a_corrupt_session_file_is_a_storage_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(StorageError, match="sfs-peer login"):
        load_session(tmp_path, "alice")


def test_clear_session(tmp_path: Path) -> None:
    save_session(tmp_path, Session("alice", "tok", LATER))
    clear_session(tmp_path)
    assert not (tmp_path / "session.json").exists()
    with pytest.raises(NotLoggedIn):
        load_session(tmp_path, "alice")
    clear_session(tmp_path)  # nothing to clear is fine
