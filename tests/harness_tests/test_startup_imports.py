"""`sfs-peer` starts fast because each command imports only what it uses (issue 12, "Start
fast"). Real processes run with `python -X importtime`, which lists every module they
import; a heavy module on a path that does not need it fails the test. Timing is left to
bench/startup.py: these tests do not depend on how loaded the machine is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Cluster

pytestmark = pytest.mark.harness

# Never needed by a command that only reads, downloads or prints: the broker side, the
# holder side (`serve`), asyncio (pulled in by zmq.utils.monitor), pydantic (typer's
# coercion), the databases and the test tools.
NEVER_ON_A_LIGHT_PATH = (
    "asyncio",
    "pydantic",
    "hypothesis",
    "psycopg",
    "psycopg_pool",
    "sfs.broker",
    "sfs.peer.server",
    "sfs.peer.seeds",
    "sfs.peer.requesters",
    "sfs.peer.reads",
    "sfs.peer.tree_scan",
    "zmq.auth",
)
# Not even needed to parse a command line or print help.
NOT_TO_PARSE = (
    *NEVER_ON_A_LIGHT_PATH,
    "cryptography",
    "nacl",
    "bcrypt",
    "zmq",
    "yaml",
    "msgpack",
    "sqlite3",
    "rich.progress",
    "sfs.common.crypto",
    "sfs.common.config",
    "sfs.peer.node",
    "sfs.peer.download",
)


def imported_by(args: list[str], cwd: Path | None = None) -> set[str]:
    """The modules a real `sfs-peer ARGS` imports (checked to have run)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sfs.peer", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    } - {"package"}  # the header line


def heavy(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


def test_importing_the_cli_imports_no_heavy_module() -> None:
    code = "import sys, sfs.peer.cli; print('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(done.stdout.split())
    assert "sfs.peer.cli" in modules
    assert heavy(modules, NOT_TO_PARSE) == []


@pytest.mark.parametrize("args", [["--help"], ["get", "--help"], ["share", "--help"]])
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    assert heavy(imported_by(args), NOT_TO_PARSE) == []


def test_version_imports_only_the_protocol_module_on_top() -> None:
    assert heavy(imported_by(["--version"]), NEVER_ON_A_LIGHT_PATH) == []


def test_a_get_imports_neither_the_holder_side_nor_pydantic_nor_asyncio() -> None:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        small = cluster.root / "small.txt"
        small.write_bytes(b"start fast\n" * 100)
        file_id = alice.share(small)
        args = ["get", file_id, "--json", "--config", str(bob.config)]
        modules = imported_by(args, cwd=cluster.root)
        assert (bob.download_dir / "small.txt").read_bytes() == small.read_bytes()
        assert "sfs.peer.download" in modules  # it did download
        assert heavy(modules, NEVER_ON_A_LIGHT_PATH) == []
        whoami = imported_by(["whoami", "--config", str(bob.config)], cwd=cluster.root)
        assert heavy(whoami, (*NEVER_ON_A_LIGHT_PATH, "sfs.peer.download")) == []
