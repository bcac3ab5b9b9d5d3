"""Broker sessions.

The interactive one, made by `login` with the user's password, is kept in
data_dir/session.json (mode 0600). `serve` never uses it: a long-running server makes
its own with the device's keys (`DeviceSession`), so it keeps serving across the expiry
of the interactive session and the user's `logout`, and needs no password at all.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sfs.common import protocol
from sfs.common.errors import RemoteError, SfsError, StorageError, TransportError
from sfs.common.files import read_private_file, write_private_file
from sfs.common.protocol import ErrorCode
from sfs.peer.client import BrokerClient
from sfs.peer.keys import Identity

T = TypeVar("T")

log = logging.getLogger("sfs.peer")


class NotLoggedIn(SfsError):
    pass


class DeviceNotRegistered(NotLoggedIn):
    """The broker does not accept this device's keys for the user."""


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


class DeviceSession:
    """A server's session, made and remade with the device's own keys (`device_login`:
    the registered transport key, and the RSA key's signature over a fresh challenge).

    Shared by the server's threads, each with its own broker client: `call` runs a
    request with the current token and, if the broker no longer knows it (expired, or
    ended by the broker), logs in again once and retries. `DeviceNotRegistered` means
    the broker refuses these keys: the account was removed, or registered elsewhere."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._token: str | None = None
        self._lock = threading.Lock()

    def call(self, broker: BrokerClient, request: Callable[[str], T]) -> T:
        token = self._current(broker)
        try:
            return request(token)
        except RemoteError as exc:
            if exc.code != ErrorCode.UNAUTHORIZED:
                raise
        return request(self._renew(broker, token))

    def end(self, broker: BrokerClient) -> None:
        """Log this session out at the broker (best effort)."""
        with self._lock:
            token, self._token = self._token, None
        if token is not None:
            broker.logout(token)

    def _current(self, broker: BrokerClient) -> str:
        with self._lock:
            if self._token is None:
                self._token = self._login(broker)
            return self._token

    def _renew(self, broker: BrokerClient, stale: str) -> str:
        with self._lock:  # one login, however many threads found the token stale
            if self._token is None or self._token == stale:
                self._token = self._login(broker)
            return self._token

    def _login(self, broker: BrokerClient) -> str:
        # A device login that got no answer is not sent again (the broker may have
        # redeemed its challenge): start over with a fresh challenge, from the broker
        # the client turned to, once for each broker.
        for _ in range(len(broker.endpoints) - 1):
            try:
                return self._login_once(broker)
            except TransportError as exc:
                log.info("device login: %s", exc)
        return self._login_once(broker)

    def _login_once(self, broker: BrokerClient) -> str:
        identity = self._identity
        challenge = broker.challenge()
        payload = protocol.device_login_payload(identity.username, challenge, identity.bundle)
        try:
            result = broker.device_login(identity.username, challenge, identity.sign(payload))
        except RemoteError as exc:
            if exc.code == ErrorCode.UNAUTHORIZED:
                raise DeviceNotRegistered(
                    f"the broker does not accept this device's keys for {identity.username} "
                    "(is this user registered from this data folder?); run `sfs-peer register`"
                ) from exc
            raise
        if result.username != identity.username:
            raise SfsError("the broker answered for another user")
        return result.token
