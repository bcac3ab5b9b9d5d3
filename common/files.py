"""Small file helpers: private (0600) files, atomic replacement, permission checks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sfs.common.errors import KeyFileError, StorageError


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write `data` to `path`, readable and writable by its owner only."""
    temp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        temp = Path(name)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except OSError as exc:
        if temp is not None:
            with contextlib.suppress(OSError):
                temp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` + ".lock" (between processes and threads alike),
    for read-modify-write of small state files."""
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError as exc:
        raise StorageError(
            f"cannot use {path}: the folder {path.parent} does not exist (run `init` first?)"
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot lock {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_private_file(path: Path, what: str) -> bytes:
    """Read a secret file, refusing one that others can read or write."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
