"""`make demo`: a broker and three peers on loopback, run as real processes.

alice shares one file with everyone and one only with bob; bob finds and downloads
both and the SHA-256 matches; carol is refused the private one; alice shares a folder
and bob gets the same tree; fingerprints are shown.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel

from tests.harness import Cluster, Peer, Result

console = Console(highlight=False, soft_wrap=True)


def step(title: str) -> None:
    console.print(f"\n[bold cyan]== {title}[/]")


def show(peer: Peer, *args: str) -> Result:
    """Run a command and print it with its output, like a terminal session."""
    console.print(f"[dim]{peer.name}$[/] sfs-peer {' '.join(args)}")
    result = peer.run(*args)
    for line in (result.stdout + result.stderr).rstrip().splitlines():
        console.print(f"  {line}", markup=False, soft_wrap=True)
    return result


def quietly(peer: Peer, *args: str) -> dict[str, Any]:
    """Run a command with --json and print only the command line."""
    console.print(f"[dim]{peer.name}$[/] sfs-peer {' '.join(args)} --json")
    document: dict[str, Any] = peer.run(*args, "--json").check().json()
    return document


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def make_course(root: Path) -> Path:
    """A small folder: nested folders, an empty one, an executable script, non-ASCII."""
    course = root / "course"
    (course / "week 1" / "slides").mkdir(parents=True)
    (course / "week 2").mkdir()
    (course / "week 1" / "notes.txt").write_text("read chapter 1\n")
    (course / "week 1" / "slides" / "café.pdf").write_bytes(os.urandom(300_000))
    run = course / "run.sh"
    run.write_text("#!/bin/sh\necho hello\n")
    run.chmod(0o755)
    return course


def tree_of(folder: Path) -> dict[str, tuple[str, int]]:
    """Each path in a tree: its content's SHA-256 (files) and its permission bits."""
    return {
        str(path.relative_to(folder)): (
            sha256(path) if path.is_file() else "folder",
            path.stat().st_mode & 0o777,
        )
        for path in sorted(folder.rglob("*"))
    }


def main() -> int:
    with Cluster(columns=max(console.width - 2, 100)) as cluster:
        step("a broker on loopback")
        cluster.start_broker()
        console.print(f"  sfs-broker serving on {cluster.broker_endpoint}")

        step("three users make their keys and register")
        users = {}
        for name in ("alice", "bob", "carol"):
            users[name] = cluster.add_peer(name)
            whoami = users[name].run("whoami", "--json").check().json()
            console.print(f"  {name:6} fingerprint {whoami['fingerprint']}")
        alice, bob, carol = users["alice"], users["bob"], users["carol"]

        step("alice serves her files")
        alice.serve()
        console.print("  sfs-peer serve (alice) is online")

        public = cluster.root / "field-notes.bin"
        public.write_bytes(os.urandom(8 * 1024 * 1024 + 12345))
        private = cluster.root / "budget-2027.txt"
        private.write_text("for bob's eyes only\n" * 1000)

        step("alice shares one file with everyone and one only with bob")
        show(alice, "share", str(public), "--keyword", "fieldwork").check()
        show(alice, "share", str(private), "--to", "bob").check()
        ids = {share["name"]: share["file_id"] for share in quietly(alice, "list")}
        public_id, private_id = ids[public.name], ids[private.name]

        step("bob searches and downloads both")
        show(bob, "search").check()
        ok = True
        for file_id, original in ((public_id, public), (private_id, private)):
            got = quietly(bob, "get", file_id)
            match = sha256(original) == sha256(Path(got["path"]))
            ok &= match
            console.print(
                f"  saved {got['path']} ({got['size']} bytes in {got['seconds']} s); SHA-256 "
                + ("[green]matches the original[/]" if match else "[red]DOES NOT MATCH[/]")
            )

        step("carol sees only the public file, and is refused the private one")
        show(carol, "search").check()
        refused = show(carol, "get", private_id)
        ok &= refused.returncode != 0 and not any(carol.download_dir.glob("budget*"))
        console.print(f"  refused with exit code {refused.returncode}; nothing written for carol")

        step("alice shares a folder; bob gets the same tree")
        course = make_course(cluster.root)
        show(alice, "share", str(course)).check()
        ids = {share["name"]: share["file_id"] for share in quietly(alice, "list")}
        got = quietly(bob, "get", ids[course.name])
        same = tree_of(course) == tree_of(Path(got["path"]))
        ok &= same
        console.print(
            f"  saved {got['path']} ({got['files']} files); every file and mode "
            + ("[green]matches the original[/]" if same else "[red]DOES NOT MATCH[/]")
        )

        step("fingerprints bob pinned on first use")
        show(bob, "peers").check()

        console.print(
            Panel(
                "[green]demo finished: encrypted, signed, verified, refused where it should be[/]"
                if ok
                else "[red]demo failed[/]",
                expand=False,
            )
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
