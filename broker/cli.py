"""`sfs-broker`: init, serve and status."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq

from sfs.broker.server import BrokerServer
from sfs.broker.service import BrokerService, BrokerSettings
from sfs.broker.store import SqliteStore
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


@app.command()
@command
def init(config: ConfigOption, debug: DebugOption = False) -> None:
    """Create the data folder, the database and the broker's CurveZMQ key pair."""
    settings = load_broker_config(config)
    make_private_dir(settings.data_dir)
    SqliteStore(settings.database).close()
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


@app.command()
@command
def serve(config: ConfigOption, debug: DebugOption = False) -> None:
    """Run the broker in the foreground until Ctrl-C or SIGTERM."""
    settings = load_broker_config(config)
    if not debug:
        logging.getLogger("sfs").setLevel(logging.INFO)
    secret = _secret_key(settings)
    public = _public_key(settings)
    store = SqliteStore(_existing_database(settings))
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
        )
        server = BrokerServer(service, settings.bind, secret, public, settings.workers)
        install_signal_handlers(server.stop)
        log = logging.getLogger("sfs.broker")
        log.info("listening on %s with public key %s", settings.bind, public.decode())
        server.serve()
        log.info("stopped")
    finally:
        store.close()


@app.command()
@command
def status(config: ConfigOption, json: JsonOption = False, debug: DebugOption = False) -> None:
    """Show registered users, shared files and online peers."""
    settings = load_broker_config(config)
    store = SqliteStore(_existing_database(settings))
    try:
        stats = store.stats(int(time.time()))
    finally:
        store.close()
    if json:
        print_json(
            {
                "users": [{"username": name, "online": online} for name, online in stats.users],
                "files": stats.files,
                "online": [
                    {"username": name, "endpoint": endpoint, "online_until": until}
                    for name, endpoint, until in stats.online
                ],
            }
        )
        return
    stdout.print(
        f"{len(stats.users)} users, {stats.files} shared files, {len(stats.online)} online"
    )
    table = SafeTable("user", "online", "endpoint")
    endpoints = {name: endpoint for name, endpoint, _ in stats.online}
    for name, online in stats.users:
        table.add_row(name, "yes" if online else "no", endpoints.get(name, ""))
    stdout.print(table)


def _existing_database(settings: BrokerConfig) -> Path:
    if not settings.database.exists():
        raise ConfigError(f"no broker database in {settings.data_dir}; run `sfs-broker init`")
    return settings.database


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
