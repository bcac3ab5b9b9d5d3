"""The local share registry: which files this peer serves, from which path, to whom.

The only source of paths the peer server reads from. Nothing received from the network
is ever used as a path: a request names a file id, and the id is looked up here.
SQLite, so that `sfs-peer share` and a running `sfs-peer serve` see the same data.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfs.common.errors import StorageError
from sfs.peer.stamps import FileStamp, decode_stamp


@dataclass(frozen=True)
class Share:
    file_id: str
    path: Path
    name: str
    size: int
    manifest: bytes
    signature: bytes
    access: list[str] | None  # None: every registered user
    keywords: list[str]
    shared_at: int
    owner: str | None = None  # None: this user's own file; else a copy this peer seeds
    grant: bytes = b""  # the owner's signature over the access list (seeded copies)
    stamp: FileStamp | None = None  # the file as hashed; None: hash every chunk served
    pages: bytes = b""  # the index pages the owner signed (`tree_index.pack_pages`)

    def allows(self, username: str) -> bool:
        return self.access is None or username in self.access or username == self.owner


_SCHEMA = """
CREATE TABLE IF NOT EXISTS shares (
    file_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    manifest BLOB NOT NULL,
    signature BLOB NOT NULL,
    access TEXT,  -- JSON list of usernames, NULL for everyone
    keywords TEXT NOT NULL,  -- JSON list
    shared_at INTEGER NOT NULL,
    owner TEXT,  -- NULL for this user's own files; the owner of a seeded copy
    grant_signature BLOB NOT NULL DEFAULT x'',
    stamp TEXT,  -- JSON [device, inode, size, mtime_ns, ctime_ns]; NULL: none recorded
    pages BLOB NOT NULL DEFAULT x''  -- the tree's index pages; empty for version 1 shares
)
"""
# Columns added since the first release, for registries made before them.
_ADDED_COLUMNS = {
    "owner": "ALTER TABLE shares ADD COLUMN owner TEXT",
    "grant_signature": "ALTER TABLE shares ADD COLUMN grant_signature BLOB NOT NULL DEFAULT x''",
    "stamp": "ALTER TABLE shares ADD COLUMN stamp TEXT",  # rows from before: NULL, hashed
    "pages": "ALTER TABLE shares ADD COLUMN pages BLOB NOT NULL DEFAULT x''",
}
_COLUMNS = (
    "file_id, path, name, size, manifest, signature, access, keywords, shared_at, owner, "
    "grant_signature, stamp, pages"
)
_PLACES = ", ".join("?" for _ in _COLUMNS.split(","))


class ShareRegistry:
    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            # Created 0600 if new. An existing file is not opened here: closing a file
            # descriptor drops every POSIX lock this process holds on it, and another
            # connection of this process (serve has two) would then read stale pages.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            self._db = sqlite3.connect(path, timeout=10, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            present = {row[1] for row in self._db.execute("PRAGMA table_info(shares)")}
            for column, statement in _ADDED_COLUMNS.items():
                if column not in present:
                    self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the share registry {path}: {exc}") from exc
        self._cache: dict[str, Share] = {}  # see `get`
        self._version = -1

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"share registry error: {exc}") from exc

    def add(self, share: Share) -> None:
        self._cache.clear()  # this connection's own writes leave data_version alone
        self._run(
            f"INSERT OR REPLACE INTO shares ({_COLUMNS}) VALUES ({_PLACES})",
            (
                share.file_id,
                str(share.path),
                share.name,
                share.size,
                share.manifest,
                share.signature,
                None if share.access is None else json.dumps(share.access),
                json.dumps(share.keywords),
                share.shared_at,
                share.owner,
                share.grant,
                None if share.stamp is None else share.stamp.encode(),
                share.pages,
            ),
        )

    def get(self, file_id: str) -> Share | None:
        """The share of `file_id`, as the registry has it now (whichever process wrote
        it). Cheap enough to ask for every chunk served: shares found are kept until the
        database changes, and a change is seen through SQLite's `data_version`."""
        version = self._run("PRAGMA data_version")[0][0]
        if version != self._version:
            self._cache.clear()
            self._version = version
        cached = self._cache.get(file_id)
        if cached is not None:
            return cached
        rows = self._run(f"SELECT {_COLUMNS} FROM shares WHERE file_id = ?", (file_id,))
        if not rows:
            return None
        share = self._cache[file_id] = _share(rows[0])
        return share

    def remove(self, file_id: str) -> bool:
        found = self.get(file_id) is not None
        self._run("DELETE FROM shares WHERE file_id = ?", (file_id,))
        self._cache.clear()
        return found

    def all(self) -> list[Share]:
        return [
            _share(row) for row in self._run(f"SELECT {_COLUMNS} FROM shares ORDER BY shared_at")
        ]


def _share(row: Any) -> Share:
    (
        file_id,
        path,
        name,
        size,
        manifest,
        signature,
        access,
        keywords,
        shared_at,
        owner,
        grant,
        stamp,
        pages,
    ) = row
    return Share(
        file_id,
        Path(path),
        name,
        size,
        manifest,
        signature,
        None if access is None else json.loads(access),
        json.loads(keywords),
        shared_at,
        owner,
        bytes(grant),
        decode_stamp(stamp),
        bytes(pages),
    )
