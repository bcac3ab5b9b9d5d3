"""A real terminal for tests of what a person sees: tmux, on a server of its own (its own
socket, killed at `close`), read back with `capture-pane -J`, so a line the terminal
wrapped comes back joined, longer than the terminal is wide.

Two ways to use it: `Terminal`, one bash typed into (prompts, Ctrl-D, commands one after
another), and `Screens`, a fresh terminal per command whose screen is returned.

tmux is not a Python package: `require_tmux()` skips a test module without it, and says
why, unless SFS_REQUIRE_TMUX=1 (set by .ci/run, which installs tmux) makes that a failure.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.harness import command_for

COLUMNS, ROWS = 80, 50
WAIT = 60.0  # seconds for a screen to show what a step waits for (generous: a busy CI)


def require_tmux() -> None:
    """At the top of a test module: skip it without tmux (fail with SFS_REQUIRE_TMUX=1)."""
    if shutil.which("tmux") is not None:
        return
    if os.environ.get("SFS_REQUIRE_TMUX") == "1":
        pytest.fail("tmux is required (SFS_REQUIRE_TMUX=1) but not installed", pytrace=False)
    pytest.skip(
        "tmux is not installed (apt-get install tmux; .ci/run does)", allow_module_level=True
    )


def bin_dir() -> str:
    """The folder of the sfs commands under test, for a terminal's PATH."""
    return str(Path(command_for("sfs-peer")[0]).parent)


class TmuxServer:
    """A tmux server of our own: its own socket, so tests never touch anyone's tmux."""

    def __init__(self) -> None:
        self.socket = f"sfs-test-{uuid.uuid4().hex[:12]}"

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        if done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


class Terminal:
    """A bash in a tmux window of 80x50, typed into as a person would."""

    def __init__(self, cwd: Path) -> None:
        self._tmux = TmuxServer()
        env = {
            "PATH": f"{bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(cwd),
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
        }
        self._tmux(
            "new-session", "-d", "-x", str(COLUMNS), "-y", str(ROWS), "-c", str(cwd),
            "bash --norc --noprofile", env=env,
        )  # fmt: skip
        self._tmux("set-option", "-g", "history-limit", "5000")
        self.run("PS1='$ '; export COLUMNS LINES; unset SFS_CONFIG SFS_PASSPHRASE")

    def close(self) -> None:
        self._tmux.close()

    def screen(self) -> str:
        """What the window shows (and its scrollback), wrapped lines joined back."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-")

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-l", text)

    def key(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def wait_for(self, pattern: str, count: int = 1) -> str:
        """Until the screen shows `pattern` (`count` times: a prompt asked again)."""
        deadline = time.monotonic() + WAIT
        while True:
            shown = self.screen()
            if len(re.findall(pattern, shown)) >= count:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"the terminal never showed {pattern!r}:\n{shown}")
            time.sleep(0.1)

    def start(self, command: str) -> str:
        """Type `command` and Enter; the marker its exit line will carry."""
        marker = uuid.uuid4().hex[:8]
        self._tmux("send-keys", "-l", f'{command}; echo "[{marker} rc=$?]"')
        self.key("Enter")
        return marker

    def finish(self, marker: str) -> tuple[str, int]:
        """Wait for the command started with `marker`; what it showed, and its exit code."""
        shown = self.wait_for(rf"\[{marker} rc=\d+\]")
        match = re.search(rf"\[{marker} rc=(\d+)\]", shown)
        assert match is not None
        output = shown.split(f'echo "[{marker} rc=$?]"', 1)[-1]
        return output[: output.index(f"[{marker} rc=")], int(match.group(1))

    def run(self, command: str) -> tuple[str, int]:
        return self.finish(self.start(command))


class Screens:
    """A fresh terminal 80 columns wide (and 100 rows) for each command, its screen read
    back once the command is done."""

    DONE = "__sfs_terminal_done__"

    def __init__(self, root: Path) -> None:
        self._tmux = TmuxServer()
        self.root = root
        self.count = 0
        # tmux exits with its last session: a session that only waits keeps the server up,
        # or the next screen's new-session can meet a server that is shutting down.
        self._tmux("new-session", "-d", "-s", "keep", "sleep 3600")

    def run(self, command: str) -> list[str]:
        """Run a shell command that must succeed; the screen's lines, with lines the
        terminal wrapped joined back (and the end marker left out)."""
        self.count += 1
        script = self.root / f"terminal-{self.count}.sh"
        script.write_text(
            f"unset COLUMNS LINES\nexport PATH={shlex.quote(bin_dir())}:$PATH\n"
            f"{command}\nprintf '\\n{self.DONE} %d\\n' $?\nexec sleep 600\n"
        )
        name = f"t{self.count}"
        self._tmux(
            "new-session", "-d", "-x", str(COLUMNS), "-y", "100", "-s", name, "sh", str(script)
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                screen = self._tmux("capture-pane", "-p", "-J", "-t", name).splitlines()
                ends = [line for line in screen if line.startswith(self.DONE)]
                if ends:
                    assert ends[0] == f"{self.DONE} 0", "\n".join(screen)
                    return [line.rstrip() for line in screen[: screen.index(ends[0])] if line]
                time.sleep(0.1)
            raise AssertionError(f"{command} did not finish in a terminal")
        finally:
            self._tmux("kill-session", "-t", name)

    def close(self) -> None:
        self._tmux.close()
