"""Search at scale: the broker's store with a million files, timed per kind of query.

    .venv/bin/python -m bench.search [--files 1000000] [--queries 400] [--seed 1]
    .venv/bin/python -m bench.search --blind-only  # the second part alone (~1 min)
    .venv/bin/python -m bench.search --postgres    # also on a throwaway PostgreSQL
    .venv/bin/python -m bench.search --keep DIR    # build the stores in DIR once, reuse them
    .venv/bin/python -m bench --only search        # the same, as a section of results.md

Fills a `SqliteStore` in a temporary folder with generated files (names and keywords
drawn from a Zipf-distributed vocabulary with some non-ASCII words, a few heavy
sharers, a fifth of the files private with an access list, and one user, `auditor`, on
the access list of half of those), then times searches of several kinds, each asked by
`SqliteStore.search` directly and through `BrokerService.handle` (decode, session
check, search, encode the reply).

Then a second, smaller store for the costliest caller: one who can see none of 50,000
private files of other users, so that every search looks at every file and answers
nothing. It times an empty query and one of eight one-letter terms.

Each search examines at most `SEARCH_BUDGET` candidate files (sfs.broker.store_contract);
the tables count the searches that stopped there (`partial`). With `--postgres`, each
store is also copied into a throwaway PostgreSQL cluster (as tests/postgres.py starts
one, from the machine's initdb and pg_ctl) and the same searches are timed there.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import pickle
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench.common import BenchError, fmt_load, progress
from sfs.broker.migrate import copy_index
from sfs.broker.postgres_store import PostgresStore
from sfs.broker.service import BrokerService, BrokerSettings
from sfs.broker.store import SqliteStore, Store, User
from sfs.broker.store_contract import SEARCH_BUDGET
from sfs.common import crypto, protocol
from sfs.common.identity import KeyBundle

DEFAULT_FILES = 1_000_000
DEFAULT_QUERIES = 400
USERS = 200
PRIVATE_SHARE = 0.2  # of files with an access list
AUDITOR_SHARE = 0.5  # of private files that list the auditor
LIMIT = 100  # the protocol's default
BATCH = 20_000  # rows per transaction while filling
EPOCH = 1_700_000_000
SPAN = 2 * 365 * 86400  # files were shared over two years

COMMON_TEXT = """
report thesis draft final budget meeting notes photo scan invoice contract data results
analysis slides lecture homework project plan design review summary minutes paper chapter
figure table dataset model code backup archive export config schedule proposal letter
agenda manual guide poster video audio recording interview survey experiment sample
protocol appendix abstract presentation spreadsheet diagram sketch template release
"""
FOREIGN_TEXT = """
résumé café Übersicht straße données año niño façade crème naïve Ärger größe señal
данные отчёт проект встреча 報告書 資料 会議録 Ελλάδα σχέδιο İstanbul ŞEHİR
"""
COMMON_WORDS, FOREIGN_WORDS = COMMON_TEXT.split(), FOREIGN_TEXT.split()
EXTENSIONS = ["pdf"] * 6 + ["docx"] * 4 + ["jpg"] * 5 + ["txt", "png", "xlsx", "pptx", "zip"] * 2
EXTENSIONS += ["tar.gz", "mp4", "csv", "py", "md", "odt", "mkv", "flac"]
SYLLABLES = [c + v for c in "bdklmnprstv" for v in "aeiou"]
RARE_PAIRS = ["qz", "zq", "xj", "jx", "qk", "wq"]  # never made by the generator
# A kept cluster's shared buffers: the files table and its indexes of a million files
# (2.2 GB) and the trigram table's index (1.8 GB) in memory, as a server sized for them
# would hold them (the default is 128 MB).
KEPT_SHARED_BUFFERS = "5GB"
BLIND_FILES = 50_000  # all private, none visible to the caller
BLIND_REPEATS = 40  # searches of each kind
ONE_LETTER_TERMS = ["a", "e", "i", "o", "n", "r", "s", "t"]  # the most a query may hold


@dataclass(frozen=True)
class Corpus:
    vocabulary: list[str]  # most frequent first
    cum_weights: list[float]  # Zipf; cumulative, since choices() would sum 20,000 each time
    names: list[str]  # a sample of generated names, for realistic substrings


@dataclass(frozen=True)
class Query:
    kind: str
    caller: User
    terms: list[str]
    owner: str | None = None


@dataclass
class Timings:
    store: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    service: dict[str, list[float]] = field(default_factory=dict)
    hits: dict[str, list[int]] = field(default_factory=dict)
    partial: dict[str, list[bool]] = field(default_factory=dict)  # stopped at the budget


# --- the data -------------------------------------------------------------------------------


def make_corpus(rng: random.Random, size: int = 20_000) -> Corpus:
    invented: set[str] = set()
    while len(invented) < size:
        invented.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    vocabulary = COMMON_WORDS + FOREIGN_WORDS + sorted(invented)
    rng.shuffle(vocabulary[len(COMMON_WORDS) :])  # the foreign words among the rare ones
    cum_weights = list(itertools.accumulate(1 / rank for rank in range(1, len(vocabulary) + 1)))
    return Corpus(vocabulary, cum_weights, [])


def file_names(rng: random.Random, corpus: Corpus) -> Iterator[str]:
    words = corpus.vocabulary
    while True:
        a, b = rng.choices(words, cum_weights=corpus.cum_weights, k=2)
        ext = rng.choice(EXTENSIONS)
        shape = rng.random()
        if shape < 0.3:
            yield f"{a}_{b}_{rng.randint(2015, 2026)}.{ext}"
        elif shape < 0.5:
            yield f"{a.capitalize()} {b.capitalize()} v{rng.randint(1, 12)}.{ext}"
        elif shape < 0.65:
            yield f"{a}-{rng.randint(2015, 2026)}-{rng.randint(1, 12):02}-{rng.randint(1, 28):02}.{ext}"  # noqa: E501
        elif shape < 0.8:
            yield f"IMG_{rng.randint(0, 9999):04}.jpg"
        elif shape < 0.9:
            yield f"{a}{b.capitalize()}.{ext}"
        else:
            yield f"scan{rng.randint(0, 99999):05}.pdf"


def fill(
    store: SqliteStore,
    files: int,
    rng: random.Random,
    corpus: Corpus,
    private_share: float = PRIVATE_SHARE,
    auditor_share: float = AUDITOR_SHARE,
) -> list[User]:
    """Users, then `files` files in batches, written as `add_file` writes them; the last
    user is `auditor`, who owns nothing. `private_share`: of files with an access list;
    `auditor_share`: of those that list the auditor."""
    users = [
        store.add_user(
            f"user{n:03}", b"bench-hash", KeyBundle(b"rsa-%d" % n, bytes(31) + bytes([n])), 1
        )
        for n in range(USERS - 1)
    ]
    users.append(store.add_user("auditor", b"bench-hash", KeyBundle(b"rsa-a", b"\xff" * 32), 1))
    owners = users[:-1]
    owner_weights = list(itertools.accumulate(1 / r**0.7 for r in range(1, len(owners) + 1)))
    names = file_names(rng, corpus)
    # The store's own connection, so that whatever keeps the search index in step with
    # the files table (triggers, SQL functions) runs as it does for `add_file`.
    db = store._connection()
    done = 0
    while done < files:
        count = min(BATCH, files - done)
        rows, access = [], []
        for _ in range(count):
            file_id = rng.randbytes(16).hex()
            owner = rng.choices(owners, cum_weights=owner_weights)[0]
            name = next(names)
            keywords = rng.choices(
                corpus.vocabulary, cum_weights=corpus.cum_weights, k=rng.choice((0, 1, 1, 2, 3))
            )
            public = rng.random() >= private_share
            if not public:
                readers = {u.id for u in rng.sample(owners, rng.randint(0, 5))} - {owner.id}
                if rng.random() < auditor_share:
                    readers.add(users[-1].id)
                access += [(file_id, reader) for reader in readers]
            manifest = rng.randbytes(rng.randint(200, 400))
            shared_at = EPOCH + rng.randrange(SPAN)
            rows.append(
                (file_id, owner.id, name, rng.randint(1, 1 << 32), "\n".join(keywords),
                 manifest, b"s" * 384, int(public), shared_at)
            )  # fmt: skip
            if len(corpus.names) < 50_000:
                corpus.names.append(name)
        db.execute("BEGIN IMMEDIATE")
        # As add_file: the access lists first, so that each file is indexed once.
        db.execute("PRAGMA defer_foreign_keys = ON")
        db.executemany("INSERT INTO access (file_id, user_id) VALUES (?, ?)", access)
        db.executemany(
            "INSERT INTO files (file_id, owner_id, name, size, keywords, manifest, signature,"
            " public, shared_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.execute("COMMIT")
        done += count
        progress(f"filled {done:,} / {files:,} files")
    return users


# --- the queries -----------------------------------------------------------------------------


def make_queries(rng: random.Random, corpus: Corpus, users: list[User], count: int) -> list[Query]:
    words, names = corpus.vocabulary, corpus.names
    common = words[: len(COMMON_WORDS)]
    rare = words[5_000:]
    regular, auditor = users[:-1], users[-1]

    def substring(low: int, high: int) -> str:
        name = rng.choice(names)
        width = rng.randint(low, min(high, len(name)))
        start = rng.randrange(len(name) - width + 1)
        return name[start : start + width]

    def gibberish() -> str:
        return "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(7))

    def anyone() -> User:
        return rng.choice(regular)

    # kind -> (caller, terms, owner filter)
    kinds: dict[str, Callable[[], tuple[User, list[str], str | None]]] = {
        "common word": lambda: (anyone(), [rng.choice(common)], None),
        "rare word": lambda: (anyone(), [rng.choice(rare)], None),
        "two words": lambda: (anyone(), rng.sample(common, 2), None),
        "substring of a name": lambda: (anyone(), [substring(3, 8)], None),
        "non-ASCII, upper case": lambda: (anyone(), [rng.choice(FOREIGN_WORDS).upper()], None),
        "1-2 characters": lambda: (anyone(), [substring(1, 2)], None),
        "1-2 characters, rare": lambda: (anyone(), [rng.choice(RARE_PAIRS)], None),
        "short + word": lambda: (anyone(), [substring(1, 2), rng.choice(common)], None),
        "no match": lambda: (anyone(), [gibberish()], None),
        "empty (newest first)": lambda: (anyone(), [], None),
        "owner, no terms": lambda: (anyone(), [], anyone().username),
        "owner + common word": lambda: (anyone(), [rng.choice(common)], anyone().username),
        "auditor (big access list)": lambda: (auditor, [rng.choice(common + rare[:50])], None),
    }
    per_kind = max(1, count // len(kinds))
    queries = [Query(kind, *make()) for kind, make in kinds.items() for _ in range(per_kind)]
    rng.shuffle(queries)
    return queries


def time_queries(store: Store, users: list[User], queries: list[Query]) -> Timings:
    service = BrokerService(store, BrokerSettings(bcrypt_rounds=4))
    now = int(time.time())
    tokens: dict[int, str] = {}
    for user in users:
        tokens[user.id] = crypto.new_token()
        store.add_session(crypto.token_digest(tokens[user.id]), user.id, now + 86400, now)
    for user in users[::2]:  # half the owners online, for the hits' online flag
        store.set_online(user.id, "tcp://127.0.0.1:5000", now + 86400)
    timings = Timings()
    for number, query in enumerate(queries, 1):
        request = protocol.Search(tokens[query.caller.id], " ".join(query.terms), query.owner)
        frame = protocol.encode("search", request, number)

        def direct(query: Query = query) -> None:
            hits = store.search(query.caller.id, query.terms, query.owner, LIMIT, now)
            timings.hits.setdefault(query.kind, []).append(len(hits))
            timings.partial.setdefault(query.kind, []).append(hits.partial)

        def served(query: Query = query, frame: bytes = frame) -> None:
            reply = protocol.decode_envelope(
                service.handle(frame, query.caller.bundle.curve_public)
            )
            if reply.op != "result":
                raise BenchError(f"the broker refused a search: {reply}")

        # Each first in turn, so that neither always finds the caches warmed by the other.
        ways = [(direct, timings.store), (served, timings.service)]
        for call, into in ways if number % 2 else reversed(ways):
            started = time.perf_counter()
            call()
            into.setdefault(query.kind, []).append(time.perf_counter() - started)
        if number % 50 == 0:
            progress(f"searched {number} / {len(queries)}")
    return timings


def warm_page_cache(folder: Path) -> None:
    """Read the database once, so that the first search to touch a page does not wait
    for the disk (some VMs drop the page cache, and their disks are slow)."""
    for path in (p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


# --- the report ------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: with 30 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def render(
    args: argparse.Namespace, timings: Timings, setup: dict[str, str], store_class: str
) -> str:
    lines = [
        f"## Search: {args.files:,} files, {store_class}",
        "",
        f"{args.files:,} files from {USERS} users in one `{store_class}`"
        f" ({setup['database']}), {sum(map(len, timings.store.values()))} searches of"
        f" {len(timings.store)} kinds, limit {LIMIT}, in random order. Times in ms;"
        f" `store` is `{store_class}.search`, `handle` the whole request through"
        " `BrokerService.handle` (decode, session, search, encode); `partial`: the searches"
        f" that stopped at the budget of {SEARCH_BUDGET:,} files examined.",
        "",
        "| kind | n | store p50 | store p99 | store max | handle p50 | handle p99 | handle max"
        " | hits (median) | partial |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    everything: tuple[list[float], list[float]] = ([], [])
    for kind in sorted(timings.store, key=lambda k: -percentile(timings.store[k], 99)):
        store, service = timings.store[kind], timings.service[kind]
        everything[0].extend(store)
        everything[1].extend(service)
        lines.append(
            f"| {kind} | {len(store)} | {ms(percentile(store, 50))} | {ms(percentile(store, 99))}"
            f" | {ms(max(store))} | {ms(percentile(service, 50))} | {ms(percentile(service, 99))}"
            f" | {ms(max(service))}"
            f" | {percentile([float(h) for h in timings.hits[kind]], 50):.0f}"
            f" | {sum(timings.partial[kind])} |"
        )
    store_all, service_all = everything
    lines.append(
        f"| **all** | {len(store_all)} | {ms(percentile(store_all, 50))}"
        f" | **{ms(percentile(store_all, 99))}** | **{ms(max(store_all))}**"
        f" | {ms(percentile(service_all, 50))} | **{ms(percentile(service_all, 99))}**"
        f" | **{ms(max(service_all))}** | |"
        f" {sum(sum(p) for p in timings.partial.values())} |"
    )
    lines += ["", *(f"- {key}: {value}" for key, value in setup.items() if key != "database")]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    """The markdown section; `args.files`, `args.queries`, `args.seed`, `args.blind_only`
    (with defaults, since `python -m bench` passes its own arguments)."""
    args.files = getattr(args, "files", DEFAULT_FILES)
    args.queries = getattr(args, "queries", DEFAULT_QUERIES)
    if getattr(args, "no_blind", False):
        return run_main(args)
    blind = run_blind(getattr(args, "seed", 1), getattr(args, "postgres", False))
    if getattr(args, "blind_only", False):
        return f"## Search\n\n{blind}"
    return run_main(args) + "\n" + blind


@contextmanager
def work_folder(keep: Path | None, files: int, seed: int) -> Iterator[Path]:
    """A temporary folder, or `keep`/<files>-<seed> kept for the next run."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="sfs-bench-search-") as tmp:
            yield Path(tmp)
        return
    folder = keep / f"{files}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def filled_store(
    folder: Path, files: int, rng: random.Random
) -> tuple[SqliteStore, Corpus, list[User], float]:
    """The SQLite store in `folder`, filled with `files` files: made now, or as a kept
    folder holds it (`filled.pickle`: what filling it left, the rng included, so that the
    queries are those a fresh run makes)."""
    path, done = folder / "broker.db", folder / "filled.pickle"
    if done.exists():
        fields, users, state, filled = pickle.loads(done.read_bytes())  # noqa: S301 (our file)
        rng.setstate(state)
        return SqliteStore(path), Corpus(*fields), users, filled
    path.unlink(missing_ok=True)
    store = SqliteStore(path)
    corpus = make_corpus(rng)
    started = time.perf_counter()
    users = fill(store, files, rng, corpus)
    filled = time.perf_counter() - started
    # The corpus as plain fields: its class may be __main__'s in one run, not the next.
    fields = (corpus.vocabulary, corpus.cum_weights, corpus.names)
    done.write_bytes(pickle.dumps((fields, users, rng.getstate(), filled)))
    return store, corpus, users, filled


