"""Building a signed manifest for a local file (DESIGN section 5, `share PATH`)."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import StorageError, UsageError
from sfs.common.manifest import MANIFEST_VERSION, MAX_NAME_BYTES, Manifest, choose_chunk_size
from sfs.common.protocol import USERNAME_PATTERN
from sfs.peer.keys import Identity
from sfs.peer.stamps import FileStamp, stamp_of

Progress = Callable[[int, int], None]  # (bytes done, total bytes)

MAX_KEYWORDS = 64
MAX_KEYWORD_LENGTH = 64


def normalise_keywords(keywords: list[str]) -> list[str]:
    """Lowercase, trimmed, without duplicates, in the order given."""
    result: list[str] = []
    for keyword in keywords:
        cleaned = " ".join(keyword.lower().split())
        if not cleaned or len(cleaned) > MAX_KEYWORD_LENGTH:
            raise UsageError(f"keywords must be 1 to {MAX_KEYWORD_LENGTH} characters: {keyword!r}")
        if cleaned not in result:
            result.append(cleaned)
    if len(result) > MAX_KEYWORDS:
        raise UsageError(f"at most {MAX_KEYWORDS} keywords per file")
    return result


def check_usernames(usernames: list[str]) -> list[str]:
    for name in usernames:
        if not re.fullmatch(USERNAME_PATTERN, name):
            raise UsageError(f"not a valid username: {name!r}")
    return sorted(set(usernames))


def shareable(path: Path) -> Path:
    """The absolute path of a regular, readable file or of a folder, or a clear error
    (a folder's contents are checked when it is scanned: `tree_scan`)."""
    try:
        resolved = path.expanduser().resolve(strict=True)
        if resolved.is_dir():
            if len(resolved.name.encode()) > MAX_NAME_BYTES or not resolved.name:
                raise UsageError(f"the folder name must be 1 to {MAX_NAME_BYTES} bytes: {path}")
            return resolved
    except FileNotFoundError as exc:
        raise UsageError(f"no such file or folder: {path}") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return shareable_file(path)


def shareable_file(path: Path) -> Path:
    """The absolute path of a regular, readable file, or a clear error."""
    try:
        resolved = path.expanduser().resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError as exc:
        raise UsageError(f"no such file: {path}") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise UsageError(f"not a regular file: {path}")
    if len(resolved.name.encode()) > MAX_NAME_BYTES:
        raise UsageError(f"the file name is longer than {MAX_NAME_BYTES} bytes: {path}")
    return resolved


def build_manifest(
    path: Path,
    identity: Identity,
    keywords: list[str],
    progress: Progress | None = None,
) -> Manifest:
    """Hash the file chunk by chunk (constant memory) into an unsigned manifest."""
    return build_stamped_manifest(path, identity, keywords, progress)[0]


def build_stamped_manifest(
    path: Path,
    identity: Identity,
    keywords: list[str],
    progress: Progress | None = None,
) -> tuple[Manifest, FileStamp]:
    """`build_manifest`, and the stamp of the file hashed (see `stamps`), taken from the
    descriptor read: the same before and after hashing, or the file changed meanwhile."""
    try:
        with path.open("rb") as handle:
            before = stamp_of(os.fstat(handle.fileno()))
            size = before.size
            chunk_size = choose_chunk_size(size)
            whole = crypto.new_sha256()
            chunk_hashes = bytearray()
            done = 0
            while chunk := handle.read(chunk_size):
                whole.update(chunk)
                chunk_hashes += crypto.sha256(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, size)
            after = stamp_of(os.fstat(handle.fileno()))
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    if done != size or after != before:
        raise StorageError(f"{path} changed while it was being hashed; try again")
    manifest = Manifest(
        version=MANIFEST_VERSION,
        share_id=crypto.random_bytes(16),
        name=path.name,
        size=size,
        chunk_size=chunk_size,
        chunk_hashes=bytes(chunk_hashes),
        sha256=whole.digest(),
        owner=identity.username,
        owner_fp=identity.fingerprint,
        keywords=keywords,
        created=int(time.time()),
    )
    return manifest, after
