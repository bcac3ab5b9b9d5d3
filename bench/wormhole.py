"""magic-wormhole as a benchmark anchor: its own venv, its own mailbox and transit relay,
all in a private network namespace.

    with WormholeNet(folder) as net:           # installs the packages on first use
        done = net.transfer(source, target)    # a file or a folder, direct
        done = net.transfer(source, target, relayed=True)   # through the transit relay

The packages (pinned below) are installed from PyPI into a venv of the bench's own,
`.venv/bench/wormhole`, once; a failed install is a `NotRun` with the reason. The
namespace is made with `unshare -n` and held by a process that lives as long as our pipe
to it; its loopback is brought up, and everything else (the mailbox on 127.0.0.1:4000,
the transit relay on 127.0.0.1:4001, each sender and receiver) joins it with `nsenter`.
With loopback as its only interface, wormhole's direct hints are 127.0.0.1, so a direct
transfer is a direct loopback connection; `transfer` checks the path the receiver reports
(`Receiving (->tcp:...)` direct, `Receiving (->relay:...)` relayed) and fails otherwise.
Relayed runs pass `--no-listen` to both sides, so neither offers a direct hint.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, progress
from bench.procs import GNU_TIME, TreeWatcher, kill_tree, run_timed

PACKAGES = (
    "magic-wormhole==0.24.0",
    "magic-wormhole-mailbox-server==0.8.0",
    "magic-wormhole-transit-relay==0.5.0",
)
VENV = Path(__file__).resolve().parent.parent / ".venv" / "bench" / "wormhole"
MAILBOX_PORT, RELAY_PORT = 4000, 4001  # free by construction: the namespace is new
START_TIMEOUT = 30.0
SENDER_READY_TIMEOUT = 30.0
TRANSFER_TIMEOUT = 3600.0
SENDER_EXIT_TIMEOUT = 60.0  # after the receiver is done
PATH_LINE = re.compile(r"Receiving \((\S+)\)\.\.")


class NotRun(Exception):
    """An anchor that cannot run on this machine; the message says why, in one line."""


@dataclass(frozen=True)
class WormholeRun:
    seconds: float  # the receive command, spawn to exit (durability is the caller's)
    total_seconds: float  # from the sender's spawn (a folder is zipped before it connects)
    path: str  # as the receiver reports it, e.g. `->tcp:127.0.0.1:41233`
    sender_kib: int
    receiver_kib: int


def version() -> str:
    return ", ".join(PACKAGES)


def ensure_venv() -> Path:
    """The venv's bin folder, with the pinned packages in it; installs them the first time
    (about 15 s with a warm pip cache)."""
    stamp = VENV / ".installed"
    wanted = "\n".join(PACKAGES) + "\n"
    if stamp.exists() and stamp.read_text() == wanted and (VENV / "bin" / "wormhole").exists():
        return VENV / "bin"
    progress(f"installing {', '.join(PACKAGES)} into {VENV} (once)")
    VENV.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(VENV)], capture_output=True, text=True
    )
    if made.returncode != 0:
        raise NotRun(f"python -m venv failed: {last_line(made.stderr)}")
    pip = [
        str(VENV / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    done = subprocess.run([*pip, *PACKAGES], capture_output=True, text=True)
    if done.returncode != 0:
        raise NotRun(f"pip install of magic-wormhole failed: {last_line(done.stderr)}")
    stamp.write_text(wanted)
    return VENV / "bin"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.startswith("WARNING")]
    return lines[-1] if lines else "no output"


def namespace_commands() -> tuple[list[str], list[str]]:
    """`unshare` to make the namespace, and the `nsenter` prefix (without the target PID)
    to join it. As root, a network namespace alone; otherwise inside a user namespace of
    our own, which unprivileged users may create where the kernel allows it."""
    for name in ("unshare", "nsenter", "ip"):
        if shutil.which(name) is None:
            raise NotRun(f"{name} is not installed (util-linux, iproute2)")
    if os.geteuid() == 0:
        return ["unshare", "--net"], ["nsenter", "--net"]
    return ["unshare", "--user", "--map-root-user", "--net"], [
        "nsenter",
        "--user",
        "--net",
        "--preserve-credentials",
    ]


class WormholeNet:
    """A private network namespace holding a mailbox server and a transit relay; started on
    `__enter__` (raises NotRun if it cannot be), everything stopped on `__exit__`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.holder: subprocess.Popen[bytes] | None = None
        self.servers: list[subprocess.Popen[bytes]] = []
        self.bin = Path()
        self.enter: list[str] = []

    def __enter__(self) -> WormholeNet:
        self.bin = ensure_venv()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        unshare, nsenter = namespace_commands()
        # The holder ends when its stdin closes: with us, however we end.
        script = "ip link set lo up && echo up && exec cat >/dev/null"
        self.holder = subprocess.Popen(
            [*unshare, "--", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"up":
            self.holder.wait(5)
            assert self.holder.stderr is not None
            error = last_line(self.holder.stderr.read().decode(errors="replace"))
            raise NotRun(f"no private network namespace (`unshare -n`): {error}")
        self.enter = [*nsenter, f"--target={self.holder.pid}", "--"]
        twist = str(self.bin / "twist")
        db = f"--channel-db={self.folder / 'mailbox.sqlite'}"
        self.serve("mailbox", [twist, "wormhole-mailbox", self.endpoint(MAILBOX_PORT), db])
        self.serve("relay", [twist, "transitrelay", self.endpoint(RELAY_PORT)])
        self.wait_until_listening(MAILBOX_PORT, RELAY_PORT)

    @staticmethod
    def endpoint(port: int) -> str:
        return f"--port=tcp:{port}:interface=127.0.0.1"

    def serve(self, name: str, argv: list[str]) -> None:
        with (self.folder / f"{name}.log").open("wb") as log:
            self.servers.append(
                subprocess.Popen(
                    [*self.enter, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            )

    def wait_until_listening(self, *ports: int) -> None:
        """Read the namespace's own socket table (/proc/<pid>/net/tcp of a process in it):
        no connection from outside is possible, and none is needed."""
        wanted = {f"0100007F:{port:04X}" for port in ports}
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for server in self.servers:
                if server.poll() is not None:
                    raise NotRun(f"a wormhole server exited at start: see {self.folder}/*.log")
            listening = {local for local, _, state in self.sockets() if state == "0A"}
            if wanted <= listening:
                return
            time.sleep(0.1)
        raise NotRun(f"the mailbox and relay did not listen within {START_TIMEOUT:.0f} s")

    def stop(self) -> None:
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        self.servers = []
        if self.holder is not None:
            assert self.holder.stdin is not None
            self.holder.stdin.close()
            try:
                self.holder.wait(5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
            self.holder = None

    def wormhole(self, *args: str, relayed: bool) -> list[str]:
        argv = [*self.enter, str(self.bin / "wormhole")]
        argv += ["--relay-url", f"ws://127.0.0.1:{MAILBOX_PORT}/v1"]
        argv += ["--transit-helper", f"tcp:127.0.0.1:{RELAY_PORT}"]
        command, *rest = args
        flags = ["--hide-progress"] + (["--no-listen"] if relayed else [])
        return [*argv, command, *flags, *rest]

    def transfer(self, source: Path, target: Path, *, relayed: bool = False) -> WormholeRun:
        """`wormhole send source` and `wormhole receive -o target`, direct or through the
        relay. The receiver starts once the sender is connected to the mailbox, and is
        timed from spawn to exit."""
        code = f"{secrets.randbelow(900) + 100}-bench-{secrets.token_hex(4)}"
        logs = self.folder / ("relayed" if relayed else "direct")
        send = self.wormhole("send", "--no-qr", "--code", code, str(source), relayed=relayed)
        if GNU_TIME.exists():
            send = [str(GNU_TIME), "-f", "%M", "-o", str(logs.with_suffix(".send.rss")), *send]
        err_path = logs.with_suffix(".send.err")
        started = time.perf_counter()
        with err_path.open("wb") as err:
            sender = subprocess.Popen(
                send, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        try:
            with TreeWatcher(sender.pid, include_root=False) as sampled:
                self.wait_for_sender(sender, err_path)
                receive = self.wormhole(
                    "receive", "--accept-file", "-o", str(target), code, relayed=relayed
                )
                timed = run_timed(receive, logs.with_suffix(".receive"), TRANSFER_TIMEOUT)
                total = time.perf_counter() - started
                if timed.returncode != 0:
                    raise BenchError(f"wormhole receive failed: {timed.last_error_line()}")
                sender.wait(SENDER_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            kill_tree(sender)
            raise BenchError(f"wormhole did not finish in {exc.timeout:.0f} s") from None
        except BaseException:
            kill_tree(sender)
            raise
        if sender.returncode != 0:
            raise BenchError(f"wormhole send failed: {last_line(err_path.read_text())}")
        found = PATH_LINE.search(timed.stderr)
        path = found.group(1) if found else "?"
        if path.startswith("->relay:") != relayed or found is None:
            wanted = "relayed" if relayed else "direct"
            raise BenchError(f"wormhole was to go {wanted}, but the receiver reports {path}")
        sender_kib = read_rss(logs.with_suffix(".send.rss")) or max(
            sampled.peaks.values(), default=0
        )
        return WormholeRun(timed.seconds, total, path, sender_kib, timed.peak_kib)

    def wait_for_sender(self, sender: subprocess.Popen[bytes], err_path: Path) -> None:
        """Until the sender has printed its code and holds a connection to the mailbox (the
        only client it has between rounds), so the receiver does not wait for it."""
        deadline = time.monotonic() + SENDER_READY_TIMEOUT
        while time.monotonic() < deadline:
            text = err_path.read_text(errors="replace")
            if "Wormhole code is:" in text and self.mailbox_clients() > 0:
                return
            if sender.poll() is not None:
                raise BenchError(f"wormhole send exited: {last_line(text)}")
            time.sleep(0.02)
        raise BenchError(f"wormhole send did not reach the mailbox in {SENDER_READY_TIMEOUT:.0f} s")

    def sockets(self) -> list[tuple[str, str, str]]:
        """(local, remote, state) of the namespace's TCP sockets, hex as the kernel has them."""
        assert self.holder is not None
        lines = Path(f"/proc/{self.holder.pid}/net/tcp").read_text().splitlines()[1:]
        return [(f[1], f[2], f[3]) for f in (line.split() for line in lines)]

    def mailbox_clients(self) -> int:
        mailbox = f"0100007F:{MAILBOX_PORT:04X}"
        return sum(1 for local, _, state in self.sockets() if local == mailbox and state == "01")


def read_rss(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
