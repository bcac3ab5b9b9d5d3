"""The progress bars of `sfs-peer` commands, on stderr through peer/bars.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sfs.common.cli import stderr

if TYPE_CHECKING:
    from sfs.peer.bars import Bar
    from sfs.peer.download import DownloadProgress


@contextlib.contextmanager
def progress(label: str, enabled: bool) -> Iterator[Bar | None]:
    """A rich progress bar on stderr (only on a terminal, and not with --json)."""
    if not enabled or not stderr.is_terminal:
        yield None
        return
    from sfs.peer.bars import Bar, new_progress  # rich's progress: only for a terminal

    with new_progress(stderr) as bars:
        yield Bar(bars, label)


@contextlib.contextmanager
def download_progress(enabled: bool) -> Iterator[DownloadProgress | None]:
    """The download's bar: bytes, files whole (of a folder), rate, time left, how many
    holders are sending, and who is waited for when nothing comes."""
    with progress("connecting to the holders", enabled) as bar:
        if bar is None:
            yield None
            return
        from sfs.peer.bars import holders_text

        bar.waiting_for("no holder answers yet")
        shown: list[str] | None = None

        def update(done: int, total: int, holders: list[str], files: tuple[int, int]) -> None:
            nonlocal shown
            if holders != shown:
                shown = holders
                sending = holders_text(holders)
                bar.describe(f"from {sending}" if holders else "connecting to the holders")
                bar.waiting_for(f"waiting for {sending}" if holders else "no holder answers yet")
            bar(done, total, files)

        yield update
