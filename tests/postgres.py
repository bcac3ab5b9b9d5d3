"""A throwaway PostgreSQL cluster from the machine's own binaries, for the tests.

`initdb` and `pg_ctl` refuse to run as root, so as root they run as the `postgres`
user (`runuser`), in a temporary folder it owns. The server listens on 127.0.0.1 on a
free port, with its socket in that folder, durability off (a test cluster lives
seconds), and is stopped and removed afterwards. `sfs` is its superuser, trusted
without a password.

Without the binaries the tests that need a server skip, saying why; with
SFS_REQUIRE_POSTGRES=1 (set by .ci/run) that is a failure instead, so CI never skips them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

REQUIRE = "SFS_REQUIRE_POSTGRES"


def find_bindir() -> Path | None:
    """The folder of `initdb` and `pg_ctl`: Debian's newest, else the ones on PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason} ({REQUIRE}=1: PostgreSQL tests must run)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """A running cluster; `database()` makes an empty database and gives its URL."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_postgres = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="sfs-pg-"))
        self.port = 0
        self._names = itertools.count()

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        done = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            log = self.base / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()}\n{tail}")

    def start(self) -> None:
        if self.as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        data = str(self.base / "data")
        self._run(
            str(self.bindir / "initdb"),
            *("-D", data, "-A", "trust", "-U", "sfs", "-E", "UTF8", "--no-locale", "--no-sync"),
        )
        for attempt in range(3):  # a free port can be taken before the server binds it
            self.port = _free_port()
            options = (
                f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
                " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
            )
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    *("-D", data, "-o", options, "-l", str(self.base / "log"), "-w", "start"),
                )
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://sfs@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(sql)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        name = f"t{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self._admin(f"DROP DATABASE {name} WITH (FORCE)")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if (self.base / "data" / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m",
                          "immediate", "-w", "stop")  # fmt: skip
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    bindir = find_bindir()
    if bindir is None:
        unavailable(
            "PostgreSQL is not installed (no initdb/pg_ctl; Debian: apt install postgresql)"
        )
        raise AssertionError("unreachable")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run initdb as")
    cluster = Cluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
