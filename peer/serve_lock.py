"""One `sfs-peer serve` per data folder: two would fight over the listening address, the
presence at the broker and the seeded copies. An exclusive `flock` on `serve.lock`,
held while serving; the kernel releases it when the process ends, however it ends, so
a crash leaves no stale lock. The file holds the pid, for the message."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sfs.common.errors import InUse, StorageError
from sfs.common.files import make_private_dir

_MAX_PID_TEXT = 32


@contextlib.contextmanager
def serve_lock(data_dir: Path) -> Iterator[None]:
    make_private_dir(data_dir)
    path = data_dir / "serve.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUse(
                f"another `sfs-peer serve` is running for this data folder"
                f" ({_holder(fd)}): {data_dir}"
            ) from None
        except OSError:
            pass  # a file system without locks: serve unlocked, as before
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    text = os.pread(fd, _MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
