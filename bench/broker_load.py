"""The broker under load: many logged-in clients, against a bare CurveZMQ echo server.

    .venv/bin/python -m bench.broker_load [--clients 50] [--seconds 20] [--processes 2]
        [--database sqlite postgresql] [--brokers 1 2]
    .venv/bin/python -m bench --only broker        # the same, as a section of results.md

For each database (SQLite; PostgreSQL on a throwaway cluster, as tests/postgres.py
starts it), starts real `sfs-broker serve` processes (tests/harness.py) over one
database, with three registered users; alice shares a few files and serves, so lookups
list her as a holder. With several brokers, client n talks to broker n mod brokers. Each
client logs in as one of the users with that user's transport key and gets its own
session. Then, for `seconds` each after a short warm-up, the clients keep one request
each in flight: lookups, then searches. Last, the same clients send the same lookup
frames to an echo server: the broker's own frontend socket (`BrokerServer._frontend`:
same options, CurveZMQ, ZAP handler) with one thread that sends every frame straight
back, and nothing behind it.

The clients run in `processes` processes, each one thread driving its share of the
DEALER sockets from a poller with prepared request frames, so that a client costs
little more than ZeroMQ itself. On a small machine they still compete with the server
for the CPU; the report shows the CPU time each side used.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import msgpack
import zmq

from bench.common import BenchError, fmt_load, progress
from sfs.broker.server import BrokerServer
from sfs.broker.service import BrokerService
from sfs.common import protocol
from sfs.common.config import load_broker_config
from sfs.common.curve import start_authenticator
from sfs.common.errors import SfsError
from sfs.peer.client import BrokerClient
from sfs.peer.keys import load_identity
from tests.harness import Cluster, command_for, free_port, tcp_endpoint

DEFAULT_CLIENTS = 50
DEFAULT_SECONDS = 20.0
DEFAULT_PROCESSES = 2
WARMUP = 3.0  # seconds of load before the measured window
USERS = ("alice", "bob", "carol")
FILES = 12
QUERIES = ["report", "data", "", "a", "thesis draft", "pdf", "nothing-matches-this"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DATABASE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


@dataclass(frozen=True)
class Client:
    secret_key: bytes  # z85
    public_key: bytes  # z85
    frames: list[bytes]  # sent in turn
    number: int  # talks to endpoints[number % len(endpoints)]


@dataclass(frozen=True)
class Job:
    endpoints: list[str]
    server_key: bytes
    clients: list[Client]
    start: float  # time.time() at which every process starts sending
    seconds: float
    expect_echo: bool


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    errors: int = 0
    cpu: float = 0.0  # seconds of CPU this client process used in the window


@dataclass(frozen=True)
class Measured:
    label: str
    seconds: float
    latencies: list[float]
    errors: int
    server_cpu: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


# --- the client processes ------------------------------------------------------------------


def drive(job: Job, results: multiprocessing.connection.Connection) -> None:
    """One client process: every socket keeps one request in flight until the end."""
    context = zmq.Context()
    sockets: dict[zmq.Socket[bytes], tuple[Client, int]] = {}
    poller = zmq.Poller()
    for client in job.clients:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = job.server_key
        sock.curve_secretkey = client.secret_key
        sock.curve_publickey = client.public_key
        sock.connect(job.endpoints[client.number % len(job.endpoints)])
        sockets[sock] = (client, 0)
        poller.register(sock, zmq.POLLIN)
    outcome = Outcome()
    # time.time() is shared by the processes; perf_counter() is the finer local clock.
    offset = time.perf_counter() - time.time()
    time.sleep(max(0.0, job.start - time.time()))
    measure_from = job.start + WARMUP + offset
    end = measure_from + job.seconds
    sent_at: dict[zmq.Socket[bytes], float] = {}
    for sock, (client, _) in sockets.items():
        sock.send(client.frames[0])
        sent_at[sock] = time.perf_counter()
    cpu_at_start: float | None = None
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if cpu_at_start is None and now >= measure_from:
            cpu_at_start = cpu_seconds()
        for sock, _ in poller.poll(100):
            reply = sock.recv()
            done = time.perf_counter()
            client, turn = sockets[sock]
            if done >= measure_from:
                outcome.latencies.append(done - sent_at[sock])
                if not answered(reply, client.frames[turn], job.expect_echo):
                    outcome.errors += 1
            turn = (turn + 1) % len(client.frames)
            sockets[sock] = (client, turn)
            sock.send(client.frames[turn])
            sent_at[sock] = done
    outcome.cpu = cpu_seconds() - (cpu_at_start or 0.0)
    for sock in sockets:
        sock.close(linger=0)
    context.term()
    results.send(outcome)


def answered(reply: bytes, request: bytes, expect_echo: bool) -> bool:
    if expect_echo:
        return reply == request
    return bool(msgpack.unpackb(reply).get("op") == "result")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by `pid`, all its threads (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(
    label: str,
    server_pids: list[int],
    endpoints: list[str],
    server_key: bytes,
    clients: list[Client],
    args: argparse.Namespace,
) -> Measured:
    spawn = multiprocessing.get_context("spawn")
    start = time.time() + 3.0  # time for the processes to start and connect
    jobs = [
        Job(
            endpoints,
            server_key,
            clients[n :: args.processes],
            start,
            args.seconds,
            label == "echo",
        )
        for n in range(args.processes)
    ]
    pipes, workers = [], []
    for job in jobs:
        receiver, sender = spawn.Pipe(duplex=False)
        worker = spawn.Process(target=drive, args=(job, sender), daemon=True)
        worker.start()
        pipes.append(receiver)
        workers.append(worker)
    time.sleep(max(0.0, start + WARMUP - time.time()))
    server_before = sum(process_cpu(pid) for pid in server_pids)
    time.sleep(args.seconds)
    server_cpu = sum(process_cpu(pid) for pid in server_pids) - server_before
    outcomes: list[Outcome] = []
    for receiver, worker in zip(pipes, workers, strict=True):
        if not receiver.poll(60):
            raise BenchError(f"a client process of the {label} run did not report back")
        outcomes.append(receiver.recv())
        worker.join(10)
    latencies = [x for outcome in outcomes for x in outcome.latencies]
    errors = sum(outcome.errors for outcome in outcomes)
    progress(f"{label}: {len(latencies) / args.seconds:,.0f} requests/s, {errors} errors")
    return Measured(
        label, args.seconds, latencies, errors, server_cpu, sum(o.cpu for o in outcomes)
    )


# --- the echo server ---------------------------------------------------------------------------


class EchoServer(BrokerServer):
    """The broker's frontend socket with one thread that sends each frame straight back."""

    def serve(self) -> None:
        context = zmq.Context()
        authenticator = start_authenticator(context, "bench.echo")
        frontend = self._frontend(context)
        frontend.rcvtimeo = 200  # to notice `stop()`
        self.bound.set()
        try:
            while not self._stop.is_set():
                try:
                    frames = frontend.recv_multipart(copy=False)
                except zmq.Again:
                    continue
                frontend.send_multipart(frames, copy=False)
        finally:
            frontend.close(linger=0)
            authenticator.stop()
            context.term()


