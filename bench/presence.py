"""Presence at scale: 10,000 online peers heartbeating every 10 s on PostgreSQL.

    .venv/bin/python -m bench.presence [--peers 10000] [--interval 10] [--rounds 2]

Starts a throwaway PostgreSQL cluster (as tests/postgres.py does, from the machine's
initdb and pg_ctl), registers `peers` users with a session each (COPY, through
`PostgresStore.load`), then sends what the broker's store does for each heartbeat
(`BrokerService._heartbeat`): `session_user` (the session check; its expiry slides in
coarse steps, so it seldom writes) and `set_online` (an upsert into the unlogged
`presence` table). First paced, as the peers would: `peers` heartbeats spread evenly
over each `interval` s, for `rounds` rounds, from 4 threads sharing the store's pool; it
reports the latency per heartbeat and the CPU that the database server and the client
process used, as a share of one core. Then flat out for a few seconds: the most
heartbeats per second the store takes on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from bench.common import BenchError, fmt_load, progress
from bench.search import ms, percentile
from sfs.broker.postgres_store import PostgresStore

DEFAULT_PEERS = 10_000
DEFAULT_INTERVAL = 10.0  # seconds between two heartbeats of one peer (serve's default)
DEFAULT_ROUNDS = 2
THREADS = 4  # the store's default pool size
FLAT_OUT = 5.0  # seconds
TTL = 30  # presence lifetime (BrokerSettings.presence_ttl)
SESSION = 86_400
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu(data: Path) -> float:
    """CPU seconds used so far by the cluster's postmaster and its children."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if postmaster in (pid, ppid):
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return total


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def fill(store: PostgresStore, peers: int, now: int) -> list[tuple[int, bytes]]:
    users = [
        (n, f"peer{n:05}", b"bench-hash", b"rsa", n.to_bytes(32, "big"), 1, False)
        for n in range(1, peers + 1)
    ]
    sessions = [(n.to_bytes(32, "big"), n, now + SESSION) for n in range(1, peers + 1)]
    columns = ("id", "username", "password_hash", "rsa_public", "curve_public", "created_at")
    store.load(
        [
            ("users", (*columns, "disabled"), users),
            ("sessions", ("token_hash", "user_id", "expires_at"), sessions),
        ]
    )
    return [(user_id, token) for token, user_id, _ in sessions]


def heartbeat(store: PostgresStore, user_id: int, token: bytes, now: int) -> None:
    if store.session_user(token, now, now + SESSION) is None:
        raise BenchError(f"peer {user_id}: its session was refused")
    store.set_online(user_id, f"tcp://10.0.{user_id >> 8 & 255}.{user_id & 255}:7000", now + TTL)


def paced(
    store: PostgresStore, peers: list[tuple[int, bytes]], interval: float, rounds: int
) -> tuple[list[float], float]:
    """Every peer once per `interval`, evenly spread; the latencies and the seconds taken."""
    latencies: list[list[float]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    started = time.monotonic()
    gap = interval / len(peers)

    def work(lane: int) -> None:
        try:
            for number in range(lane, len(peers) * rounds, THREADS):
                due = started + number * gap
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                user_id, token = peers[number % len(peers)]
                before = time.perf_counter()
                heartbeat(store, user_id, token, int(time.time()))
                latencies[lane].append(time.perf_counter() - before)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(lane,)) for lane in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [t for lane in latencies for t in lane], time.monotonic() - started


def flat_out(store: PostgresStore, peers: list[tuple[int, bytes]], seconds: float) -> int:
    done = [0] * THREADS
    stop = time.monotonic() + seconds

    def work(lane: int) -> None:
        number = lane
        while time.monotonic() < stop:
            user_id, token = peers[number % len(peers)]
            heartbeat(store, user_id, token, int(time.time()))
            done[lane] += 1
            number += THREADS

    threads = [threading.Thread(target=work, args=(lane,)) for lane in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done)


def run(args: argparse.Namespace) -> str:
    from tests.postgres import Cluster, find_bindir  # with pytest: only for this bench

    bindir = find_bindir()
    if bindir is None:
        raise BenchError("bench.presence needs initdb and pg_ctl (Debian: apt install postgresql)")
    cluster = Cluster(bindir)
    try:
        cluster.start()
        with cluster.database() as url:
            store = PostgresStore(url, pool_size=THREADS)
            try:
                load = os.getloadavg()
                peers = fill(store, args.peers, int(time.time()))
                progress(f"{args.peers:,} peers registered; heartbeating")
                paced(store, peers[:1000], 1.0, 1)  # warm the pool and the caches
                server, client = server_cpu(cluster.base / "data"), own_cpu()
                latencies, took = paced(store, peers, args.interval, args.rounds)
                server, client = server_cpu(cluster.base / "data") - server, own_cpu() - client
                progress("flat out")
                most = flat_out(store, peers, FLAT_OUT)
                online = len(store.stats(int(time.time())).online)
            finally:
                store.close()
    finally:
        cluster.stop()
    beats = len(latencies)
    return (
        "\n".join(
            [
                f"## Presence: {args.peers:,} peers heartbeating every {args.interval:g} s"
                " (PostgreSQL)",
                "",
                f"Each heartbeat is what the broker asks its store: `session_user` and"
                f" `set_online`, from {THREADS} threads over the store's pool of {THREADS}"
                " connections, on a throwaway cluster on this machine (fsync off; presence is"
                " an unlogged table anyway).",
                "",
                "| measure | value |",
                "|---|---:|",
                f"| heartbeats (paced) | {beats:,} in {took:.1f} s ({beats / took:,.0f}/s) |",
                f"| latency p50 / p99 / max, ms | {ms(percentile(latencies, 50))} /"
                f" {ms(percentile(latencies, 99))} / {ms(max(latencies))} |",
                f"| database server CPU | {server:.2f} s ="
                f" {100 * server / took:.1f}% of one core |",
                f"| client process CPU (psycopg, the pool) | {client:.2f} s ="
                f" {100 * client / took:.1f}% of one core |",
                f"| flat out | {most / FLAT_OUT:,.0f} heartbeats/s |",
                f"| online at the end | {online:,} |",
                "",
                f"- load average before / after: {fmt_load(load)} / {fmt_load(os.getloadavg())}",
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    print(run(parser.parse_args()), end="")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
