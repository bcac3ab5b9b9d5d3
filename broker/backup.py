"""`sfs-broker backup FILE`: a consistent copy of the SQLite index, taken while the
broker runs (SQLite's online backup API), private like the original.

Restore: stop the broker, move the copy to the configured database path (`broker.db`
in `data_dir` by default), removing any `broker.db-wal` and `broker.db-shm` beside it,
and start the broker. A PostgreSQL index is backed up with `pg_dump` (see the README).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from sfs.common.errors import StorageError


def backup_sqlite(source: Path, target: Path) -> None:
    """Copy the database at `source` to the new file `target` and check the copy."""
    try:  # never over an existing file: it may be the only other copy
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError as exc:
        raise StorageError(f"{target} exists already; give the backup a new file name") from exc
    except OSError as exc:
        raise StorageError(f"cannot create {target}: {exc.strerror}") from exc
    try:
        with (
            contextlib.closing(sqlite3.connect(source)) as db,
            contextlib.closing(sqlite3.connect(target)) as copy,
        ):
            db.backup(copy)
            check = copy.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise StorageError(f"the backup in {target} fails its check: {check}")
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot back up {source}: {exc}") from exc
        raise
