"""Three `sfs-broker serve` processes on one PostgreSQL database, a hundred peers sharing,
searching and downloading through them while one broker is killed with SIGKILL.

The brokers are real processes, set up as the README says: the first one's key files
are copied into the others' data folders before their `init`, which keeps them. The
peers run in this process (`Peer`, as the CLI uses it, each with its own keys, data
folder and sockets) and speak the real protocol over loopback: every peer lists all
three brokers, so each starts at a random one. Ten of them serve files (`serve`, with
its heartbeat) and share two each; ten more share while the broker dies. Every peer
searches and downloads, and every download is checked against the original bytes.

To keep the scenario within seconds, the peers' RSA keys come from a pool of four made
once (RSA-3072 key generation is ~0.3 s each): every user still has a transport key of
its own, so a fingerprint, a pin and a session of its own. Nothing tested here depends
on RSA keys being unique.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from sfs.common import crypto
from sfs.common.config import load_peer_config
from sfs.common.errors import SfsError
from sfs.peer.client import BrokerClient
from sfs.peer.download import DownloadResult
from sfs.peer.node import Peer
from sfs.peer.registry import Share
from tests.harness import Cluster, Process, command_for, free_port

pytestmark = pytest.mark.harness

T = TypeVar("T")

PEERS = 100
SERVING = 10  # peers that serve; each shares a public file and one for a few users
LATE_SHARERS = 10  # peers that share while the broker is killed
NAMED = 5  # users each private file is shared with
KILL_AFTER = 30  # operations done before the broker is killed
FILE_SIZE = 48 * 1024 + 123  # one chunk, not a round number


@dataclass(frozen=True)
class Brokers:
    configs: list[Path]
    endpoints: list[str]
    processes: list[Process]
    public_key: bytes


def start_brokers(cluster: Cluster, database: str, count: int) -> Brokers:
    """`count` brokers on one database, sharing the first one's key pair."""
    configs, endpoints = [], []
    for number in range(count):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        config = cluster.root / f"broker{number}.yaml"
        config.write_text(
            f"bind: {endpoint}\ndata_dir: broker{number}\ndatabase: {database}\n"
            "bcrypt_rounds: 4\npresence_ttl: 5\nworkers: 3\n"
        )
        if number > 0:  # as the README says: the first broker's keys, then `init`
            (cluster.root / f"broker{number}").mkdir(mode=0o700)
            for name in ("broker.key", "broker.pub"):
                shutil.copy2(cluster.root / "broker0" / name, cluster.root / f"broker{number}")
        done = cluster.run("sfs-broker", "init", "--config", str(config)).check()
        assert ("already initialised" in done.stdout) == (number > 0)
        configs.append(config)
        endpoints.append(endpoint)
    public_key = (cluster.root / "broker0" / "broker.pub").read_bytes().strip()
    processes = [
        cluster.start(f"broker{n}", [*command_for("sfs-broker"), "serve", "--config", str(c)])
        for n, c in enumerate(configs)
    ]
    for endpoint, process in zip(endpoints, processes, strict=True):
        wait_for(endpoint, public_key, process)
    return Brokers(configs, endpoints, processes, public_key)


def wait_for(endpoint: str, public_key: bytes, process: Process) -> None:
    deadline = time.monotonic() + 30
    with BrokerClient(endpoint, public_key, timeout=1) as client:
        while True:
            try:
                client.ping()
                return
            except SfsError:
                if time.monotonic() > deadline or not process.alive():
                    raise RuntimeError(
                        f"{process.name} did not start:\n{process.output()}"
                    ) from None
                time.sleep(0.1)


@pytest.fixture
def rsa_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = [crypto.generate_rsa_key() for _ in range(4)]
    keys = itertools.cycle(pool)
    lock = threading.Lock()

    def pooled() -> crypto.RsaPrivateKey:
        with lock:
            return next(keys)

    monkeypatch.setattr(crypto, "generate_rsa_key", pooled)


class World:
    def __init__(self, root: Path, brokers: Brokers) -> None:
        self.root, self.brokers = root, brokers
        self.names = [f"user{n:03d}" for n in range(PEERS)]

    def config(self, name: str) -> Path:
        path = self.root / f"{name}.yaml"
        if not path.exists():
            listed = "".join(f"\n    - {e}" for e in self.brokers.endpoints)
            path.write_text(
                f"username: {name}\ndata_dir: {name}\ndownload_dir: {name}/downloads\n"
                f"listen: tcp://127.0.0.1:{free_port()}\nbroker:\n  endpoint:{listed}\n"
                f"  public_key: '{self.brokers.public_key.decode()}'\n"
                "heartbeat_interval: 1\ntimeout: 3\n"
            )
        return path

    def with_peer(self, name: str, work: Callable[[Peer], T]) -> T:
        with Peer(load_peer_config(self.config(name))) as peer:
            return work(peer)


@dataclass
class Server:
    stop: threading.Event
    thread: threading.Thread
    errors: list[BaseException]