def serve_echo(bind: str, secret_key: bytes, public_key: bytes) -> None:
    # No requests reach a service: the echo answers everything itself.
    EchoServer(cast(BrokerService, None), bind, secret_key, public_key, workers=0).serve()


# --- setting up the broker ---------------------------------------------------------------------


def publish_files(cluster: Cluster) -> list[str]:
    alice = cluster.peers["alice"]
    file_ids = []
    for n in range(FILES):
        path = cluster.root / f"report-{n:02}.pdf"
        path.write_bytes(os.urandom(4096 + n))
        shared = alice.run("share", str(path), "--keyword", "data", "--json").check()
        file_ids.append(shared.json()["file_id"])
    return file_ids


def make_clients(
    cluster: Cluster, count: int, file_ids: list[str]
) -> tuple[list[Client], list[Client]]:
    """`count` clients, each with its own session: (lookup clients, search clients), the same
    sockets' keys and sessions, different requests."""
    server_key = cluster.broker_public_key()
    identities = {name: load_identity(cluster.peers[name].data_dir, name) for name in USERS}
    lookups, searches = [], []
    for n in range(count):
        identity = identities[USERS[n % len(USERS)]]
        with BrokerClient(cluster.broker_endpoint, server_key, identity.transport_key) as client:
            token = client.login(identity.username, cluster.peers[identity.username].password).token
        keys = (identity.curve_secret_z85, identity.curve_public_z85)
        turn = [file_ids[(n + i) % len(file_ids)] for i in range(len(file_ids))]
        lookups.append(
            Client(
                *keys, [protocol.encode("lookup", protocol.Lookup(token, f), n) for f in turn], n
            )
        )
        searches.append(
            Client(
                *keys,
                [protocol.encode("search", protocol.Search(token, q), n) for q in QUERIES],
                n,
            )
        )
    return lookups, searches


