"""The relay's keys in the broker's data folder: the relay's CurveZMQ pair (secret
0600) and the Ed25519 pair the broker signs tickets with (private half 0600, read by
the broker only; the relay reads the public half). Made by `init`, `serve` or `relay`,
whichever runs first; a second maker keeps the first one's keys."""

from __future__ import annotations

import contextlib
from pathlib import Path

import zmq

from sfs.common import crypto
from sfs.common.config import BrokerConfig, parse_z85_key
from sfs.common.errors import KeyFileError
from sfs.common.files import locked, read_private_file, write_private_file


def ensure_relay_keys(config: BrokerConfig, *, ticket_key: bool = True) -> None:
    """Create whichever relay key is missing (under a lock: broker and relay may start
    together). `ticket_key`: the ticket signing pair too (the broker's; a relay never
    makes one: run elsewhere, it is given the broker's public half)."""
    with locked(config.data_dir / "relay-keys"):
        if not config.relay_secret_key_file.exists():
            public, secret = zmq.curve_keypair()
            write_private_file(config.relay_secret_key_file, secret + b"\n")
            _write_public(config.relay_public_key_file, public + b"\n")
        if ticket_key and not config.ticket_key_file.exists():
            private = crypto.generate_ticket_key()
            write_private_file(config.ticket_key_file, private.hex().encode() + b"\n")
            public_hex = crypto.ticket_public_key(private).hex()
            _write_public(config.ticket_public_key_file, public_hex.encode() + b"\n")


def _write_public(path: Path, data: bytes) -> None:
    write_private_file(path, data)
    with contextlib.suppress(OSError):
        path.chmod(0o644)


def relay_curve_keys(config: BrokerConfig) -> tuple[bytes, bytes]:
    """(public, secret), z85."""
    where = str(config.relay_secret_key_file)
    secret = parse_z85_key(
        read_private_file(config.relay_secret_key_file, "the relay secret key")
        .decode("ascii", "replace")
        .strip(),
        where,
    )
    return zmq.curve_public(secret), secret


def ticket_private_key(config: BrokerConfig) -> bytes:
    data = read_private_file(config.ticket_key_file, "the relay ticket key")
    return _hex_key(data, str(config.ticket_key_file))


def ticket_public_key(config: BrokerConfig) -> bytes:
    try:
        data = config.ticket_public_key_file.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read {config.ticket_public_key_file}: run `sfs-broker init` first"
            " (a relay on another machine needs a copy of the broker's)"
        ) from exc
    return _hex_key(data, str(config.ticket_public_key_file))


def _hex_key(data: bytes, where: str) -> bytes:
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != crypto.ED25519_KEY_SIZE:
        raise KeyFileError(f"{where} is not an Ed25519 key (64 hex digits)")
    return key
