"""`sfs-broker user list|disable|enable|delete`: operators manage accounts in the database.

They work on the database directly, so they take effect on every broker of a
deployment from the next request on: a disabled or deleted user's sessions are gone
from the one table every broker reads.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from sfs.broker.store_contract import Account, Store
from sfs.broker.stores import open_store
from sfs.common.cli import (
    ConfigOption,
    DebugOption,
    JsonOption,
    SafeTable,
    command,
    new_app,
    print_json,
    stdout,
)
from sfs.common.config import load_broker_config
from sfs.common.errors import SfsError, UsageError
from sfs.common.protocol import USERNAME_PATTERN

app = new_app("Manage users (list, disable, enable, delete)")

NameArgument = Annotated[str, typer.Argument(metavar="NAME", help="the username")]


class NoSuchUser(SfsError):
    pass


def _store(config: Path) -> Store:
    return open_store(load_broker_config(config))


def _username(name: str) -> str:
    if not re.fullmatch(USERNAME_PATTERN, name):
        raise UsageError(f"not a username: {name[:40]!r}")
    return name


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


@app.command("list")
@command
def list_users(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """Every user: when registered, files shared, online, disabled."""
    store = _store(config)
    try:
        accounts = store.accounts(int(time.time()))
    finally:
        store.close()
    if json:
        print_json([_document(account) for account in accounts])
        return
    table = SafeTable("user", "created (UTC)", "files", "online", "disabled")
    for account in accounts:
        table.add_row(
            account.username,
            _when(account.created_at),
            f"{account.files:,}",
            "yes" if account.online else "no",
            "yes" if account.disabled else "no",
        )
    stdout.print(table)


def _document(account: Account) -> dict[str, object]:
    return {
        "username": account.username,
        "created_at": account.created_at,
        "files": account.files,
        "online": account.online,
        "disabled": account.disabled,
    }


@app.command()
@command
def disable(name: NameArgument, config: ConfigOption, debug: DebugOption = False) -> None:
    """Refuse NAME's logins and sessions, and unlist their files, until `user enable`."""
    _set_disabled(config, _username(name), True)
    stdout.print(
        f"disabled {name}: sessions ended, logins refused, files unlisted"
        f" (`sfs-broker user enable {name}` undoes it)"
    )


@app.command()
@command
def enable(name: NameArgument, config: ConfigOption, debug: DebugOption = False) -> None:
    """Let a disabled user log in again; their files are listed again."""
    _set_disabled(config, _username(name), False)
    stdout.print(f"enabled {name}")


def _set_disabled(config: Path, name: str, disabled: bool) -> None:
    store = _store(config)
    try:
        if not store.set_disabled(name, disabled):
            raise NoSuchUser(f"no such user: {name}")
    finally:
        store.close()


@app.command()
@command
def delete(
    name: NameArgument,
    config: ConfigOption,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask (needed without a terminal)")] = (
        False
    ),
    debug: DebugOption = False,
) -> None:
    """Delete NAME with their files, sessions and access (the name may be registered again,
    by a new user who inherits none of it)."""
    name = _username(name)
    store = _store(config)
    try:
        found = [a for a in store.accounts(int(time.time())) if a.username == name]
        if not found:
            raise NoSuchUser(f"no such user: {name}")
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(f"deleting {name} cannot be undone: add --yes to confirm")
            question = f"delete {name} and their {found[0].files:,} shared files for good?"
            if not typer.confirm(question, default=False):
                raise UsageError("nothing deleted")
        if not store.delete_user(name):
            raise NoSuchUser(f"no such user: {name}")
    finally:
        store.close()
    files = found[0].files
    stdout.print(f"deleted {name} ({files:,} shared file{'' if files == 1 else 's'})")