def run_main(args: argparse.Namespace) -> str:
    seed = getattr(args, "seed", 1)
    rng = random.Random(seed)  # noqa: S311 (made-up data, not secrets)
    keep = getattr(args, "keep", None)
    with work_folder(keep, args.files, seed) as tmp:
        path = tmp / "broker.db"
        load = os.getloadavg()
        store, corpus, users, filled = filled_store(tmp, args.files, rng)
        try:
            queries = make_queries(rng, corpus, users, args.queries)
            warm_page_cache(tmp)
            # The filling's garbage out of the way: a collection of it would land in a search.
            gc.collect()
            gc.freeze()
            sqlite_too = not getattr(args, "postgres_only", False)
            if sqlite_too:
                time_queries(store, users, queries[:50])  # warm SQLite's caches
                timings = time_queries(store, users, queries)
            gc.unfreeze()
            size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
            if getattr(args, "postgres", False) or not sqlite_too:
                with on_postgres(path, tmp / "pg" if keep else None) as postgres:
                    time_queries(postgres, users, queries[:50])
                    on_server = time_queries(postgres, users, queries)
        finally:
            store.close()
    per_kind = len(queries) // len({query.kind for query in queries})
    setup = {
        "database": f"{size / 2**20:,.0f} MiB on disk with its WAL",
        "fill": f"{filled:.0f} s ({args.files / filled:,.0f} files/s, batches of {BATCH:,}"
        " rows per transaction, through the store's connection and its triggers)",
        "SQLite": sqlite3.sqlite_version,
        "load average before / after": f"{fmt_load(load)} / {fmt_load(os.getloadavg())}",
        "method": "the database file is read once first (page cache warm); p99 is the"
        f" nearest rank: with {per_kind} searches per kind, the slowest",
    }
    report = render(args, timings, setup, "SqliteStore") if sqlite_too else ""
    if getattr(args, "postgres", False) or not sqlite_too:
        setup["database"] = "a throwaway cluster on this machine, fsync off"
        setup["fill"] = "copied from the SQLite store (sfs-broker migrate's copy_index)"
        del setup["SQLite"]
        report += "\n" + render(args, on_server, setup, "PostgresStore")
    return report


