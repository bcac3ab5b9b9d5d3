"""A file's identity as the holder last saw it: device, inode, size, mtime and ctime.

Recorded when a file is shared (after hashing it, from the very descriptor hashed) or
when a download is linked into place, and compared with `fstat` around every chunk read.
While the stamp is unchanged, the bytes are taken as the ones the manifest hashes, so the
holder skips the SHA-256 of each chunk; once it changes, the file is refused as "changed
since it was shared". Any write moves mtime and ctime (a chmod, a rename or a link moves
ctime too), and the receiver checks every chunk against the signed manifest anyway.
"""

from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass


@dataclass(frozen=True)
class FileStamp:
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def encode(self) -> str:
        return json.dumps(list(astuple(self)))


def stamp_of(info: os.stat_result) -> FileStamp:
    return FileStamp(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def decode_stamp(text: str | None) -> FileStamp | None:
    """A stamp from the share registry; None for none recorded (or one unreadable: the
    holder then hashes every chunk, as before stamps existed)."""
    if text is None:
        return None
    try:
        fields = json.loads(text)
        if not (isinstance(fields, list) and len(fields) == 5):
            return None
        if not all(isinstance(f, int) and not isinstance(f, bool) for f in fields):
            return None
        return FileStamp(*fields)
    except ValueError:
        return None
