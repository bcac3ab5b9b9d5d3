"""`sfs-peer`: one user's identity, shares, searches and downloads."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from sfs.common import crypto
from sfs.common.cli import (
    ConfigOption,
    DebugOption,
    JsonOption,
    command,
    install_signal_handlers,
    new_app,
    print_json,
    printable,
    run,
    stderr,
    stdout,
)
from sfs.common.config import PeerConfig, load_peer_config
from sfs.common.errors import UsageError
from sfs.common.identity import format_fingerprint, parse_fingerprint
from sfs.peer import tables
from sfs.peer.bars import Bar, holders_text, new_progress
from sfs.peer.download import DownloadProgress
from sfs.peer.node import AlreadyDownloaded, Peer
from sfs.peer.pins import ConfirmReplace, Pin
from sfs.peer.registry import Share
from sfs.peer.share import shareable_file
from sfs.peer.tables import Column

app = new_app("An sfs peer: share files, find them, and download them directly from their owners.")

PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


PASSPHRASE_ENV = "SFS_PASSPHRASE"  # noqa: S105 (the name of a variable, not a secret)


CONFIRM_TRIES = 3  # a new password or passphrase typed twice that does not match


def _peer(config: Path) -> Peer:
    settings = load_peer_config(config)
    return Peer(settings, passphrase=lambda: _passphrase(settings))


def _ask_secret(prompt: str) -> str:
    """A hidden prompt on the terminal; Ctrl-D (end of input) is a clear refusal."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the prompt's line before the error
        raise UsageError("cancelled at the prompt (end of input); nothing was done") from None


def _keys_of(settings: PeerConfig) -> str:
    return f"{settings.username}'s private keys ({settings.data_dir / 'keys'})"


def _passphrase(settings: PeerConfig) -> bytes | None:
    """The passphrase of encrypted keys: from SFS_PASSPHRASE, else asked on the terminal."""
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        return None
    return _ask_secret(f"passphrase for {_keys_of(settings)}: ").encode() or None


def _new_secret(what: str, prompt: str) -> str:
    """Asked twice; asked again (up to CONFIRM_TRIES times) when the two differ."""
    for _ in range(CONFIRM_TRIES):
        secret = _ask_secret(prompt)
        if not secret:
            raise UsageError(f"the {what} is empty")
        if _ask_secret(f"{what} again: ") == secret:
            return secret
        print(f"the two {what}s do not match; try again", file=sys.stderr)
    raise UsageError(f"the {what}s did not match ({CONFIRM_TRIES} tries); nothing was done")


def _new_passphrase(settings: PeerConfig) -> bytes:
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for a passphrase; set {PASSPHRASE_ENV}")
    return _new_secret("passphrase", f"new passphrase for {_keys_of(settings)}: ").encode()


def _password(settings: PeerConfig, from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UsageError("--password-stdin: nothing on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for a password; use --password-stdin")
    prompt = f"password for {settings.username} at {settings.broker_endpoint}: "
    return _new_secret("password", prompt) if confirm else _ask_secret(prompt)


@contextlib.contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Bar | None]:
    """A rich progress bar on stderr (only on a terminal, and not with --json)."""
    if not enabled or not stderr.is_terminal:
        yield None
        return
    with new_progress(stderr) as progress:
        yield Bar(progress, label)


@contextlib.contextmanager
def _download_progress(enabled: bool) -> Iterator[DownloadProgress | None]:
    """The download's bar: bytes, rate, time left, how many holders are sending, and
    who is waited for when nothing comes."""
    with _progress("connecting to the holders", enabled) as bar:
        if bar is None:
            yield None
            return
        bar.waiting_for("no holder answers yet")
        shown: list[str] | None = None

        def update(done: int, total: int, holders: list[str]) -> None:
            nonlocal shown
            if holders != shown:
                shown = holders
                sending = holders_text(holders)
                bar.describe(f"from {sending}" if holders else "connecting to the holders")
                bar.waiting_for(f"waiting for {sending}" if holders else "no holder answers yet")
            bar(done, total)

        yield update


def _size(size: int) -> str:
    return tables.size_text(size)  # binary units, as the progress bars show them


