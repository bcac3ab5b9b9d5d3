"""Options shared by `sfs-peer` commands, and the `Peer` each command opens."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from sfs.peer.node import Peer

PASSPHRASE_ENV = "SFS_PASSPHRASE"  # noqa: S105 (the name of a variable, not a secret)

PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


WideOption = Annotated[
    bool, typer.Option("--wide", help="Full ids and fingerprints, and every column.")
]


FolderOption = Annotated[
    Path | None,
    typer.Option("--folder", help="The download folder to look in (default: download_dir)."),
]


def open_peer(config: Path) -> Peer:
    """The user's `Peer` from the config file; encrypted keys ask for their passphrase."""
    # Here, not at the top: importing them is most of a command's start-up, and `--help`
    # needs none of it.
    from sfs.common.config import load_peer_config
    from sfs.peer import prompts
    from sfs.peer.node import Peer

    settings = load_peer_config(config)
    return Peer(settings, passphrase=lambda: prompts.passphrase(settings))
