"""A throwaway sshd on 127.0.0.1 for the scp side of the comparison.

Host and user keys are generated in a folder of their own; sshd runs in the foreground
from a generated config and is stopped by its PID, with whatever it forked, on exit.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BenchError
from bench.procs import descendants
from tests.harness import free_port

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start as root without it
START_TIMEOUT = 10.0
CIPHER_LINE = re.compile(r"kex: client->server cipher: (\S+)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed")
    return path


def openssh_version() -> str:
    """`ssh -V`, e.g. `OpenSSH_9.2p1 Debian-2+deb12u6, OpenSSL 3.0.19 27 Jan 2026`."""
    if shutil.which("ssh") is None:
        return "not installed"
    done = subprocess.run([tool("ssh"), "-V"], capture_output=True, text=True, check=False)
    return done.stderr.strip() or done.stdout.strip()


def ensure_sshd() -> Path:
    """/usr/sbin/sshd, installing openssh-server quietly with apt-get if it is missing."""
    if SSHD.exists():
        return SSHD
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(f"{SSHD} is missing: install openssh-server (needs root and apt-get)")
    print("installing openssh-server for the scp comparison", file=sys.stderr)
    apt_get("install", "-y", "-qq", "openssh-server")
    if not SSHD.exists():  # stale package lists, maybe
        apt_get("update", "-qq")
        apt_get("install", "-y", "-qq", "openssh-server")
    if not SSHD.exists():
        raise BenchError(f"{SSHD} is missing and `apt-get install openssh-server` failed")
    return SSHD


def apt_get(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([tool("apt-get"), *args], env=env, capture_output=True, check=False)


def keygen(path: Path) -> None:
    argv = [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "sfs-bench"]
    subprocess.run([*argv, "-f", str(path)], check=True, capture_output=True)


class Sshd:
    """`with Sshd(folder) as sshd:` an sshd on a free loopback port that lets this user in
    with a generated key; `sshd.scp_argv(...)` copies a file to it."""

    def __init__(self, folder: Path, cipher: str | None = None) -> None:
        self.folder = folder
        self.cipher = cipher  # None: OpenSSH's default choice
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.port = free_port()
        self.key = folder / "user_key"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sshd:
        binary = ensure_sshd()
        self.folder.mkdir(parents=True, exist_ok=True)
        keygen(self.folder / "host_key")
        keygen(self.key)
        shutil.copy(self.key.with_suffix(".pub"), self.folder / "authorized_keys")
        config = self.write_config()
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        log = (self.folder / "sshd.log").open("wb")
        with log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [str(binary), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            self.wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def write_config(self) -> Path:
        folder = self.folder
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {folder / 'host_key'}",
            f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            f"PidFile {folder / 'sshd.pid'}",
            "StrictModes no",  # the temporary folder's modes are not sshd's business here
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # scp speaks SFTP by default since OpenSSH 9.0; in-process, no helper binary.
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
        ]
        config = folder / "sshd_config"
        config.write_text("\n".join(lines) + "\n")
        return config

    def wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BenchError(f"sshd exited at start: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"sshd did not listen on 127.0.0.1:{self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        lines = (self.folder / "sshd.log").read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        """Stop sshd by its PID, then any session it forked (they call setsid, so they are
        not in our process group; normally they have ended with their connection)."""
        if self.process is None:
            return
        sessions = descendants(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        self.process = None

    def ssh_options(self, cipher: str | None = None) -> list[str]:
        """No user or system ssh_config, no known_hosts, no agent keys: this key only.
        `cipher`, else the one given to the constructor, else OpenSSH's default."""
        cipher = cipher or self.cipher
        options = ["-F", "none", "-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        for option in ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"):
            options += ["-o", option]
        options += ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        return options + (["-c", cipher] if cipher else [])

    def scp_argv(
        self, source: Path, target: Path, cipher: str | None = None, *, recursive: bool = False
    ) -> list[str]:
        destination = f"{self.user}@127.0.0.1:{target}"
        return [
            tool("scp"),
            "-q",
            *(["-r"] if recursive else []),
            *self.ssh_options(cipher),
            "-P",
            str(self.port),
            str(source),
            destination,
        ]

    def ssh_argv(self, command: str, cipher: str | None = None) -> list[str]:
        """`ssh` to this sshd running `command` (a shell line) there."""
        options = [*self.ssh_options(cipher), "-p", str(self.port)]
        return [tool("ssh"), *options, f"{self.user}@127.0.0.1", command]

    def negotiated_cipher(self, cipher: str | None = None) -> str:
        """The cipher the client and this sshd agree on, from `ssh -v`."""
        argv = [tool("ssh"), "-v", *self.ssh_options(cipher), "-p", str(self.port)]
        argv += [f"{self.user}@127.0.0.1", "true"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        found = CIPHER_LINE.search(done.stderr)
        if done.returncode != 0 or found is None:
            lines = done.stderr.strip().splitlines()
            raise BenchError(f"ssh to the throwaway sshd failed: {lines[-1] if lines else '?'}")
        return found.group(1)
