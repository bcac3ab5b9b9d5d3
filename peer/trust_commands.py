"""The `sfs-peer` commands about pinned keys: `peers`, `verify` and `trust`; peer/cli.py
registers them on the app."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from sfs.common.cli import ConfigOption, DebugOption, JsonOption, command
from sfs.peer import cli_options
from sfs.peer.cli_options import WideOption

# As in peer/cli.py, what a command needs is imported in its body (start-up time).


@command
def peers(
    config: ConfigOption,
    wide: WideOption = False,
    json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List pinned fingerprints, and which were verified with a safety code."""
    from sfs.peer import trust_output

    with cli_options.open_peer(config) as peer:
        pins = peer.peers()
    trust_output.print_peers(pins, wide, json)


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
    from sfs.peer import trust_output

    with cli_options.open_peer(config) as peer:
        done = peer.verify(username, confirm=confirm)
    trust_output.print_verification(done, username, confirm, json)


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
    from sfs.common.identity import parse_fingerprint
    from sfs.peer import prompts, trust_output

    wanted = parse_fingerprint(fingerprint)
    # Asked only on a terminal: a script gets a refusal, never a prompt it cannot answer.
    ask = None if replace or json or not sys.stdin.isatty() else prompts.ask_to_replace(wanted)
    with cli_options.open_peer(config) as peer:
        done = peer.trust(
            username, wanted, replace=replace, allow_unknown=allow_unknown, confirm=ask
        )
    trust_output.print_trusted(done, username, wanted, json)