def serve(world: World, name: str) -> Server:
    """`sfs-peer serve` for `name`, on a thread of its own, as its own process would."""
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            world.with_peer(name, lambda peer: peer.serve(stop, lambda _: ready.set()))
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name=f"{name}-serve", daemon=True)
    thread.start()
    assert ready.wait(30) and not errors, f"{name} did not start serving: {errors}"
    return Server(stop, thread, errors)


def share_file(path: Path, keyword: str, to: list[str] | None, peer: Peer) -> Share:
    return peer.share(path, keywords=[keyword], to=to)


def write_file(path: Path, seed: str) -> str:
    data = hashlib.shake_256(seed.encode()).digest(FILE_SIZE)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def stop_servers(running: list[Server]) -> None:
    for server in running:
        server.stop.set()
    for server in running:
        server.thread.join(15)
        assert not server.thread.is_alive()
    running.clear()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    running: list[Server] = []
    yield running
    stop_servers(running)


def test_a_hundred_peers_through_three_brokers_one_killed(
    postgres_url: str, rsa_pool: None, servers: list[Server], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sfs.peer")  # the clients' failovers
    with Cluster() as cluster:
        brokers = start_brokers(cluster, postgres_url, 3)
        world = World(cluster.root, brokers)
        files = cluster.root / "files"
        files.mkdir()

        def register(name: str) -> None:
            def steps(peer: Peer) -> None:
                peer.init()
                peer.register(f"{name}-password")

            world.with_peer(name, steps)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(register, world.names))

        owners = world.names[:SERVING]
        expected: dict[str, tuple[str, str]] = {}  # file id -> (name, sha256)
        public: list[str] = []
        named: dict[str, list[str]] = {}  # user -> the private file ids shared with them
        for number, owner in enumerate(owners):
            servers.append(serve(world, owner))
            readers = world.names[SERVING + number * NAMED : SERVING + (number + 1) * NAMED]
            for keyword, to in (("common", None), ("private", readers)):
                path = files / f"{owner}-{keyword}.bin"
                digest = write_file(path, path.name)
                share = world.with_peer(owner, partial(share_file, path, keyword, to))
                expected[share.file_id] = (path.name, digest)
                if to is None:
                    public.append(share.file_id)
                for reader in to or ():
                    named.setdefault(reader, []).append(share.file_id)

        late: dict[str, str] = {}  # file id -> its owner, shared while the broker dies

        def work(number: int, name: str) -> None:
            def steps(peer: Peer) -> None:
                hits = peer.search("common")
                assert {hit.file_id for hit in hits} == set(public), name
                wanted = [public[number % len(public)], *named.get(name, [])]
                for file_id in wanted:
                    if name in owners and file_id in public[: owners.index(name) + 1]:
                        continue  # one's own file
                    result = peer.get(file_id)
                    assert isinstance(result, DownloadResult), (name, result)
                    filename, digest = expected[file_id]
                    content = (peer.config.download_dir / filename).read_bytes()
                    assert hashlib.sha256(content).hexdigest() == digest
                if SERVING + len(named) <= number < SERVING + len(named) + LATE_SHARERS:
                    path = files / f"{name}-late.bin"
                    write_file(path, path.name)
                    share = peer.share(path, keywords=["late"])
                    late[share.file_id] = name

            world.with_peer(name, steps)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            jobs: list[Future[None]] = [
                pool.submit(work, number, name) for number, name in enumerate(world.names)
            ]
            while sum(job.done() for job in jobs) < KILL_AFTER:
                time.sleep(0.05)
            killed = brokers.processes[0]
            killed.kill()  # SIGKILL, in the middle of it all
            killed_at = time.monotonic()
            failures = [job.exception() for job in jobs if job.exception() is not None]
        assert failures == [], failures[:3]
        moved = [r for r in caplog.records if "trying the broker at" in r.getMessage()]
        assert moved, "no client had to leave the killed broker"
        assert len(late) == LATE_SHARERS
        elapsed = time.monotonic() - started

        assert killed.popen.returncode == -9
        assert killed.output().count("registered") > 0  # it had its share of the peers
        # Every server stayed up and online, its heartbeat moved to a broker that is
        # left: presence lasts 5 s, so once that long has passed since the kill, only a
        # heartbeat that a survivor took keeps a server online.
        assert all(server.thread.is_alive() and not server.errors for server in servers)
        time.sleep(max(0.0, killed_at + 6.5 - time.monotonic()))
        for config in brokers.configs[1:]:
            status = (
                cluster.run("sfs-broker", "status", "--json", "--config", str(config))
                .check()
                .json()
            )
            assert [user["username"] for user in status["users"]] == world.names
            assert status["files"] == len(expected) + LATE_SHARERS
            assert sorted(entry["username"] for entry in status["online"]) == owners
            online = {user["username"] for user in status["users"] if user["online"]}
            assert online == set(owners)
        # What the killed broker acknowledged is there: every late share can be found.
        found = world.with_peer(world.names[-1], lambda peer: peer.search("late"))
        assert {hit.file_id: hit.owner for hit in found} == late
        print(f"{PEERS} peers' operations in {elapsed:.1f} s, one broker killed")
        stop_servers(servers)  # while brokers are there to say goodbye to
