"""`sfs-broker`: init, serve, status, user (users_cli), and the index's migrate (to
PostgreSQL) and backup."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
import zmq
import zmq.utils.z85

from sfs.broker import users_cli
from sfs.broker.backup import backup_sqlite
from sfs.broker.migrate import copy_index
from sfs.broker.postgres_store import PostgresStore, describe, is_postgres_url
from sfs.broker.presence_hints import parse_hints_text
from sfs.broker.relay import RelayServer
from sfs.broker.relay_keys import (
    ensure_relay_keys,
    relay_curve_keys,
    ticket_private_key,
    ticket_public_key,
)
from sfs.broker.server import BrokerServer
from sfs.broker.service import BrokerService, BrokerSettings, RelayDirectory
from sfs.broker.stores import open_store, where
from sfs.common import protocol
from sfs.common.cli import (
    ConfigOption,
    DebugOption,
    JsonOption,
    SafeTable,
    command,
    install_signal_handlers,
    new_app,
    print_json,
    run,
    stdout,
)
from sfs.common.config import BrokerConfig, load_broker_config, parse_z85_key
from sfs.common.errors import ConfigError, KeyFileError
from sfs.common.files import make_private_dir, read_private_file, write_private_file

app = new_app("The sfs index broker: users, key bundles, shared files and who is online.")
app.add_typer(users_cli.app, name="user")


@app.command()
@command
def init(config: ConfigOption, debug: DebugOption = False) -> None:
    """Create the data folder, the database and the CurveZMQ key pair."""
    settings = load_broker_config(config)
    make_private_dir(settings.data_dir)
    open_store(settings, create=True).close()
    if settings.secret_key_file.exists():
        public = _public_key(settings)
        stdout.print(f"broker already initialised in {settings.data_dir}")
    else:
        public, secret = zmq.curve_keypair()
        write_private_file(settings.secret_key_file, secret + b"\n")
        settings.public_key_file.write_bytes(public + b"\n")
        stdout.print(f"initialised broker in {settings.data_dir}")
    stdout.print(f"public key: {public.decode()}")
    stdout.print(f"written to: {settings.public_key_file}")
    if settings.relay is not None:
        ensure_relay_keys(settings)
        stdout.print(f"relay keys in {settings.data_dir}")


@app.command()
@command
def serve(config: ConfigOption, debug: DebugOption = False) -> None:
    """Run the broker in the foreground until Ctrl-C or SIGTERM."""
    settings = load_broker_config(config)
    if not debug:
        logging.getLogger("sfs").setLevel(logging.INFO)
    secret = _secret_key(settings)
    public = _public_key(settings)
    store = open_store(settings)
    logging.getLogger("sfs.broker").info("index in %s", where(settings))
    try:
        service = BrokerService(
            store,
            BrokerSettings(
                bcrypt_rounds=settings.bcrypt_rounds,
                session_ttl=settings.session_ttl,
                presence_ttl=settings.presence_ttl,
                login_attempts=settings.login_attempts,
                login_lockout=settings.login_lockout,
                bcrypt_slots=max(1, settings.workers - 1),
                registrations_per_key=settings.registrations_per_key,
                registrations_per_address=settings.registrations_per_address,
                quota_files=settings.quota_files,
                quota_manifest_mib=settings.quota_manifest_mib,
            ),
            relays=_relay_directory(settings),
        )
        server = BrokerServer(service, settings.bind, secret, public, settings.workers)
        install_signal_handlers(server.stop)
        log = logging.getLogger("sfs.broker")
        server.serve(
            lambda endpoint: log.info(
                "listening on %s with public key %s", endpoint, public.decode()
            )
        )
        log.info("stopped")
    finally:
        store.close()


@app.command()
@command
def relay(config: ConfigOption, debug: DebugOption = False) -> None:
    """Run the relay of the config's `relay:` section in the foreground (its own process:
    relays carry bulk data, the index must not share its CPU)."""
    settings = load_broker_config(config)
    if not debug:
        logging.getLogger("sfs").setLevel(logging.INFO)
    if settings.relay is None:
        raise ConfigError(f"{config}: no `relay:` section (bind, advertise) to run a relay from")
    make_private_dir(settings.data_dir)
    ensure_relay_keys(settings, ticket_key=False)
    server = RelayServer(
        settings.relay.bind,
        relay_curve_keys(settings),
        ticket_public_key(settings),
        settings.relay.limits,
    )
    install_signal_handlers(server.stop)
    log = logging.getLogger("sfs.relay")
    with zmq.Context() as context:
        server.serve(
            context,
            lambda endpoint: log.info(
                "relay listening on %s, advertised as %s",
                endpoint,
                settings.relay.advertise,  # type: ignore[union-attr]
            ),
        )
    log.info("stopped")


def _relay_directory(settings: BrokerConfig) -> RelayDirectory | None:
    if settings.relay is None:
        return None
    ensure_relay_keys(settings)
    own = protocol.RelayInfo(
        settings.relay.advertise, zmq.utils.z85.decode(relay_curve_keys(settings)[0])
    )
    others = [protocol.RelayInfo(e, zmq.utils.z85.decode(k)) for e, k in settings.relay.others]
    return RelayDirectory((own, *others), ticket_private_key(settings), settings.relay.ticket_ttl)


@app.command()
@command
def status(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """Show registered users, shared files and online peers."""
    settings = load_broker_config(config)
    store = open_store(settings)
    try:
        stats = store.stats(int(time.time()))
    finally:
        store.close()
    if json:
        print_json(
            {
                "protocol_version": protocol.VERSION,
                "users": [{"username": name, "online": online} for name, online in stats.users],
                "files": stats.files,
                "online": [
                    {
                        "username": name,
                        "endpoint": parse_hints_text(text)[0],
                        "hints": [_shown(hint) for hint in parse_hints_text(text)[1]],
                        "online_until": until,
                    }
                    for name, text, until in stats.online
                ],
            }
        )
        return
    stdout.print(
        f"{len(stats.users)} users, {stats.files} shared files, {len(stats.online)} online"
        f" (protocol version {protocol.VERSION})"
    )
    table = SafeTable("user", "online", "endpoint")
    endpoints = {name: _endpoints(text) for name, text, _ in stats.online}
    for name, online in stats.users:
        table.add_row(name, "yes" if online else "no", endpoints.get(name, ""))
    stdout.print(table)


def _shown(hint: protocol.ConnectionHint) -> str:
    return hint.endpoint if hint.kind == "direct" else f"relay {hint.endpoint}"


def _endpoints(text: str) -> str:
    """How a peer can be reached, for the table: its endpoint, and its relay if any."""
    endpoint, hints = parse_hints_text(text)
    relays = [_shown(hint) for hint in hints if hint.kind == "relay"]
    return ", ".join([endpoint, *relays])


@app.command()
@command
def migrate(
    config: ConfigOption,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="postgresql://USER@HOST:PORT/DBNAME of an empty database (keep the"
            " password in ~/.pgpass: a command line is visible to other users)",
        ),
    ],
    debug: DebugOption = False,
) -> None:
    """Copy the SQLite index into PostgreSQL and check the copy (stop the broker first)."""
    settings = load_broker_config(config)
    if settings.database_url is not None:
        raise ConfigError("this broker's database is PostgreSQL already; migrate copies SQLite")
    if not is_postgres_url(to):
        raise ConfigError("--to: expected a postgresql:// URL")
    open_store(settings).close()  # the SQLite index exists and is current
    target = PostgresStore(to, pool_size=2)
    try:
        copied = copy_index(settings.database, target)
    finally:
        target.close()
    counts = ", ".join(f"{count} {table}" for table, count in copied.rows.items())
    stdout.print(f"copied {settings.database} to {describe(to)}: {counts}; verified")
    stdout.print("now set `database:` to that URL in the broker's config and start it")


@app.command()
@command
def backup(
    config: ConfigOption,
    file: Annotated[Path, typer.Argument(help="a new file for the copy")],
    debug: DebugOption = False,
) -> None:
    """Copy the SQLite index to FILE while the broker runs (PostgreSQL: use pg_dump)."""
    settings = load_broker_config(config)
    if settings.database_url is not None:
        raise ConfigError(f"this broker's index is in {where(settings)}: back it up with pg_dump")
    open_store(settings).close()  # it exists, and is an sfs index of this version
    backup_sqlite(settings.database, file)
    stdout.print(f"backed up {settings.database} to {file}")


def _secret_key(settings: BrokerConfig) -> bytes:
    data = read_private_file(settings.secret_key_file, "the broker secret key")
    return parse_z85_key(data.decode("ascii", "replace").strip(), str(settings.secret_key_file))


def _public_key(settings: BrokerConfig) -> bytes:
    try:
        text = settings.public_key_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(
            f"cannot read {settings.public_key_file}; run `sfs-broker init`"
        ) from exc
    return parse_z85_key(text, str(settings.public_key_file))


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
