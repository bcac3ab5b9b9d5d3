"""What `sfs-peer` asks on the terminal: passwords, passphrases and the confirmation to
replace a pin, each refusing clearly on Ctrl-D or when there is no terminal to ask."""

from __future__ import annotations

import getpass
import os
import sys

from sfs.common import crypto
from sfs.common.cli import stderr
from sfs.common.config import PeerConfig
from sfs.common.errors import UsageError
from sfs.common.identity import format_fingerprint
from sfs.peer.cli_options import PASSPHRASE_ENV as PASSPHRASE_ENV
from sfs.peer.output import pin_text
from sfs.peer.pins import ConfirmReplace, Pin

CONFIRM_TRIES = 3  # a new password or passphrase typed twice that does not match


def ask_secret(prompt: str) -> str:
    """A hidden prompt on the terminal; Ctrl-D (end of input) is a clear refusal."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the prompt's line before the error
        raise UsageError("cancelled at the prompt (end of input); nothing was done") from None


def _keys_of(settings: PeerConfig) -> str:
    return f"{settings.username}'s private keys ({settings.data_dir / 'keys'})"


def passphrase(settings: PeerConfig) -> bytes | None:
    """The passphrase of encrypted keys: from SFS_PASSPHRASE, else asked on the terminal."""
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        return None
    return ask_secret(f"passphrase for {_keys_of(settings)}: ").encode() or None


def _new_secret(what: str, prompt: str) -> str:
    """Asked twice; asked again (up to CONFIRM_TRIES times) when the two differ."""
    for _ in range(CONFIRM_TRIES):
        secret = ask_secret(prompt)
        if not secret:
            raise UsageError(f"the {what} is empty")
        if ask_secret(f"{what} again: ") == secret:
            return secret
        print(f"the two {what}s do not match; try again", file=sys.stderr)
    raise UsageError(f"the {what}s did not match ({CONFIRM_TRIES} tries); nothing was done")


def new_passphrase(settings: PeerConfig) -> bytes:
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for a passphrase; set {PASSPHRASE_ENV}")
    return _new_secret("passphrase", f"new passphrase for {_keys_of(settings)}: ").encode()


def password(settings: PeerConfig, from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UsageError("--password-stdin: nothing on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for a password; use --password-stdin")
    prompt = f"password for {settings.username} at {settings.broker_endpoint}: "
    return _new_secret("password", prompt) if confirm else ask_secret(prompt)


def ask_to_replace(wanted: bytes) -> ConfirmReplace:
    def ask(pin: Pin, served: bytes | None) -> bool:
        stderr.print(f"{pin.username} is pinned to another key:")
        stderr.print(f"  pinned:            {pin_text(pin)}")
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