def _when(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


WideOption = Annotated[
    bool, typer.Option("--wide", help="Full ids and fingerprints, and every column.")
]


FolderOption = Annotated[
    Path | None,
    typer.Option("--folder", help="The download folder to look in (default: download_dir)."),
]


def _print_table(
    columns: list[Column],
    rows: list[list[str]],
    *,
    wide: bool,
    empty: str,
    shortened: str | None = None,
) -> None:
    """Laid out for the terminal; piped, one tab-separated record per line (full ids)."""
    if not rows:
        # Piped, no records is no output: the note goes where a person reads it.
        print(empty, file=sys.stdout if stdout.is_terminal else sys.stderr)
        return
    if not stdout.is_terminal:
        for record in tables.piped(columns, rows):
            print(record)
        return
    lines, dropped = tables.laid_out(columns, rows, stdout.width, wide)
    for line in lines:
        stdout.print(line, soft_wrap=True)
    left_out = ([shortened] if shortened else []) + dropped
    if not wide and left_out:
        stdout.print(Text(f"(--wide shows {', '.join(left_out)})", style="dim"), soft_wrap=True)


def _ids(ids: list[str], wide: bool) -> dict[str, str]:
    """Short unique prefixes on a terminal; full ids with --wide and in pipes."""
    if wide or not stdout.is_terminal:
        return {i: i for i in ids}
    return tables.short_ids(ids)


def _shortened(ids: dict[str, str]) -> str | None:
    return "full ids" if any(full != shown for full, shown in ids.items()) else None


def _share_json(share: Share, me: str) -> dict[str, object]:
    return {
        "file_id": share.file_id,
        "name": share.name,
        "size": share.size,
        "path": str(share.path),
        "access": share.access,
        "keywords": share.keywords,
        "shared_at": share.shared_at,
        "owner": share.owner or me,  # another user's name: a seeded copy
    }


# --- identity and account ---------------------------------------------------------------


@app.command()
@command
def init(
    config: ConfigOption,
    passphrase: Annotated[
        bool,
        typer.Option(
            "--passphrase",
            help=f"Encrypt the private keys with a passphrase (asked, or from {PASSPHRASE_ENV}).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Make this user's keys and show the fingerprint (RSA-3072 and Curve25519)."""
    with _peer(config) as peer:
        wanted = passphrase or os.environ.get(PASSPHRASE_ENV)
        secret = _new_passphrase(peer.config) if wanted else None
        identity = peer.init(secret)
        stdout.print(f"created the identity of {identity.username} in {peer.config.data_dir}")
        if secret:
            stdout.print("the private keys are encrypted with your passphrase")
        stdout.print(f"fingerprint: {format_fingerprint(identity.fingerprint)}")


@app.command()
@command
def register(
    config: ConfigOption, password_stdin: PasswordStdin = False, debug: DebugOption = False
) -> None:
    """Register this user and its public keys at the broker (and log in)."""
    with _peer(config) as peer:
        peer.check_not_registered()  # before asking for a password it would not need
        result = peer.register(_password(peer.config, password_stdin, confirm=True))
        stdout.print(f"registered {result.username} and logged in")


@app.command()
@command
def login(
    config: ConfigOption, password_stdin: PasswordStdin = False, debug: DebugOption = False
) -> None:
    """Log in to the broker; the session is kept in the data folder."""
    with _peer(config) as peer:
        result = peer.login(_password(peer.config, password_stdin))
        stdout.print(f"logged in as {result.username}")


@app.command()
@command
def logout(config: ConfigOption, debug: DebugOption = False) -> None:
    """End the session at the broker."""
    with _peer(config) as peer:
        peer.logout()
        stdout.print("logged out")


@app.command()
@command
def whoami(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """Show the username, the fingerprint and whether a session is open."""
    with _peer(config) as peer:
        me = peer.whoami()
    if json:
        print_json(me.__dict__)
        return
    stdout.print(f"username:    {me.username}")
    stdout.print(f"fingerprint: {me.fingerprint}")
    stdout.print(f"session:     {'logged in' if me.logged_in else 'not logged in'}")


# --- serving ------------------------------------------------------------------------------


@app.command()
@command
def serve(config: ConfigOption, debug: DebugOption = False) -> None:
    """Serve this user's shares and stay online at the broker, until Ctrl-C or SIGTERM."""
    if not debug:
        logging.getLogger("sfs").setLevel(logging.INFO)
    stop = threading.Event()
    install_signal_handlers(stop.set)

    def ready(endpoint: str) -> None:
        # One line on stdout that scripts can wait for.
        print(f"serving on {endpoint}", flush=True)

    with _peer(config) as peer:
        peer.serve(stop, ready)
    logging.getLogger("sfs.peer").info("stopped")


# --- sharing ------------------------------------------------------------------------------


@app.command()
@command
def share(
    config: ConfigOption,
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATH...", help="The files to share (one id each).", show_default=False
        ),
    ],
    keyword: Annotated[
        list[str] | None,
        typer.Option("--keyword", "-k", metavar="WORD", help="A search keyword (repeat)."),
    ] = None,
    to: Annotated[
        list[str] | None,
        typer.Option(
            "--to", metavar="USER", help="Share only with this user (repeat); default: everyone."
        ),
    ] = None,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Share files with everyone, or only with --to users; one file id each.

    Each file's manifest is signed and registered at the broker. Every PATH is checked
    before any is shared. With --json: one object for one PATH, a list for several."""
    with _peer(config) as peer:
        me = peer.config.username
        sources = [shareable_file(path) for path in paths]  # all checked before any is shared
        documents = []
        for source in sources:
            with _progress("hashing", not json) as progress:
                shared = peer.share(source, keyword or [], to or [], progress)
            if json:
                documents.append(_share_json(shared, me))
                continue
            stdout.print(f"shared {shared.name} ({_size(shared.size)}) with {_audience(shared)}")
            stdout.print(f"file id: {shared.file_id}")
    if json:
        print_json(documents[0] if len(documents) == 1 else documents)


def _audience(share: Share) -> str:
    if share.access is None:
        return "everyone"
    return ", ".join(share.access) or "nobody else (only you: --to names other users)"


@app.command()
@command
def unshare(
    config: ConfigOption,
    file_id: Annotated[str, typer.Argument(metavar="FILE_ID", show_default=False)],
    debug: DebugOption = False,
) -> None:
    """Stop sharing a file, or seeding a downloaded copy.

    FILE_ID may be the first 8 or more characters of the id, if no other file of
    yours starts with them.
    """
    with _peer(config) as peer:
        whole = peer.unshare(file_id)
    stdout.print(f"stopped sharing {whole}")


@app.command(name="list")
@command
def list_shares(
    config: ConfigOption,
    partial: Annotated[
        bool, typer.Option("--partial", help="List the unfinished downloads instead.")
    ] = False,
    folder: FolderOption = None,
    wide: WideOption = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List the files this user shares, and the downloads it seeds."""
    if partial:
        _list_unfinished(config, folder, wide, json)
        return
    with _peer(config) as peer:
        shares = peer.shares()
        unfinished = [] if json or not stdout.is_terminal else peer.unfinished(folder)
    if json:
        print_json([_share_json(s, peer.config.username) for s in shares])
        return
    ids = _ids([s.file_id for s in shares], wide)
    columns = [
        Column("file id"),
        Column("name", wraps=True, least=28),
        Column("size", right=True),
        Column("owner", keep=2),
        Column("shared with", keep=1, wraps=True),
        Column("keywords", keep=4, wraps=True),
        Column("path", keep=3, wraps=True, least=20),
    ]
    rows = [
        [
            ids[s.file_id],
            s.name,
            _size(s.size),
            s.owner or "me",
            ", ".join(s.access) if s.access is not None else "everyone",
            ", ".join(s.keywords),
            str(s.path),
        ]
        for s in shares
    ]
    _print_table(columns, rows, wide=wide, empty="no shared files", shortened=_shortened(ids))
    if unfinished:
        count = len(unfinished)
        stdout.print(
            f"{count} unfinished download{'' if count == 1 else 's'}"
            f" ({_size(sum(u.size for u in unfinished))}): `sfs-peer list --partial` shows"
            " them, `sfs-peer get FILE_ID` resumes one, `sfs-peer clean` removes abandoned ones",
            soft_wrap=False,
        )


def _age(seconds: float) -> str:
    for unit, length in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"


def _list_unfinished(config: Path, folder: Path | None, wide: bool, json: bool) -> None:
    with _peer(config) as peer:
        found = peer.unfinished(folder)
    now = time.time()
    if json:
        print_json(
            [
                {
                    "file_id": u.file_id,
                    "path": str(u.path),
                    "bytes": u.size,
                    "modified": int(u.modified),
                    "in_use": u.in_use,
                }
                for u in found
            ]
        )
        return
    ids = _ids([u.file_id for u in found], wide)
    columns = [
        Column("file id"),
        Column("on disk", right=True),
        Column("last written"),
        Column("state", keep=1),
        Column("path", keep=2, wraps=True),
    ]
    rows = [
        [
            ids[u.file_id],
            _size(u.size),
            _age(now - u.modified),
            "downloading" if u.in_use else "stopped",
            str(u.path),
        ]
        for u in found
    ]
    empty = "no unfinished downloads"
    _print_table(columns, rows, wide=wide, empty=empty, shortened=_shortened(ids))


@app.command()
@command
def clean(
    config: ConfigOption,
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than",
            help="Only those not written for this many days (0: all that no `get` is writing).",
        ),
    ] = 7,
    folder: FolderOption = None,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove abandoned unfinished downloads (`.sfs-*.part` files)."""
    with _peer(config) as peer:
        done = peer.clean(older_than, folder)
    if json:
        print_json(
            {
                "removed": [str(u.path) for u in done.removed],
                "bytes_freed": sum(u.size for u in done.removed),
                "kept_in_use": [str(u.path) for u in done.kept_in_use],
                "kept_recent": [str(u.path) for u in done.kept_recent],
            }
        )
        return
    for u in done.removed:
        print(f"removed {u.path} ({_size(u.size)})")
    freed = _size(sum(u.size for u in done.removed))
    stdout.print(f"removed {len(done.removed)} unfinished download(s), {freed} freed")
    if done.kept_in_use:
        stdout.print(f"kept {len(done.kept_in_use)} that a running `get` is writing")
    if done.kept_recent:
        stdout.print(
            f"kept {len(done.kept_recent)} written in the last {older_than:g} days"
            " (`--older-than 0` removes them too)"
        )


@app.command()
@command
def search(
    config: ConfigOption,
    words: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="WORD...",
            help="Words that names or keywords must all match.",
            show_default=False,
        ),
    ] = None,
    owner: Annotated[
        str | None, typer.Option("--owner", metavar="USER", help="Only this user's files.")
    ] = None,
    wide: WideOption = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Search the files shared with this user: every WORD must match (no quotes needed)."""
    with _peer(config) as peer:
        found = peer.find(" ".join(words or []), owner)
    hits = found.hits
    if json:
        print_json({"hits": [hit.__dict__ for hit in hits], "partial": found.partial})
        return
    ids = _ids([hit.file_id for hit in hits], wide)
    columns = [
        Column("file id"),
        Column("name", wraps=True, least=28),
        Column("size", right=True),
        Column("owner", keep=1),
        Column("online", keep=1),
        Column("keywords", keep=3, wraps=True),
        Column("shared", keep=2),
    ]
    rows = [
        [
            ids[hit.file_id],
            hit.name,
            _size(hit.size),
            hit.owner,
            "yes" if hit.online else "no",
            ", ".join(hit.keywords),
            _when(hit.shared_at),
        ]
        for hit in hits
    ]
    _print_table(columns, rows, wide=wide, empty="no matching files", shortened=_shortened(ids))
    if found.partial:  # after the records, where a person reads it (piped: stderr)
        print("more may match: add a word", file=sys.stdout if stdout.is_terminal else sys.stderr)


@app.command()
@command
def get(
    config: ConfigOption,
    file_id: Annotated[str, typer.Argument(metavar="FILE_ID", show_default=False)],
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Folder to save into (default: download_dir)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Download even if the folder holds the file already (a second copy)."
        ),
    ] = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Download a file from its owner and seeders, verifying every chunk.

    Every chunk is checked against the owner's signed manifest. Chunks come from
    every online holder at once: the owner, and the seeders (peers that downloaded
    the file before). Stopped part way (Ctrl-C, holders gone), the verified chunks
    stay in a hidden .part file in the folder, and running the same command again
    resumes. A file already in the folder with the same content is not fetched again.
    FILE_ID may be the first 8 or more characters of the id, if no other file you
    can see starts with them.

    \b
    Example:
      sfs-peer search annual report
      sfs-peer get 0f3c9a1e5b7d42c68e0a9b1c2d3e4f50 --out ~/Downloads
    """
    with _peer(config) as peer, _download_progress(not json) as progress:
        known = {pin.username for pin in peer.peers()}
        result = peer.get(file_id, out, progress, force=force)
        first_contact = [pin for pin in peer.peers() if pin.username not in known]
    _first_contact(first_contact)
    if isinstance(result, AlreadyDownloaded):
        _already_downloaded(result, json)
        return
    if json:
        print_json(
            {
                "file_id": result.file_id,
                "path": str(result.path),
                "size": result.size,
                "sha256": result.sha256,
                "seconds": round(result.seconds, 3),
                "bytes": result.bytes_fetched,
                "holders": result.holders,
                "chunks_resumed": result.chunks_resumed,
                "seeding": result.seeding,
                "already_downloaded": False,
            }
        )
        return
    rate = result.bytes_fetched / result.seconds if result.seconds > 0 else 0.0
    sources = f"from {', '.join(result.holders)}" if result.holders else "all resumed"
    resumed = f", {result.chunks_resumed} chunks resumed" if result.chunks_resumed else ""
    stdout.print(
        f"saved {result.path} ({_size(result.size)} {sources}, {_size(int(rate))}/s{resumed})"
    )
    # The owner's signed whole-file hash: each chunk was checked against the same signed
    # manifest, but the whole file is not hashed again (that pass repeated those checks).
    stdout.print(f"sha256: {result.sha256} (owner-signed; every chunk verified)")
    if result.seeding:
        stdout.print("seeding: `sfs-peer serve` serves this copy too (`unshare` stops it)")


def _already_downloaded(present: AlreadyDownloaded, json: bool) -> None:
    if json:
        document = {**dataclasses.asdict(present), "path": str(present.path)}
        print_json({**document, "already_downloaded": True})
        return
    stdout.print(f"already downloaded: {present.path}")
    stdout.print(f"sha256: {present.sha256} (verified; --force downloads a second copy)")


# --- trust ----------------------------------------------------------------------------------


@app.command()
@command
def peers(
    config: ConfigOption,
    wide: WideOption = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List pinned fingerprints, and which were verified with a safety code."""
    with _peer(config) as peer:
        pins = peer.peers()
    if json:
        print_json(
            [
                {
                    "username": p.username,
                    "fingerprint": format_fingerprint(p.fingerprint),
                    "source": p.source,
                    "pinned_at": p.pinned_at,
                    "verified": p.verified,
                    "verified_at": p.verified_at,
                }
                for p in pins
            ]
        )
        return
    full = wide or not stdout.is_terminal
    columns = [
        Column("user", wraps=True),
        Column("fingerprint"),
        Column("verified"),
        Column("pinned", keep=2),
        Column("since", keep=1),
    ]
    rows = [
        [
            p.username,
            format_fingerprint(p.fingerprint) if full else tables.short_fingerprint(p.fingerprint),
            "yes" if p.verified else "no",
            p.source,
            _when(p.pinned_at),
        ]
        for p in pins
    ]
    shortened = None if full else "full fingerprints"
    _print_table(columns, rows, wide=wide, empty="no pinned peers yet", shortened=shortened)
    if not all(p.verified for p in pins) and stdout.is_terminal:
        stdout.print("compare safety codes with `sfs-peer verify USER` to verify a pin")


@app.command()
@command
def verify(
    config: ConfigOption,
    username: Annotated[str, typer.Argument(metavar="USER", show_default=False)],
    confirm: Annotated[
        bool,
        typer.Option(
            "--confirm", help="Mark the pin verified (after USER read you the same code)."
        ),
    ] = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Show the safety code to compare with USER (in person, or on a call)."""
    with _peer(config) as peer:
        done = peer.verify(username, confirm=confirm)
    pin = done.pin
    if json:
        print_json(
            {
                "username": pin.username,
                "fingerprint": format_fingerprint(pin.fingerprint),
                "safety_code": done.code,
                "verified": pin.verified,
                "verified_at": pin.verified_at,
                "pinned_now": done.pinned_now,
            }
        )
        return
    if done.pinned_now:
        stdout.print(f"pinned the key the broker serves for {username} (first use)")
    groups = done.code.split()
    half = len(groups) // 2
    stdout.print(f"safety code of you and {username} (they see the same):")
    stdout.print("  " + " ".join(groups[:half]))
    stdout.print("  " + " ".join(groups[half:]))
    if pin.verified and confirm:
        stdout.print(f"the pin of {username} is now marked verified")
    elif pin.verified:
        stdout.print(f"verified on {_when(pin.verified_at or 0)}")
    else:
        stdout.print(
            f"compare it with {username} in person or on a call (not in a message sent through"
            f" sfs); if it matches, run: sfs-peer verify {username} --confirm"
        )


@app.command()
@command
def trust(
    config: ConfigOption,
    username: Annotated[str, typer.Argument(metavar="USER", show_default=False)],
    fingerprint: Annotated[str, typer.Argument(show_default=False)],
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Replace a pin to another fingerprint (without it: refused, or asked).",
        ),
    ] = False,
    allow_unknown: Annotated[
        bool,
        typer.Option(
            "--allow-unknown",
            help="Pin even if the broker does not know USER, or cannot be asked"
            " (not logged in, not answering).",
        ),
    ] = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Pin USER to FINGERPRINT (after checking it with them another way)."""
    wanted = parse_fingerprint(fingerprint)
    # Asked only on a terminal: a script gets a refusal, never a prompt it cannot answer.
    ask = None if replace or json or not sys.stdin.isatty() else _ask_to_replace(wanted)
    with _peer(config) as peer:
        done = peer.trust(
            username, wanted, replace=replace, allow_unknown=allow_unknown, confirm=ask
        )
    previous = done.previous
    if json:
        print_json(
            {
                "username": done.username,
                "fingerprint": format_fingerprint(done.fingerprint),
                "previous": format_fingerprint(previous.fingerprint) if previous else None,
                "changed": done.changed,
                "broker": done.broker,
                "broker_fingerprint": format_fingerprint(done.served) if done.served else None,
            }
        )
    elif not done.changed:
        stdout.print(f"{username} was already pinned to {format_fingerprint(wanted)}")
    else:
        stdout.print(f"{username} is now pinned to {format_fingerprint(wanted)}")
        if previous is not None:
            stdout.print(f"replaced the pin to {_pin_text(previous)}")
    if done.broker == "same" and not json:
        stdout.print(f"the broker serves this same key for {username}")
    elif done.broker == "different" and done.served is not None:
        _warn(
            f"the broker serves another key for {username}: {format_fingerprint(done.served)};"
            f" {username}'s files and requests are refused until the two match"
        )
    elif done.note is not None:
        _warn(f"not checked with the broker: {done.note}")


def _first_contact(pins: list[Pin]) -> None:
    """Say, once per user, that a key was pinned on first use and how to verify it."""
    for pin in pins:
        print(
            f"first contact with {pin.username}: pinned their key"
            f" ({tables.short_fingerprint(pin.fingerprint)}) on first use; to be sure it is"
            f" theirs, compare safety codes with them: sfs-peer verify {pin.username}",
            file=sys.stderr,
        )


def _pin_text(pin: Pin) -> str:
    return f"{format_fingerprint(pin.fingerprint)} ({pin.source}, {_when(pin.pinned_at)})"


def _warn(message: str) -> None:
    # Not the rich console: one line however wide, for scripts that read it.
    print(f"warning: {printable(message)}", file=sys.stderr)


def _ask_to_replace(wanted: bytes) -> ConfirmReplace:
    def ask(pin: Pin, served: bytes | None) -> bool:
        stderr.print(f"{pin.username} is pinned to another key:")
        stderr.print(f"  pinned:            {_pin_text(pin)}")
        stderr.print(f"  new:               {format_fingerprint(wanted)}")
        if served is not None:
            which = (
                "the new one"
                if crypto.same_bytes(served, wanted)
                else "the pinned one"
                if crypto.same_bytes(served, pin.fingerprint)
                else "neither"
            )
            stderr.print(f"  broker serves:     {format_fingerprint(served)} ({which})")
        print(
            f"replace the pin of {pin.username}? (check the new key with them first) [y/N] ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        answer = sys.stdin.readline()
        if not answer:  # Ctrl-D: no answer at all, so nothing is decided
            print(file=sys.stderr)
            raise UsageError(
                f"cancelled at the prompt (end of input); the pin of {pin.username} is unchanged"
            )
        return answer.strip().lower() in ("y", "yes")

    return ask


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