# --- the report --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


def render(args: argparse.Namespace, runs: list[Measured], setup: dict[str, str]) -> str:
    # Each row against the echo of its block: the one measured right after it.
    echoes: list[Measured] = []
    for run in reversed(runs):
        echoes.insert(0, run if run.label == "echo" or not echoes else echoes[0])
    lines = [
        "## Broker under load",
        "",
        f"{args.clients} clients, each with its own session and one request in flight, in"
        f" {args.processes} client processes; {args.seconds:g} s measured after {WARMUP:g} s"
        " of warm-up. Latency is from sending a request to its reply, in ms. CPU is the"
        " share of one core used during the measured window: the broker processes (all their"
        " threads, ZeroMQ's included) together, and the client processes together. Each"
        " database's rows are compared with the echo server measured right after them.",
        "",
        "| target | requests/s | p50 | p99 | vs echo | errors | broker CPU | clients CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, echo in zip(runs, echoes, strict=True):
        lines.append(
            f"| {run.label} | {run.rate:,.0f} | {percentile(run.latencies, 50) * 1000:.2f}"
            f" | {percentile(run.latencies, 99) * 1000:.2f} | {run.rate / echo.rate:.0%}"
            f" | {run.errors} | {run.server_cpu / run.seconds:.0%}"
            f" | {run.client_cpu / run.seconds:.0%} |"
        )
    lines += ["", *(f"- {key}: {value}" for key, value in setup.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def database_url(database: str) -> Iterator[str | None]:
    """None for SQLite (the broker's default); a throwaway PostgreSQL database's URL."""
    if database == "sqlite":
        yield None
        return
    from tests.postgres import Cluster as PostgresCluster  # with pytest: only for PostgreSQL
    from tests.postgres import find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise BenchError("PostgreSQL needs initdb and pg_ctl (Debian: apt install postgresql)")
    postgres = PostgresCluster(bindir)
    try:
        postgres.start()
        with postgres.database() as url:
            yield url
    finally:
        postgres.stop()


def start_more_brokers(cluster: Cluster, count: int) -> list[tuple[str, int]]:
    """`count` more `sfs-broker serve` processes with the first one's config (data_dir,
    keys, database), each on a port of its own: (endpoint, pid) each."""
    started = []
    for n in range(count):
        endpoint = tcp_endpoint(cluster.host, free_port(cluster.host))
        config = cluster.root / f"broker-{n + 2}.yaml"
        lines = cluster.broker_config.read_text().splitlines()
        config.write_text(
            "\n".join(f"bind: {endpoint}" if line.startswith("bind:") else line for line in lines)
            + "\n"
        )
        process = cluster.start(
            f"broker-{n + 2}", [*command_for("sfs-broker"), "serve", "--config", str(config)]
        )
        with BrokerClient(endpoint, cluster.broker_public_key(), timeout=1) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.ping()
                    break
                except SfsError:
                    if time.monotonic() > deadline or not process.alive():
                        raise BenchError(f"broker {n + 2} did not start") from None
        started.append((endpoint, process.popen.pid))
    return started


def measure_database(
    database: str, args: argparse.Namespace, workers: int | None
) -> list[Measured]:
    """Lookups and searches with 1, then more brokers over one database of that kind,
    then the echo server with the same clients (last: the machine is shared, so each
    block has its own echo to compare with)."""
    runs = []
    with database_url(database) as url, Cluster() as cluster:
        progress(f"{database}: starting a broker, registering users, sharing files")
        extra: dict[str, object] = {} if workers is None else {"workers": workers}
        if url is not None:
            extra["database"] = f"'{url}'"
        broker = cluster.start_broker(**extra)
        cluster.add_peer("alice", serve=True)
        for name in USERS[1:]:
            cluster.add_peer(name)
        file_ids = publish_files(cluster)
        lookups, searches = make_clients(cluster, args.clients, file_ids)
        key = cluster.broker_public_key()
        servers = [(cluster.broker_endpoint, broker.popen.pid)]
        for count in sorted(args.brokers):
            if count > len(servers):
                servers += start_more_brokers(cluster, count - len(servers))
            endpoints, pids = [e for e, _ in servers], [p for _, p in servers]
            name = f"{DATABASE_NAMES[database]}, {count} broker{'s' if count > 1 else ''}"
            runs += [
                measure(f"{name}: lookup", pids, endpoints, key, lookups, args),
                measure(f"{name}: search", pids, endpoints, key, searches, args),
            ]
        secret = load_broker_config(cluster.broker_config).secret_key_file.read_bytes().strip()
        runs.append(measure_echo(key, secret, lookups, args))
    return runs


def measure_echo(
    key: bytes, secret: bytes, lookups: list[Client], args: argparse.Namespace
) -> Measured:
    echo_endpoint = f"tcp://127.0.0.1:{free_port()}"
    spawn = multiprocessing.get_context("spawn")
    echo = spawn.Process(target=serve_echo, args=(echo_endpoint, secret, key), daemon=True)
    echo.start()
    try:
        assert echo.pid is not None
        return measure("echo", [echo.pid], [echo_endpoint], key, lookups, args)
    finally:
        echo.terminate()
        echo.join(10)


def run(args: argparse.Namespace) -> str:
    """The markdown section; `args.clients`, `args.seconds`, `args.processes`, `args.workers`,
    `args.database`, `args.brokers` (with defaults, since `python -m bench` passes its own
    arguments)."""
    args.clients = getattr(args, "clients", DEFAULT_CLIENTS)
    args.seconds = getattr(args, "seconds", DEFAULT_SECONDS)
    args.processes = min(getattr(args, "processes", DEFAULT_PROCESSES), args.clients)
    args.database = getattr(args, "database", None) or list(DATABASE_NAMES)
    args.brokers = getattr(args, "brokers", None) or [1, 2]
    workers = getattr(args, "workers", None)
    load = os.getloadavg()
    runs: list[Measured] = []
    for database in args.database:
        runs += measure_database(database, args, workers)
    setup = {
        "broker": f"`sfs-broker serve`, {workers or 'default (4)'} workers, bcrypt rounds 4;"
        f" {len(USERS)} users, {FILES} files shared by alice, who is online; with several"
        " brokers, the clients are spread evenly over them",
        "PostgreSQL": "a throwaway cluster from the machine's packages (tests/postgres.py:"
        " fsync off), on the same 2 cores; its CPU is not in the broker column",
        "lookup": f"each client asks for the {FILES} files in turn (reply: manifest,"
        " signature, owner bundle, alice as holder)",
        "search": f"each client asks in turn: {', '.join(repr(q) for q in QUERIES)}",
        "echo": "same client sockets and lookup frames; the reply is the request",
        "load average before / after": f"{fmt_load(load)} / {fmt_load(os.getloadavg())}",
        "CPU": f"{os.cpu_count()} logical cores",
    }
    return render(args, runs, setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per measurement")
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES, help="client processes")
    parser.add_argument("--workers", type=int, help="the broker's worker threads")
    parser.add_argument("--database", nargs="+", choices=list(DATABASE_NAMES), help="default: both")
    parser.add_argument(
        "--brokers", nargs="+", type=int, help="broker processes to measure with (1 2)"
    )
    print(run(parser.parse_args()), end="")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
