"""The store contract: what the broker keeps, and what each operation means.

The request handlers (`BrokerService`) see only `Store`; `SqliteStore`
(`sfs.broker.store`, the embedded default) and `PostgresStore`
(`sfs.broker.postgres_store`, for several brokers on one database) implement it, and
tests/unit/test_store_contract.py runs the same tests against both. A behaviour this
module does not state is a backend's own business.

Times are whole seconds since the epoch, passed in by the caller (the clock is
injected); a store never reads the clock. Texts never hold a NUL character (the codec
refuses them). Every operation is atomic: it happens whole or not at all, and once it
returns it survives a crash of the broker process. Presence alone is soft state that
a backend may lose in a crash of the database: heartbeats rebuild it.

Errors: a failing database raises `StorageError` (with a message a person can read and
no secret in it); `UsernameTaken` and `QuotaExceeded` are the two refusals callers
act on.

Search (`Store.search`) means exactly this, whatever the backend's index:
- A file is visible to a user if it is public (access None), the user owns it, or the
  user is on its access list.
- Case is folded with Python's `str.lower`, on both the terms and the text (so İ is
  i plus a combining dot, the Kelvin sign is k, ẞ is ß, sigma and final sigma stay apart; no full
  case folding: ß never matches "ss"). Databases fold differently, so backends fold in
  Python.
- A term matches a file if, folded, it is a substring of the folded name, or of the
  folded keywords joined by newlines. Every term must match; no terms match every file.
  Characters such as % _ " * : have no special meaning.
- `owner` (a username) keeps only that user's files; an unknown owner finds nothing.
- Hits come newest first (`shared_at` descending), ties by `file_id` ascending, at most
  `limit` of them; each says whether the owner is online at `now`.
`model_search` in the contract tests is this definition as a few lines of Python.

The work of a search is bounded in rows, not in time (so that the answer is the same on
a loaded machine), and only what the user may see decides the answer. The candidates of
a search are the files visible to the user (of `owner`, if given) that hold every term
of 2 characters or more, in the order of hits (newest first, ties by file id); terms of
1 character are checked on each candidate (a term's length is counted after folding).
A search examines at most `budget` candidates (`SEARCH_BUDGET` unless a caller asks for
fewer); if that leaves it with fewer than `limit` hits while more candidates remain, the
answer is `partial`: its hits are
exactly those among the examined candidates, but older files may match too ("add a
word"). Files the user cannot see are never candidates: whether they exist, and what
they hold, changes neither the hits nor `partial` (backends reach the visible files
through an index, so that a user who sees few of many files does not make a search read
the others). A store whose visible files are at most `budget` never answers `partial`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sfs.broker.throttle import LimitState
from sfs.common.errors import StorageError
from sfs.common.identity import KeyBundle

MAX_HOLDERS = 64  # listed per lookup: the owner first, then seeders
# Candidate files a search examines at most (see the module docstring): a few µs each,
# so a few ms of SQLite's or PostgreSQL's work on the machine of docs/PERFORMANCE.md.
SEARCH_BUDGET = 2_000


@dataclass(frozen=True)
class User:
    id: int
    username: str
    password_hash: bytes
    bundle: KeyBundle
    disabled: bool = False  # by an operator (`sfs-broker user disable`)


@dataclass(frozen=True)
class Account:
    """One user as an operator sees it (`sfs-broker user list`)."""

    username: str
    created_at: int
    files: int  # shared by the user
    online: bool
    disabled: bool


@dataclass(frozen=True)
class FileEntry:
    """A share as the broker keeps it. `name`, `size`, `keywords`, `kind` and `files` are
    copies of what the owner-signed tree header in `manifest` says (the broker reads them
    there at `publish`), kept so that search can show them without decoding headers."""

    file_id: str
    owner: str
    name: str
    size: int
    keywords: list[str]
    manifest: bytes
    signature: bytes
    shared_at: int
    grant: bytes = b""  # the owner's signature over the access list
    kind: str = "file"  # "file" or "folder"
    files: int = 1  # regular files in the share


@dataclass(frozen=True)
class Presence:
    username: str
    endpoint: str
    bundle: KeyBundle
    # Online while now < this (0: not said). Not compared: the same presence, renewed.
    online_until: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Hit:
    file: FileEntry
    online: bool


class Found(list[Hit]):
    """The hits of a search, in order; `partial`: the budget ran out first, so older
    files may match too."""

    def __init__(self, hits: Iterable[Hit] = (), partial: bool = False) -> None:
        super().__init__(hits)
        self.partial = partial


@dataclass(frozen=True)
class IdMatch:
    """A file whose id starts with a prefix a user typed."""

    file_id: str
    owner: str
    name: str


@dataclass(frozen=True)
class Stats:
    users: list[tuple[str, bool]]  # (username, online), by username
    files: int
    online: list[tuple[str, str, int]]  # (username, endpoint, online_until), by username


@dataclass(frozen=True)
class Quota:
    """What one user may keep at the broker."""

    files: int
    manifest_bytes: int


class UsernameTaken(StorageError):
    pass


class QuotaExceeded(StorageError):
    """A file that would take its owner past their `Quota`; what they use without it."""

    def __init__(self, files: int, manifest_bytes: int, adding: int) -> None:
        super().__init__(
            f"over quota: {files} files, {manifest_bytes} + {adding} bytes of manifests"
        )
        self.files, self.manifest_bytes, self.adding = files, manifest_bytes, adding


class Store(Protocol):
    """What the broker keeps. Safe to call from several threads at once."""

    # --- users and sessions --------------------------------------------------------------

    def add_user(self, username: str, password_hash: bytes, bundle: KeyBundle, now: int) -> User:
        """Register a user with a new id. Raises `UsernameTaken` if the name (compared
        exactly: names are case-sensitive) or the transport key is in use; nothing is
        stored then."""

    def get_user(self, username: str) -> User | None:
        """The user of exactly that name."""

    def add_session(self, token_hash: bytes, user_id: int, expires_at: int, now: int) -> None:
        """Store a session for an existing user (else `StorageError`) and may drop the
        sessions expired by `now`."""

    def session_user(self, token_hash: bytes, now: int, extend_to: int) -> User | None:
        """The user of a session that expires after `now`, else None. Its expiry slides
        towards `extend_to` in coarse steps (at most a tenth of the lifetime left, and
        at most 300 s short of it), so that most calls need no write."""

    def generation(self) -> int:
        """A number that grows with every committed change that a cached session or
        lookup answer depends on (sessions ended, users changed or removed, files, access
        lists, holders; presence that appears, goes or moves, not a renewal), made by any
        writer. Read after a request arrived, it tells whether what a broker cached
        before still holds."""

    def delete_session(self, token_hash: bytes) -> None:
        """End a session; ending one that does not exist is no error."""

    # --- presence (soft state) -----------------------------------------------------------

    def set_online(self, user_id: int, endpoint: str, until: int) -> None:
        """The user is reachable at `endpoint` while `now < until`; replaces the last."""

    def set_offline(self, user_id: int) -> None:
        """Forget the user's presence, if any."""

    # --- files ---------------------------------------------------------------------------

    def unknown_users(self, usernames: Sequence[str]) -> list[str]:
        """Those of `usernames` that are not registered, in the order given."""

    def add_file(
        self,
        owner_id: int,
        entry: FileEntry,
        access: Sequence[str] | None,
        quota: Quota | None = None,
    ) -> None:
        """Store a file, replacing the one with the same id (its access list and
        holders go with it). `access` None means every registered user; otherwise the
        listed users (unknown names are ignored) and the owner. `entry.owner` is not
        read: the owner is `owner_id`. Raises `QuotaExceeded` if the owner's other files
        and this one would exceed `quota`, checked in the same transaction as the
        write; a replaced file counts once."""

    def remove_file(self, file_id: str, owner_id: int) -> bool:
        """Remove a file of this owner (with its access list and holders); whether
        there was one."""

    def search(
        self,
        user_id: int,
        terms: Sequence[str],
        owner: str | None,
        limit: int,
        now: int,
        budget: int = SEARCH_BUDGET,
    ) -> Found:
        """The files visible to the user that match every term, examining at most
        `budget` candidates (1 or more; only visible files are candidates): see this
        module's docstring for the exact meaning."""

    def visible_file(self, file_id: str, user_id: int) -> FileEntry | None:
        """The file, if the user may see it."""

    def files_by_prefix(self, user_id: int, prefix: str, limit: int) -> list[IdMatch]:
        """The files visible to the user (the rule of search) whose id starts with
        `prefix`, a string of lowercase hex digits as ids are; by id, at most `limit`."""

    def online_holders(self, file_id: str, now: int) -> list[Presence]:
        """Who serves the file now: its owner if online, then the seeders online, the
        most recently refreshed first; at most `MAX_HOLDERS` in all."""

    def signed_access(self, file_id: str) -> list[str] | None:
        """The access list exactly as the owner signed it (None: every user, or no such
        file)."""

    def add_holder(self, file_id: str, user_id: int) -> None:
        """The user serves a copy of the file (a seeder); adding twice is no error."""

    def remove_holder(self, file_id: str, user_id: int) -> bool:
        """The user no longer serves the file; whether it did."""

    def stats(self, now: int) -> Stats:
        """Every user with whether they are online, the number of files, and the
        presences live at `now`."""

    # --- operators (sfs-broker user ...) ---------------------------------------------------

    def accounts(self, now: int) -> list[Account]:
        """Every user, by username: when registered, files shared, whether online at
        `now`, whether disabled."""

    def set_disabled(self, username: str, disabled: bool) -> bool:
        """Disable or enable a user; whether there is one. Disabling ends the user's
        sessions and forgets its presence in the same transaction; while disabled,
        `session_user` refuses it, `set_online` ignores it, its files are found by
        nobody (`search`, `visible_file`), it is listed as nobody's holder
        (`online_holders`), and `stats` counts it offline. Nothing is deleted:
        enabling brings it all back. `get_user` still returns the user (with
        `disabled`), so its name stays taken."""

    def delete_user(self, username: str) -> bool:
        """Remove a user and everything that refers to it: sessions, presence, its
        files (with their access lists and holders), its place on other users' access
        lists, its seeded copies; whether there was one. A user registered later under
        the name gets a new id and inherits none of it. (An access list as its owner
        signed it, `signed_access`, still names the old user: the broker cannot change
        a signature; it no longer lets that name see the file.)"""

    # --- limits ----------------------------------------------------------------------------

    def limit_state(self) -> LimitState:
        """Where the login throttle and the pending challenges live (the same object
        each call): shared by every broker that uses this store."""

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
