"""What `sfs-peer` prints for shares, searches and downloads: tables through peer/tables.py,
`--json` documents and one-line summaries."""

from __future__ import annotations

import dataclasses
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rich.text import Text

from sfs.common.cli import print_json, printable, stdout
from sfs.common.identity import format_fingerprint
from sfs.common.protocol import SearchResult
from sfs.common.tree import kind_and_files
from sfs.peer import tables
from sfs.peer.leftovers import Cleaned, Leftover
from sfs.peer.node import AlreadyDownloaded
from sfs.peer.pins import Pin
from sfs.peer.registry import Share
from sfs.peer.tables import Column

if TYPE_CHECKING:
    from sfs.peer.download import DownloadResult


def size(count: int) -> str:
    return tables.size_text(count)  # binary units, as the progress bars show them


def when(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def print_table(
    columns: list[Column],
    rows: list[list[str]],
    *,
    wide: bool,
    empty: str,
    shortened: str | None = None,
) -> None:
    """Laid out for the terminal; piped, one tab-separated record per line (full ids)."""
    if not rows:
        # Piped, no records is no output: the note goes where a person reads it.
        print(empty, file=sys.stdout if stdout.is_terminal else sys.stderr)
        return
    if not stdout.is_terminal:
        for record in tables.piped(columns, rows):
            print(record)
        return
    lines, dropped = tables.laid_out(columns, rows, stdout.width, wide)
    for line in lines:
        stdout.print(line, soft_wrap=True)
    left_out = ([shortened] if shortened else []) + dropped
    if not wide and left_out:
        stdout.print(Text(f"(--wide shows {', '.join(left_out)})", style="dim"), soft_wrap=True)


def _ids(ids: list[str], wide: bool) -> dict[str, str]:
    """Short unique prefixes on a terminal; full ids with --wide and in pipes."""
    if wide or not stdout.is_terminal:
        return {i: i for i in ids}
    return tables.short_ids(ids)


def _shortened(ids: dict[str, str]) -> str | None:
    return "full ids" if any(full != shown for full, shown in ids.items()) else None


def pin_text(pin: Pin) -> str:
    return f"{format_fingerprint(pin.fingerprint)} ({pin.source}, {when(pin.pinned_at)})"


def warn(message: str) -> None:
    # Not the rich console: one line however wide, for scripts that read it.
    print(f"warning: {printable(message)}", file=sys.stderr)


def _kind(share: Share) -> tuple[str, int]:
    """Whether a share is a file or a folder, and its number of files."""
    return kind_and_files(share.manifest)


def _name_columns(any_folder: bool, files_keep: int) -> list[Column]:
    """A share's name, kind and number of files, as `list` and `search` show them: on a
    terminal a folder's name ends in `/` (as `ls -F` shows it) and a files column counts
    its files (only when a folder is listed); piped, the exact name, the kind and the
    count are fields of their own."""
    return [
        Column("name", wraps=True, least=28, in_pipe=False),
        Column("name", on_terminal=False),
        Column("kind", on_terminal=False),
        Column("files", right=True, keep=files_keep, on_terminal=any_folder, in_pipe=False),
        Column("files", on_terminal=False),
    ]


def _name_cells(name: str, kind: str, files: int) -> list[str]:
    folder = kind == "folder"
    shown = f"{name}/" if folder else name
    return [shown, name, kind, f"{files:,}" if folder else "", str(files)]


def share_json(share: Share, me: str) -> dict[str, object]:
    kind, files = _kind(share)
    return {
        "file_id": share.file_id,
        "name": share.name,
        "kind": kind,
        "files": files,
        "size": share.size,
        "path": str(share.path),
        "access": share.access,
        "keywords": share.keywords,
        "shared_at": share.shared_at,
        "owner": share.owner or me,  # another user's name: a seeded copy
    }


def print_shared(shared: Share) -> None:
    kind, files = _kind(shared)
    what = f"{size(shared.size)}" if kind == "file" else f"{files:,} files, {size(shared.size)}"
    stdout.print(f"shared {shared.name} ({what}) with {_audience(shared)}")
    stdout.print(f"file id: {shared.file_id}")


def _audience(share: Share) -> str:
    if share.access is None:
        return "everyone"
    return ", ".join(share.access) or "nobody else (only you: --to names other users)"


def print_shares(
    shares: list[Share], me: str, unfinished: list[Leftover], wide: bool, json: bool
) -> None:
    if json:
        print_json([share_json(s, me) for s in shares])
        return
    ids = _ids([s.file_id for s in shares], wide)
    kinds = {s.file_id: _kind(s) for s in shares}
    columns = [
        Column("file id"),
        *_name_columns(any(k == "folder" for k, _ in kinds.values()), files_keep=2),
        Column("size", right=True),
        Column("owner", keep=2),
        Column("shared with", keep=1, wraps=True),
        Column("keywords", keep=4, wraps=True),
        Column("path", keep=3, wraps=True, least=20),
    ]
    rows = [
        [
            ids[s.file_id],
            *_name_cells(s.name, *kinds[s.file_id]),
            size(s.size),
            s.owner or "me",
            ", ".join(s.access) if s.access is not None else "everyone",
            ", ".join(s.keywords),
            str(s.path),
        ]
        for s in shares
    ]
    print_table(columns, rows, wide=wide, empty="no shared files", shortened=_shortened(ids))
    if unfinished:
        count = len(unfinished)
        stdout.print(
            f"{count} unfinished download{'' if count == 1 else 's'}"
            f" ({size(sum(u.size for u in unfinished))}): `sfs-peer list --partial` shows"
            " them, `sfs-peer get FILE_ID` resumes one, `sfs-peer clean` removes abandoned ones",
            soft_wrap=False,
        )


def _age(seconds: float) -> str:
    for unit, length in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"


def print_unfinished(found: list[Leftover], wide: bool, json: bool) -> None:
    now = time.time()
    if json:
        print_json(
            [
                {
                    "file_id": u.file_id,
                    "path": str(u.path),
                    "bytes": u.size,
                    "modified": int(u.modified),
                    "in_use": u.in_use,
                }
                for u in found
            ]
        )
        return
    ids = _ids([u.file_id for u in found], wide)
    columns = [
        Column("file id"),
        Column("on disk", right=True),
        Column("last written"),
        Column("state", keep=1),
        Column("path", keep=2, wraps=True),
    ]
    rows = [
        [
            ids[u.file_id],
            size(u.size),
            _age(now - u.modified),
            "downloading" if u.in_use else "stopped",
            str(u.path),
        ]
        for u in found
    ]
    empty = "no unfinished downloads"
    print_table(columns, rows, wide=wide, empty=empty, shortened=_shortened(ids))


def print_cleaned(done: Cleaned, older_than: float, json: bool) -> None:
    if json:
        print_json(
            {
                "removed": [str(u.path) for u in done.removed],
                "bytes_freed": sum(u.size for u in done.removed),
                "kept_in_use": [str(u.path) for u in done.kept_in_use],
                "kept_recent": [str(u.path) for u in done.kept_recent],
            }
        )
        return
    for u in done.removed:
        print(f"removed {u.path} ({size(u.size)})")
    freed = size(sum(u.size for u in done.removed))
    stdout.print(f"removed {len(done.removed)} unfinished download(s), {freed} freed")
    if done.kept_in_use:
        stdout.print(f"kept {len(done.kept_in_use)} that a running `get` is writing")
    if done.kept_recent:
        stdout.print(
            f"kept {len(done.kept_recent)} written in the last {older_than:g} days"
            " (`--older-than 0` removes them too)"
        )


def print_found(found: SearchResult, wide: bool, json: bool) -> None:
    hits = found.hits
    if json:
        print_json({"hits": [hit.__dict__ for hit in hits], "partial": found.partial})
        return
    ids = _ids([hit.file_id for hit in hits], wide)
    columns = [
        Column("file id"),
        *_name_columns(any(hit.kind == "folder" for hit in hits), files_keep=2),
        Column("size", right=True),
        Column("owner", keep=1),
        Column("online", keep=1),
        Column("keywords", keep=3, wraps=True),
        Column("shared", keep=2),
    ]
    rows = [
        [
            ids[hit.file_id],
            *_name_cells(hit.name, hit.kind, hit.files),
            size(hit.size),
            hit.owner,
            "yes" if hit.online else "no",
            ", ".join(hit.keywords),
            when(hit.shared_at),
        ]
        for hit in hits
    ]
    print_table(columns, rows, wide=wide, empty="no matching files", shortened=_shortened(ids))
    if found.partial:  # after the records, where a person reads it (piped: stderr)
        print("more may match: add a word", file=sys.stdout if stdout.is_terminal else sys.stderr)


def print_download(result: DownloadResult | AlreadyDownloaded, json: bool) -> None:
    if isinstance(result, AlreadyDownloaded):
        _already_downloaded(result, json)
        return
    if json:
        print_json(
            {
                "file_id": result.file_id,
                "path": str(result.path),
                "size": result.size,
                "chunks": result.chunks,
                "files": result.files,
                "files_resumed": result.files_resumed,
                "seconds": round(result.seconds, 3),
                "bytes": result.bytes_fetched,
                "holders": result.holders,
                "paths": result.paths,
                "chunks_resumed": result.chunks_resumed,
                "seeding": result.seeding,
                "already_downloaded": False,
            }
        )
        return
    rate = result.bytes_fetched / result.seconds if result.seconds > 0 else 0.0
    sources = f"from {', '.join(result.holders)}" if result.holders else "all resumed"
    resumed = f", {result.chunks_resumed} chunks resumed" if result.chunks_resumed else ""
    stdout.print(
        f"saved {result.path} ({size(result.size)} {sources}, {size(int(rate))}/s{resumed})"
    )
    stdout.print(f"verified: {result.chunks} chunks, each against the owner-signed tree")
    if result.seeding:
        stdout.print("seeding: `sfs-peer serve` serves this copy too (`unshare` stops it)")


def _already_downloaded(present: AlreadyDownloaded, json: bool) -> None:
    if json:
        document = {**dataclasses.asdict(present), "path": str(present.path)}
        print_json({**document, "already_downloaded": True})
        return
    stdout.print(f"already downloaded: {present.path}")
    stdout.print(
        f"verified: {present.chunks} chunks match the owner-signed tree"
        " (--force downloads a second copy)"
    )