@contextmanager
def on_postgres(source: Path, keep: Path | None = None) -> Iterator[PostgresStore]:
    """The SQLite index at `source`, copied into a throwaway PostgreSQL cluster; or, with
    `keep`, into a cluster kept in that folder (copied the first time, reused after)."""
    from tests.postgres import Cluster, find_bindir  # with pytest: only for --postgres

    bindir = find_bindir()
    if bindir is None:
        raise BenchError("--postgres needs initdb and pg_ctl (Debian: apt install postgresql)")
    if keep is not None:
        with kept_cluster(bindir, keep) as (url, copied):
            store = PostgresStore(url)
            try:
                if not copied.exists():
                    progress("copying the index into PostgreSQL (kept for the next run)")
                    copy_index(source, store)
                    copied.touch()
                with psycopg.connect(url, autocommit=True) as db:  # as warm_page_cache
                    # As autovacuum does after a migration or a copy: the visibility map
                    # lets a walk of file_trigrams read its index alone.
                    db.execute("VACUUM")
                    db.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
                    db.execute(
                        "SELECT pg_prewarm(c.oid) FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
                        " AND c.relkind IN ('r', 'i') AND c.relname <> 'file_trigrams'"
                    )
                yield store
            finally:
                store.close()
        return
    cluster = Cluster(bindir)
    try:
        cluster.start()
        with cluster.database() as url:
            store = PostgresStore(url)
            try:
                progress("copying the index into PostgreSQL")
                copy_index(source, store)
                yield store
            finally:
                store.close()
    finally:
        cluster.stop()


