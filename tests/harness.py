"""A scripted multi-peer harness: real `sfs-broker` and `sfs-peer` processes, started from
generated configs in a temporary folder on free loopback ports, always torn down.

    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        result = alice.run("share", "/some/file", "--json")

Used by the harness tests and by `make demo`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sfs.common.config import load_broker_config
from sfs.common.errors import SfsError
from sfs.peer.client import BrokerClient

START_TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on the loopback of `host`'s family (IPv6 if it has a colon). For an
    address inside a fresh network namespace any port is free: this just picks one."""
    family, loopback = (socket.AF_INET6, "::1") if ":" in host else (socket.AF_INET, "127.0.0.1")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((loopback, 0))
        return int(sock.getsockname()[1])


def tcp_endpoint(host: str, port: int) -> str:
    """`tcp://HOST:PORT`, with an IPv6 address in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """`argv` run inside network namespace `netns` (None: this one). `ip netns exec`
    execs the command in place, so signals sent to the process reach it."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def command_for(tool: str) -> list[str]:
    """The installed console script next to this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / tool
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", tool.replace("sfs-", "sfs.")]


@dataclass(frozen=True)
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def check(self) -> Result:
        if self.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.args)} exited {self.returncode}\n{self.stdout}\n{self.stderr}"
            )
        return self


def one_line_error(result: Result) -> str:
    """The command failed with exactly one line on stderr and no traceback; that line."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> the SHA-256 of its contents."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def wait_for_partial(folder: Path, at_least: int) -> None:
    """Until a download's `.part` file (a file share) or staging tree (a folder share) in
    `folder` holds `at_least` bytes (or 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in folder.glob(".sfs-*.part"):
            with contextlib.suppress(FileNotFoundError):  # finished meanwhile
                if path.stat().st_size >= at_least:
                    return
        for path in folder.glob(".sfs-*.tree"):
            if _bytes_under(path) >= at_least:
                return
        time.sleep(0.01)
    raise AssertionError(f"no download in progress in {folder}")


def _bytes_under(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile
            total += path.lstat().st_size
    return total


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[str]
    log: Path
    log_handle: IO[str]
    lines: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log_handle.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Peer:
    """One user: a config file, and the CLI run against it."""

    def __init__(
        self, cluster: Cluster, name: str, config: Path, password: str, netns: str | None = None
    ) -> None:
        self.cluster, self.name, self.config, self.password = cluster, name, config, password
        self.netns = netns  # the network namespace its commands run in; None: this one
        self.server: Process | None = None

    @property
    def data_dir(self) -> Path:
        return self.cluster.root / self.name

    @property
    def download_dir(self) -> Path:
        return self.cluster.root / self.name / "downloads"

    def run(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> Result:
        return self.cluster.run(
            "sfs-peer",
            *args,
            "--config",
            str(self.config),
            input=input,
            timeout=timeout,
            env=env,
            netns=self.netns,
        )

    def share(self, path: Path, *extra: str) -> str:
        """`sfs-peer share PATH [extra...]`; the new file id."""
        return str(self.run("share", str(path), *extra, "--json").check().json()["file_id"])

    def serve(self, env: dict[str, str] | None = None) -> Process:
        self.server = self.cluster.start(
            f"{self.name}-serve",
            [
                *command_for("sfs-peer"),
                "serve",
                "--config",
                str(self.config),
                *self.cluster.debug_flag,
            ],
            ready="serving on",
            env=env,
            netns=self.netns,
        )
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class Cluster:
    def __init__(
        self,
        root: Path | None = None,
        *,
        transport_encryption: bool = True,
        keep: bool = False,
        columns: int = 200,
        debug: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        """`columns`: the terminal width the CLI's tables are laid out for; `debug`: run
        the servers with --debug (everything they log, logged); `host`: the address the
        broker and the peers listen on (`::1` for IPv6), unless a peer is given its own."""
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="sfs-harness-"))
        self.transport_encryption = transport_encryption
        self.keep = keep
        self.columns = columns
        self.debug = debug
        self.results: list[Result] = []  # every command run, for tests that read it all
        self.processes: list[Process] = []
        self.peers: dict[str, Peer] = {}
        self.broker_config = self.root / "broker.yaml"
        self.broker: Process | None = None
        self.broker_netns: str | None = None
        self.host = host
        self.broker_endpoint = tcp_endpoint(host, free_port(host))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def debug_flag(self) -> list[str]:
        return ["--debug"] if self.debug else []

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self._own_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- processes -----------------------------------------------------------------------

    def run(
        self,
        tool: str,
        *args: str,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> Result:
        """Run a CLI command to the end; `env`: extra environment variables; `netns`: the
        network namespace to run it in."""
        argv = in_netns(netns, [*command_for(tool), *args])
        done = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env={**os.environ, "COLUMNS": str(self.columns), **(env or {})},
            check=False,
        )
        result = Result(argv, done.returncode, done.stdout, done.stderr)
        self.results.append(result)
        return result

    def start(
        self,
        name: str,
        argv: list[str],
        ready: str | None = None,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> Process:
        """Start a long-running process; wait until it prints `ready` on stdout."""
        log = self.root / f"{name}.log"
        handle = log.open("w")
        popen = subprocess.Popen(
            in_netns(netns, argv),
            stdout=subprocess.PIPE,
            stderr=handle,
            text=True,
            cwd=self.root,
            env={**os.environ, **(env or {})},
        )
        process = Process(name, popen, log, handle)
        self.processes.append(process)
        seen = threading.Event()

        def pump() -> None:  # keep reading stdout so the process never blocks on it
            assert popen.stdout is not None
            with popen.stdout:
                for line in popen.stdout:
                    process.lines.append(line)
                    if ready is not None and ready in line:
                        seen.set()

        threading.Thread(target=pump, daemon=True).start()
        if ready is not None and not seen.wait(START_TIMEOUT):
            process.stop()
            raise RuntimeError(f"{name} did not start:\n{process.output()}")
        return process

    # --- broker --------------------------------------------------------------------------

    def start_broker(
        self,
        bcrypt_rounds: int = 4,
        presence_ttl: int = 5,
        netns: str | None = None,
        **extra: Any,
    ) -> Process:
        """`extra`: more broker config keys, e.g. `session_ttl=2`; `netns`: the network
        namespace the broker runs in."""
        lines = [
            f"bind: {self.broker_endpoint}",
            "data_dir: broker",
            f"bcrypt_rounds: {bcrypt_rounds}",
            f"presence_ttl: {presence_ttl}",
        ]
        lines += [f"{key}: {value}" for key, value in extra.items()]
        self.broker_config.write_text("\n".join(lines) + "\n")
        self.run("sfs-broker", "init", "--config", str(self.broker_config)).check()
        self.broker = self.start(
            "broker",
            [
                *command_for("sfs-broker"),
                "serve",
                "--config",
                str(self.broker_config),
                *self.debug_flag,
            ],
            netns=netns,
        )
        self.broker_netns = netns
        self.wait_for_broker()
        return self.broker

    def start_relay(self, name: str = "relay", netns: str | None = None) -> Process:
        """`sfs-broker relay` with the broker's config (which must have a `relay:`
        section); waits for its "relay listening" log line."""
        relay = self.start(
            name,
            [
                *command_for("sfs-broker"),
                "relay",
                "--config",
                str(self.broker_config),
                *self.debug_flag,
            ],
            netns=netns,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while "relay listening" not in relay.output():
            if time.monotonic() > deadline or not relay.alive():
                raise RuntimeError(f"the relay did not start:\n{relay.output()}")
            time.sleep(0.05)
        return relay

    def broker_public_key(self) -> bytes:
        config = load_broker_config(self.broker_config)
        return config.public_key_file.read_bytes().strip()

    def wait_for_broker(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        if self.broker_netns is not None:  # out of reach from here: wait for its log line
            while self.broker and "listening on" not in self.broker.output():
                if time.monotonic() > deadline or not self.broker.alive():
                    raise RuntimeError(f"the broker did not start:\n{self.broker.output()}")
                time.sleep(0.05)
            return
        with BrokerClient(self.broker_endpoint, self.broker_public_key(), timeout=1) as client:
            while True:
                try:
                    client.ping()
                    return
                except SfsError:
                    if time.monotonic() > deadline or (self.broker and not self.broker.alive()):
                        out = self.broker.output() if self.broker else ""
                        raise RuntimeError(f"the broker did not start:\n{out}") from None

    def broker_status(self) -> Any:
        return (
            self.run("sfs-broker", "status", "--json", "--config", str(self.broker_config))
            .check()
            .json()
        )

    # --- peers ---------------------------------------------------------------------------

    def write_peer_config(self, name: str, host: str | None = None, **extra: Any) -> Path:
        """`host`: the address it listens on (default: the cluster's)."""
        host = host or self.host
        port = free_port(host)
        config = self.root / f"{name}.yaml"
        lines = [
            f"username: {name}",
            f"data_dir: {name}",
            f"download_dir: {name}/downloads",
            f"listen: {tcp_endpoint(host, port)}",
            "broker:",
            f"  endpoint: {self.broker_endpoint}",
            "  public_key_file: broker/broker.pub",
            f"transport_encryption: {str(self.transport_encryption).lower()}",
            "heartbeat_interval: 1",
            "timeout: 5",
        ]
        lines += [f"{key}: {value}" for key, value in extra.items()]
        config.write_text("\n".join(lines) + "\n")
        return config

    def add_peer(
        self,
        name: str,
        *,
        serve: bool = False,
        register: bool = True,
        init: bool = True,
        host: str | None = None,
        netns: str | None = None,
        **extra: Any,
    ) -> Peer:
        """`extra`: more peer config keys, e.g. `advertise="tcp://127.0.0.1:5999"`.
        Without `init` the peer has a config only (and is not registered). `host`: the
        address it listens on (default: the cluster's); `netns`: the network namespace its
        commands run in."""
        config = self.write_peer_config(name, host, **extra)
        peer = Peer(self, name, config, password=f"{name}-password", netns=netns)
        self.peers[name] = peer
        if not init:
            return peer
        peer.run("init").check()
        if register:
            peer.run("register", "--password-stdin", input=peer.password + "\n").check()
        if serve:
            peer.serve()
        return peer
