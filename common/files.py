"""Small file helpers: private (0600) files, atomic replacement, permission checks."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from sfs.common.errors import KeyFileError, StorageError


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write `data` to `path`, readable and writable by its owner only."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


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
