"""Wall time and peak memory of processes, from GNU time and /proc (Linux only)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL = 0.05
GNU_TIME = Path("/usr/bin/time")


def vm_hwm_kib(pid: int) -> int | None:
    """Peak RSS so far ("high water mark"), or None if the process is gone or a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<pid>/task/<tid>/children (a kernel option,
    CONFIG_PROC_CHILDREN, that common distributions enable; without it: none)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children(child)
    return found


class TreeWatcher:
    """Samples the peak RSS of every process under `root` in a background thread.

    Best effort: VmHWM only grows, so the last sample of a process is its peak unless it
    grew in the last moments between that sample and its exit.
    """

    def __init__(self, root: int, *, include_root: bool) -> None:
        self.root, self.include_root = root, include_root
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def total_kib(self) -> int:
        """The sum of the peaks: these processes run side by side."""
        return sum(self.peaks.values())

    def sample(self) -> None:
        pids = descendants(self.root) + ([self.root] if self.include_root else [])
        for pid in pids:
            peak = vm_hwm_kib(pid)
            if peak is not None:
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0))

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SAMPLE_INTERVAL):
                return


@dataclass(frozen=True)
class Timed:
    seconds: float
    returncode: int
    peak_kib: int  # the largest process of the command (exact with GNU time, else sampled)
    total_kib: int  # the peaks of the command and its children, summed (sampled)
    stdout: str
    stderr: str

    def last_error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {self.returncode}"


def run_timed(argv: list[str], logs: Path, timeout: float | None = None) -> Timed:
    """Run `argv` to the end, stdout and stderr to `logs`.out/.err; wall time from spawn to
    exit. Under GNU time when there is one: its %M is the kernel's exact peak RSS of the
    command (and of its reaped children). Not wait4 in this process: a child inherits the
    RSS high-water mark of the process that forked it, and Python is bigger than `time`.
    After `timeout` seconds, the command and its children are killed and
    subprocess.TimeoutExpired is raised."""
    wrapped = GNU_TIME.exists()
    rss_path = logs.with_suffix(".rss")
    if wrapped:
        argv = [str(GNU_TIME), "-f", "%M", "-o", str(rss_path), *argv]
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        popen = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        with TreeWatcher(popen.pid, include_root=not wrapped) as tree:
            _wait(popen, timeout)
        seconds = time.perf_counter() - started
    sampled = max(tree.peaks.values(), default=0)
    peak = (_time_rss(rss_path) if wrapped else None) or sampled
    return Timed(
        seconds,
        popen.returncode,
        peak,
        max(peak, tree.total_kib()),
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )


def _wait(popen: subprocess.Popen[bytes], timeout: float | None = None) -> None:
    try:
        popen.wait(timeout)
    except BaseException:  # e.g. Ctrl-C or the timeout: leave no process behind
        kill_tree(popen)
        raise


def kill_tree(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and what it started (children first, found before any dies)."""
    for pid in reversed(descendants(popen.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    popen.kill()
    popen.wait()


def _time_rss(path: Path) -> int | None:
    """The last line GNU time wrote (after "Command exited with non-zero status N")."""
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
