"""`sfs-peer`: one user's identity, shares, searches and downloads."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Annotated

import typer

from sfs.common.cli import (
    ConfigOption,
    DebugOption,
    JsonOption,
    command,
    install_signal_handlers,
    new_app,
    print_json,
    run,
    stdout,
)
from sfs.peer import cli_options, trust_commands
from sfs.peer.cli_options import PASSPHRASE_ENV, FolderOption, PasswordStdin, WideOption

# Start-up time: each command imports what it needs in its body (keys, the broker client,
# rich's progress bars, the output tables), so that none pays for the others, nor `--help`.

app = new_app("An sfs peer: share files, find them, and download them directly from their owners.")

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
    from sfs.common.identity import format_fingerprint
    from sfs.peer import prompts

    with cli_options.open_peer(config) as peer:
        wanted = passphrase or os.environ.get(PASSPHRASE_ENV)
        secret = prompts.new_passphrase(peer.config) if wanted else None
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
    from sfs.peer import prompts

    with cli_options.open_peer(config) as peer:
        peer.check_not_registered()  # before asking for a password it would not need
        peer.check_broker()
        result = peer.register(prompts.password(peer.config, password_stdin, confirm=True))
        stdout.print(f"registered {result.username} and logged in")


@app.command()
@command
def login(
    config: ConfigOption, password_stdin: PasswordStdin = False, debug: DebugOption = False
) -> None:
    """Log in to the broker; the session is kept in the data folder."""
    from sfs.peer import prompts

    with cli_options.open_peer(config) as peer:
        peer.check_broker()  # before asking for a password it could not use
        result = peer.login(prompts.password(peer.config, password_stdin))
        stdout.print(f"logged in as {result.username}")


@app.command()
@command
def logout(config: ConfigOption, debug: DebugOption = False) -> None:
    """End the session at the broker."""
    with cli_options.open_peer(config) as peer:
        peer.logout()
        stdout.print("logged out")


@app.command()
@command
def whoami(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """Show the username, the fingerprint and whether a session is open."""
    with cli_options.open_peer(config) as peer:
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
    _keep_freed_buffers()
    stop = threading.Event()
    install_signal_handlers(stop.set)

    def ready(endpoint: str) -> None:
        # One line on stdout that scripts can wait for.
        print(f"serving on {endpoint}", flush=True)

    with cli_options.open_peer(config) as peer:
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
            metavar="PATH...",
            help="The files and folders to share (one id each; a folder is one share).",
            show_default=False,
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
    skip_unsafe: Annotated[
        bool,
        typer.Option("--skip-unsafe", help="Leave out links that point outside a shared folder."),
    ] = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Share files and folders with everyone, or only with --to users; one id each.

    Each file's manifest is signed and registered at the broker. Every PATH is checked
    before any is shared. With --json: one object for one PATH, a list for several."""
    from sfs.peer import output
    from sfs.peer.progress import progress
    from sfs.peer.share import shareable

    with cli_options.open_peer(config) as peer:
        me = peer.config.username
        sources = [shareable(path) for path in paths]  # all checked before any is shared
        documents = []
        for source in sources:
            with progress("hashing", not json) as bar:
                shared = peer.share(source, keyword or [], to or [], bar, skip_unsafe)
            if json:
                documents.append(output.share_json(shared, me))
                continue
            output.print_shared(shared)
    if json:
        print_json(documents[0] if len(documents) == 1 else documents)


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
    with cli_options.open_peer(config) as peer:
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
    from sfs.peer import output

    if partial:
        _list_unfinished(config, folder, wide, json)
        return
    with cli_options.open_peer(config) as peer:
        shares = peer.shares()
        unfinished = [] if json or not stdout.is_terminal else peer.unfinished(folder)
    output.print_shares(shares, peer.config.username, unfinished, wide, json)


def _list_unfinished(config: Path, folder: Path | None, wide: bool, json: bool) -> None:
    from sfs.peer import output

    with cli_options.open_peer(config) as peer:
        found = peer.unfinished(folder)
    output.print_unfinished(found, wide, json)


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
    """Remove abandoned unfinished downloads (`.sfs-*.part` files, `.sfs-*.tree` folders)."""
    from sfs.peer import output

    with cli_options.open_peer(config) as peer:
        done = peer.clean(older_than, folder)
    output.print_cleaned(done, older_than, json)


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
    from sfs.peer import output

    with cli_options.open_peer(config) as peer:
        found = peer.find(" ".join(words or []), owner)
    output.print_found(found, wide, json)


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
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            metavar="GLOB",
            help="Of a folder share, fetch only the paths matching GLOB, or inside a "
            "folder matching it (repeat).",
        ),
    ] = None,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Download a file or folder from its owner and seeders, verifying every chunk.

    Every chunk is checked against the owner's signed manifest. Chunks come from
    every online holder at once: the owner, and the seeders (peers that downloaded
    the file before). Stopped part way (Ctrl-C, holders gone), the verified chunks
    stay in a hidden .part file in the folder (a folder share: in its hidden staging
    folder), and running the same command again resumes. A file already in the folder
    with the same content is not fetched again.
    FILE_ID may be the first 8 or more characters of the id, if no other file you
    can see starts with them.

    \b
    Example:
      sfs-peer search annual report
      sfs-peer get 0f3c9a1e5b7d42c68e0a9b1c2d3e4f50 --out ~/Downloads
    """
    from sfs.peer import output, trust_output
    from sfs.peer.progress import download_progress

    _keep_freed_buffers()

    with cli_options.open_peer(config) as peer, download_progress(not json) as bar:
        known = {pin.username for pin in peer.peers()}
        result = peer.get(file_id, out, bar, force=force, include=include or [])
        first_contact = [pin for pin in peer.peers() if pin.username not in known]
    trust_output.first_contact(first_contact)
    output.print_download(result, json)


def _keep_freed_buffers() -> None:
    """For the commands that move chunks (`sfs.peer.allocator`)."""
    from sfs.peer.allocator import keep_freed_buffers

    keep_freed_buffers()


# --- trust ----------------------------------------------------------------------------------

app.command()(trust_commands.peers)
app.command()(trust_commands.verify)
app.command()(trust_commands.trust)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
