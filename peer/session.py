"""The broker session token, kept in data_dir/session.json (mode 0600)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sfs.common.errors import SfsError, StorageError
from sfs.common.files import read_private_file, write_private_file


class NotLoggedIn(SfsError):
    pass


@dataclass(frozen=True)
class Session:
    username: str
    token: str
    expires_at: int


def _path(data_dir: Path) -> Path:
    return data_dir / "session.json"


MAX_TOKEN_LENGTH = 128  # as the protocol allows


def save_session(data_dir: Path, session: Session) -> None:
    document = {
        "username": session.username,
        "token": session.token,
        "expires_at": session.expires_at,
    }
    write_private_file(_path(data_dir), json.dumps(document).encode())


def load_session(data_dir: Path, username: str) -> Session:
    path = _path(data_dir)
    if not path.exists():
        raise NotLoggedIn(f"{username} is not logged in; run `sfs-peer login`")
    try:
        raw = json.loads(read_private_file(path, "the session file"))
        session = Session(str(raw["username"]), str(raw["token"]), int(raw["expires_at"]))
        if not 0 < len(session.token) <= MAX_TOKEN_LENGTH or not session.token.isprintable():
            raise ValueError("not a token")
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"the session file {path} is corrupt; run `sfs-peer login`") from exc
    if session.username != username:
        raise NotLoggedIn(f"the saved session is for {session.username}; run `sfs-peer login`")
    # No local expiry check: the broker extends sessions on use and decides.
    return session


def clear_session(data_dir: Path) -> None:
    _path(data_dir).unlink(missing_ok=True)