@contextmanager
def kept_cluster(bindir: Path, folder: Path) -> Iterator[tuple[str, Path]]:
    """A cluster whose data stays in `folder` (made the first time, started each run,
    stopped after it); its database's URL, and the file that says the copy is done."""
    from tests.postgres import Cluster, _free_port

    cluster = Cluster(bindir)
    cluster.base.rmdir()
    cluster.base = folder
    if not (folder / "data").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        cluster.start()  # initdb, then started again below with the shared buffers
        cluster._run(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-w", "stop")
    cluster._run(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-l",
                 str(folder / "log"), "-o", f"-p {_free_port()} -k {folder}"
                 " -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
                 f" -c shared_buffers={KEPT_SHARED_BUFFERS}", "-w", "start")  # fmt: skip
    cluster.port = int((folder / "data" / "postmaster.pid").read_text().splitlines()[3])
    try:
        # Its ctype decides which characters pg_trgm indexes: with C, none but ASCII.
        with psycopg.connect(cluster.url(), autocommit=True) as db:
            if not db.execute("SELECT 1 FROM pg_database WHERE datname = 'bench'").fetchone():
                db.execute(
                    "CREATE DATABASE bench TEMPLATE template0 ENCODING 'UTF8'"
                    " LC_COLLATE 'C' LC_CTYPE 'C.UTF-8'"
                )
        yield cluster.url("bench"), folder / "copied"
    finally:
        cluster._run(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop")


# --- a caller who can see nothing ------------------------------------------------------------


def run_blind(seed: int, postgres: bool = False) -> str:
    """The markdown subsection: `BLIND_FILES` private files of other users, searched by
    the one user on none of their access lists (on PostgreSQL too with `postgres`)."""
    rng = random.Random(seed)  # noqa: S311 (made-up data, not secrets)
    results: dict[str, Timings] = {}
    with tempfile.TemporaryDirectory(prefix="sfs-bench-search-blind-") as tmp:
        store = SqliteStore(Path(tmp) / "broker.db")
        try:
            load = os.getloadavg()
            users = fill(
                store, BLIND_FILES, rng, make_corpus(rng), private_share=1.0, auditor_share=0.0
            )
            outsider = users[-1]  # `auditor`: here on no access list, and owns nothing
            kinds = [
                Query("empty", outsider, []),
                Query(f"eight one-letter terms (`{' '.join(ONE_LETTER_TERMS)}`)", outsider,
                      ONE_LETTER_TERMS),
            ]  # fmt: skip
            warm_page_cache(Path(tmp))
            gc.collect()
            gc.freeze()
            time_queries(store, users, kinds * 3)  # warm SQLite's caches
            results["SqliteStore"] = time_queries(store, users, kinds * BLIND_REPEATS)
            gc.unfreeze()
            if postgres:
                with on_postgres(Path(tmp) / "broker.db") as on_server:
                    time_queries(on_server, users, kinds * 3)
                    results["PostgresStore"] = time_queries(on_server, users, kinds * BLIND_REPEATS)
        finally:
            store.close()
    if any(any(counts) for timings in results.values() for counts in timings.hits.values()):
        raise BenchError("the outsider found files: the blind scenario is not blind")
    lines = [
        f"### A caller who can see none of {BLIND_FILES:,} files",
        "",
        f"{BLIND_FILES:,} files of {USERS - 1} users, every one private (an access list of"
        " up to 5 of the others), searched by a user on none of the lists who owns nothing:"
        " the index of readers has no file for it, so each search reads none and answers"
        f" nothing, not partial. {BLIND_REPEATS} searches of each kind, alternating, after a"
        " warm-up. Times in ms, columns as above.",
        "",
        "| store | query | n | store p50 | store p99 | store max | handle p50 | handle p99"
        " | handle max | hits | partial |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for store_class, timings in results.items():
        for query in kinds:
            store_times, served = timings.store[query.kind], timings.service[query.kind]
            lines.append(
                f"| {store_class} | {query.kind} | {len(store_times)}"
                f" | {ms(percentile(store_times, 50))} | {ms(percentile(store_times, 99))}"
                f" | {ms(max(store_times))} | {ms(percentile(served, 50))}"
                f" | {ms(percentile(served, 99))} | {ms(max(served))} | 0"
                f" | {sum(timings.partial[query.kind])} |"
            )
    lines += ["", f"- load average before / after: {fmt_load(load)} / {fmt_load(os.getloadavg())}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=DEFAULT_FILES, help="files to index")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="searches to time")
    parser.add_argument("--seed", type=int, default=1, help="for the generated data")
    parser.add_argument(
        "--blind-only",
        action="store_true",
        help=f"only the caller who sees none of {BLIND_FILES:,} private files",
    )
    parser.add_argument(
        "--postgres", action="store_true", help="also on a throwaway PostgreSQL cluster"
    )
    parser.add_argument(
        "--postgres-only", action="store_true", help="time PostgreSQL alone (not SQLite)"
    )
    parser.add_argument("--no-blind", action="store_true", help="leave out the blind caller")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="build the stores (and the PostgreSQL cluster) in DIR once and reuse them",
    )
    print(run(parser.parse_args()), end="")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
