"""`sfs-peer`: one user's identity, shares, searches and downloads."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import logging
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sfs.common import crypto
from sfs.common.cli import (
    ConfigOption,
    DebugOption,
    JsonOption,
    SafeTable,
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
from sfs.peer.download import DownloadProgress
from sfs.peer.node import AlreadyDownloaded, Peer
from sfs.peer.pins import ConfirmReplace, Pin
from sfs.peer.registry import Share
from sfs.peer.share import shareable_file

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


class _Bar:
    """One rich progress task: call it with (done, total); `describe` relabels it."""

    def __init__(self, bar: Progress, label: str) -> None:
        self._bar = bar
        self._task = bar.add_task(label, total=None)

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def describe(self, label: str) -> None:
        self._bar.update(self._task, description=label)


@contextlib.contextmanager
def _progress(label: str, enabled: bool) -> Iterator[_Bar | None]:
    """A rich progress bar on stderr (only on a terminal, and not with --json)."""
    if not enabled or not stderr.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        yield _Bar(bar, label)


@contextlib.contextmanager
def _download_progress(enabled: bool) -> Iterator[DownloadProgress | None]:
    """The download's bar: bytes, rate, time left, and how many holders are sending."""
    with _progress("downloading", enabled) as bar:
        if bar is None:
            yield None
            return
        shown = -1

        def update(done: int, total: int, holders: int) -> None:
            nonlocal shown
            if holders != shown:
                shown = holders
                bar.describe(f"from {holders} holder{'' if holders == 1 else 's'}")
            bar(done, total)

        yield update


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _when(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


_WHOLE = {"file id": 32, "fingerprint": 64}  # columns that must never be cut


def _table(*headers: str) -> SafeTable:
    table = SafeTable()
    for header in headers:
        table.add_column(
            header, no_wrap=header in _WHOLE, min_width=_WHOLE.get(header), overflow="fold"
        )
    return table


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
    """Share files: sign each one's manifest and register it at the broker.

    With --json: one object for one PATH, a list of them for several."""
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
    file_id: Annotated[str, typer.Argument(show_default=False)],
    debug: DebugOption = False,
) -> None:
    """Stop sharing a file."""
    with _peer(config) as peer:
        peer.unshare(file_id)
    stdout.print(f"stopped sharing {file_id}")


@app.command(name="list")
@command
def list_shares(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """List the files this user shares, and the downloads it seeds."""
    with _peer(config) as peer:
        shares = peer.shares()
    if json:
        print_json([_share_json(s, peer.config.username) for s in shares])
        return
    table = _table("file id", "name", "size", "owner", "shared with", "keywords", "path")
    for s in shares:
        audience = ", ".join(s.access) if s.access is not None else "everyone"
        owner = s.owner or "me"
        table.add_row(
            s.file_id, s.name, _size(s.size), owner, audience, ", ".join(s.keywords), str(s.path)
        )
    stdout.print(table if shares else "no shared files")


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
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Search the files shared with this user: every WORD must match (no quotes needed)."""
    with _peer(config) as peer:
        hits = peer.search(" ".join(words or []), owner)
    if json:
        print_json([hit.__dict__ for hit in hits])
        return
    table = _table("file id", "name", "size", "owner", "keywords", "shared", "online")
    for hit in hits:
        table.add_row(
            hit.file_id,
            hit.name,
            _size(hit.size),
            hit.owner,
            ", ".join(hit.keywords),
            _when(hit.shared_at),
            "yes" if hit.online else "no",
        )
    stdout.print(table if hits else "no matching files")


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
    """Download a file, verifying every chunk against its owner's signature.

    Chunks come from every online holder at once: the owner, and the seeders (peers
    that downloaded the file before). Stopped part way (Ctrl-C, holders gone), the
    verified chunks stay in a hidden .part file in the folder, and running the same
    command again resumes. A file already in the folder with the same content is not
    fetched again.

    \b
    Example:
      sfs-peer search annual report
      sfs-peer get 0f3c9a1e5b7d42c68e0a9b1c2d3e4f50 --out ~/Downloads
    """
    with _peer(config) as peer, _download_progress(not json) as progress:
        result = peer.get(file_id, out, progress, force=force)
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
    stdout.print(f"sha256: {result.sha256} (verified)")
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
def peers(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """List pinned fingerprints."""
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
                }
                for p in pins
            ]
        )
        return
    table = _table("user", "fingerprint", "pinned", "since")
    for p in pins:
        table.add_row(p.username, format_fingerprint(p.fingerprint), p.source, _when(p.pinned_at))
    stdout.print(table if pins else "no pinned peers yet")


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
        return sys.stdin.readline().strip().lower() in ("y", "yes")  # end of input: no

    return ask


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
