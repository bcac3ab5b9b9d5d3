"""The progress bar's columns: text shown literally, sizes and rates in binary units (as
every summary prints them), and a word when no data has come for a while."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from sfs.peer.tables import size_text

STALLED_AFTER = 2.0  # seconds without a byte before the bar says it is waiting
Clock = Callable[[], float]


class StatusColumn(ProgressColumn):
    """The task's description, literally (names may come from other people); after
    `STALLED_AFTER` seconds without progress, what is being waited for and how long."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self._clock = clock

    def render(self, task: Task) -> Text:
        since = task.fields.get("changed")
        waiting = task.fields.get("waiting")
        if isinstance(since, float) and isinstance(waiting, str) and not task.finished:
            idle = self._clock() - since
            if idle >= STALLED_AFTER:
                return Text(f"{waiting} ({idle:.0f} s without data)", style="yellow")
        return Text(str(task.description))


class SizeColumn(ProgressColumn):
    """`1.5 MiB / 8.0 MiB`; before the size is known, nothing rather than `0/?`."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{size_text(int(task.completed))} / {size_text(int(task.total))}")


class FilesColumn(ProgressColumn):
    """`120 / 20,000 files` whole so far, for a folder; nothing for a single file."""

    def render(self, task: Task) -> Text:
        files = task.fields.get("files")
        if not isinstance(files, tuple) or files[1] <= 1:
            return Text("")
        return Text(f"{files[0]:,} / {files[1]:,} files")


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{size_text(int(speed))}/s")


def new_progress(console: Console, clock: Clock = time.monotonic) -> Progress:
    return Progress(
        StatusColumn(clock),
        BarColumn(),
        SizeColumn(),
        FilesColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


class Bar:
    """One task of a `Progress`: call it with (done, total) bytes, and of a folder
    (files whole, files wanted); `describe` relabels it, and `waiting_for` says what the
    bar waits for when no bytes come."""

    def __init__(self, progress: Progress, label: str, clock: Clock = time.monotonic) -> None:
        self._progress = progress
        self._clock = clock
        self._done = -1
        self._task = progress.add_task(label, total=None, changed=clock(), waiting=None)

    def __call__(self, done: int, total: int, files: tuple[int, int] | None = None) -> None:
        if done != self._done:
            self._done = done
            self._progress.update(self._task, changed=self._clock())
        self._progress.update(self._task, completed=done, total=total, files=files)

    def describe(self, label: str) -> None:
        self._progress.update(self._task, description=label)

    def waiting_for(self, what: str) -> None:
        self._progress.update(self._task, waiting=what)


def holders_text(holders: list[str], shown: int = 3) -> str:
    """`alice`, `alice, bob`, or `alice, bob, carol and 2 more`."""
    names = ", ".join(holders[:shown])
    more = len(holders) - shown
    return f"{names} and {more} more" if more > 0 else names
