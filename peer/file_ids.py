"""File ids as a user types them: the whole id (32 hex characters), or a prefix of at
least 8 of them that names one file among those the user can see (git's rule for
commits). Finding the candidates is the caller's business (the local share registry,
the broker's `resolve`); this module parses and picks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sfs.common import protocol
from sfs.common.errors import SfsError, UsageError
from sfs.peer.tables import short_ids


@dataclass(frozen=True)
class Typed:
    """What the user typed, lowercased: a whole id, or a prefix to look up."""

    text: str

    @property
    def whole(self) -> bool:
        return len(self.text) == 32


@dataclass(frozen=True)
class Candidate:
    file_id: str
    name: str
    owner: str


def parse(text: str) -> Typed:
    """A whole id or a prefix long enough to look up; anything else is a `UsageError`."""
    typed = text.strip().lower()
    if re.fullmatch(protocol.FILE_ID_PREFIX_PATTERN, typed):
        return Typed(typed)
    if re.fullmatch(r"[0-9a-f]{1,7}", typed):
        raise UsageError(
            f"file id {typed} is too short: ids are 32 hex characters;"
            f" give at least {protocol.MIN_ID_PREFIX} of them"
        )
    raise UsageError(
        f"not a file id: {text!r} (32 hex characters, or the first"
        f" {protocol.MIN_ID_PREFIX} or more of them)"
    )


def pick(prefix: str, candidates: Sequence[Candidate], more: bool = False) -> str:
    """The one candidate whose id starts with `prefix`. None is refused as a whole id
    nobody shares with you is (exit 1); several as bad input (exit 2), each one listed.
    `more`: the list was cut at its limit."""
    found = sorted({c.file_id: c for c in candidates if c.file_id.startswith(prefix)}.items())
    if len(found) == 1:
        return found[0][0]
    if not found:
        raise SfsError(f"no file id starting with {prefix} is shared with you")
    short = short_ids([file_id for file_id, _ in found])
    listed = ", ".join(f"{short[file_id]} {c.name} ({c.owner})" for file_id, c in found)
    count = f"{len(found)} or more" if more else str(len(found))
    raise UsageError(
        f"file id {prefix} is ambiguous: {count} files start with it; give more of the id: {listed}"
    )
