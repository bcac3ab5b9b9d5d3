"""YAML configs for the broker and the peers.

One file per broker or user. Relative paths resolve against the folder of the config
file. Unknown keys and bad values are refused with a message naming the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import zmq.utils.z85

from sfs.common.errors import ConfigError
from sfs.common.protocol import USERNAME_PATTERN, valid_endpoint

_FORM = "tcp://HOST:PORT or tcp://[IPV6]:PORT"
MAX_BROKERS = 16  # endpoints in a peer's `broker.endpoint` list
MAX_WINDOW = 32  # chunk requests in flight per holder, at most (the `window` setting)
_WILDCARD_HOSTS = {"*", "0.0.0.0"}  # noqa: S104 (a value to recognise, not to bind)


def _is_wildcard(endpoint: str) -> bool:
    """Whether a valid bind endpoint means "every address" (`*`, `0.0.0.0`, `[::]`)."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    if host.startswith("["):
        return ipaddress.IPv6Address(host[1:-1]).is_unspecified
    return host in _WILDCARD_HOSTS


@dataclass(frozen=True)
class RelayLimits:
    """What one relay allows; defaults a small team can run as they are."""

    user_rate: int = 50 * 1024 * 1024  # bytes a second relayed for one requester
    user_circuits: int = 8  # circuits one requester may hold open at once
    circuits: int = 256  # circuits at once, all users together
    circuits_per_minute: int = 120  # circuits one requester may open a minute
    idle: int = 60  # seconds a circuit may carry nothing before it is closed
    max_duration: int = 6 * 3600  # seconds a circuit may live
    global_rate: int = 0  # bytes a second for every circuit together; 0 for no cap


@dataclass(frozen=True)
class RelaySettings:
    """The broker config's `relay:` section: the relay this broker runs (`bind`,
    `advertise`), the relays it hands out (its own first), and their limits."""

    bind: str
    advertise: str
    others: tuple[tuple[str, bytes], ...] = ()  # (endpoint, z85 key) of relays run elsewhere
    limits: RelayLimits = field(default_factory=RelayLimits)
    ticket_ttl: int = 120  # seconds a circuit ticket may be used


@dataclass(frozen=True)
class BrokerConfig:
    path: Path
    bind: str
    data_dir: Path
    bcrypt_rounds: int = 12
    workers: int = 4
    session_ttl: int = 24 * 3600
    presence_ttl: int = 30
    login_attempts: int = 5
    login_lockout: int = 30
    registrations_per_key: int = 10
    registrations_per_address: int = 200
    quota_files: int = 100_000
    quota_manifest_mib: int = 1024
    database_file: Path | None = None  # SQLite; None: broker.db in data_dir
    # A postgresql:// URL instead of SQLite. It may hold a password: kept out of repr.
    database_url: str | None = field(default=None, repr=False)
    relay: RelaySettings | None = None  # None: this broker hands out no relay

    @property
    def relay_secret_key_file(self) -> Path:
        """The relay's CurveZMQ secret key (z85)."""
        return self.data_dir / "relay.key"

    @property
    def relay_public_key_file(self) -> Path:
        return self.data_dir / "relay.pub"

    @property
    def ticket_key_file(self) -> Path:
        """The Ed25519 key the broker signs relay tickets with (raw; 0600)."""
        return self.data_dir / "relay-ticket.key"

    @property
    def ticket_public_key_file(self) -> Path:
        """Its public half, hex: what relays are given."""
        return self.data_dir / "relay-ticket.pub"

    @property
    def database(self) -> Path:
        """The SQLite file (unused when `database_url` is set)."""
        return self.database_file or self.data_dir / "broker.db"

    @property
    def secret_key_file(self) -> Path:
        return self.data_dir / "broker.key"

    @property
    def public_key_file(self) -> Path:
        return self.data_dir / "broker.pub"


@dataclass(frozen=True)
class PeerConfig:
    path: Path
    username: str
    data_dir: Path
    download_dir: Path
    listen: str
    advertise: str
    broker_endpoint: str  # the first of `broker_endpoints` (for messages)
    broker_public_key: bytes  # z85, as CurveZMQ wants it
    transport_encryption: bool = True
    window: int = 8
    heartbeat_interval: int = 10
    timeout: int = 10
    hello_timeout: int = 2  # a holder silent this long while others deliver is set aside
    seed: bool = True
    upload_rate: int = 0  # bytes/s for all chunks `serve` sends together; 0: no cap
    # Where `serve` takes data connections (chunks outside CurveZMQ, sealed end to end):
    # None for `listen`'s host on any free port, "off" for none (chunks then travel on
    # the CurveZMQ connection). Offers name it with `advertise`'s host.
    data_listen: str | None = None
    # Every broker of the deployment (`broker.endpoint`: one or a list); () means just
    # `broker_endpoint`. Clients spread over them and fail over on a timeout.
    broker_endpoints: tuple[str, ...] = ()
    # `auto`: `serve` uses a relay only if the broker's relay cannot reach it back;
    # `always`: it also keeps a relay connection; `never`: direct only.
    relay: str = "auto"

    @property
    def brokers(self) -> tuple[str, ...]:
        return self.broker_endpoints or (self.broker_endpoint,)


class _Section:
    """Reads one mapping of a config file, remembering which keys were used. With `keys`
    (every key the section may hold), an unknown key is refused at once, before a
    message about a missing one: `downlaod_dir` is named, not `download_dir`."""

    def __init__(self, data: Any, where: str, base: Path, keys: tuple[str, ...] = ()) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of keys to values")
        self.data, self.where, self.base = data, where, base
        self.keys = keys
        self.used: set[str] = set()
        if keys:
            self._refuse_unknown(set(keys))

    def _raw(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        if value is _REQUIRED:
            raise ConfigError(f"{self._name(key)}: missing (required)")
        return value

    def _name(self, key: str) -> str:
        return f"{self.where}: {key}"

    def string(self, key: str, default: Any = None) -> str:
        value = self._raw(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self._name(key)}: expected a non-empty string")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{self._name(key)}: expected a whole number from {low} to {high}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: expected true or false")
        return value

    def path(self, key: str) -> Path:
        value = self.string(key)
        try:
            return (self.base / Path(value).expanduser()).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # NUL byte, unknown ~user, loop
            raise ConfigError(f"{self._name(key)}: not a usable path ({exc})") from exc

    def endpoint(self, key: str, default: str | None = None, *, bind: bool = False) -> str:
        value = self.string(key, default)
        if not valid_endpoint(value, bind=bind):
            form = f"{_FORM} (HOST may be *)" if bind else _FORM
            raise ConfigError(f"{self._name(key)}: expected {form}, got {value!r}")
        return value

    def endpoints(self, key: str) -> tuple[str, ...]:
        """One endpoint, or a non-empty list of distinct ones."""
        value = self._raw(key, _REQUIRED)
        if not isinstance(value, list):
            return (self.endpoint(key),)
        if not value or len(value) > MAX_BROKERS:
            raise ConfigError(
                f"{self._name(key)}: expected {_FORM}, or a list of 1 to {MAX_BROKERS}"
            )
        for item in value:
            if not isinstance(item, str) or not valid_endpoint(item):
                raise ConfigError(f"{self._name(key)}: expected {_FORM}, got {item!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{self._name(key)}: lists an endpoint twice")
        return tuple(value)

    def section(self, key: str, keys: tuple[str, ...] = ()) -> _Section:
        return _Section(self._raw(key, _REQUIRED), self._name(key), self.base, keys)

    def finish(self) -> None:
        self._refuse_unknown(self.used | set(self.keys))

    def _refuse_unknown(self, known: set[str]) -> None:
        unknown = sorted((str(key) for key in self.data if key not in known), key=str)
        if not unknown:
            return
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{self._name(unknown[0])}: unknown key{hint}")


_REQUIRED = object()


def _read_yaml(path: Path) -> tuple[Any, Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return data, path.resolve().parent


BROKER_KEYS = (
    "bind",
    "data_dir",
    "bcrypt_rounds",
    "workers",
    "session_ttl",
    "presence_ttl",
    "login_attempts",
    "login_lockout",
    "registrations_per_key",
    "registrations_per_address",
    "quota_files",
    "quota_manifest_mib",
    "database",
    "relay",
)
RELAY_KEYS = ("bind", "advertise", "relays", "limits", "ticket_ttl")
RELAY_LIMIT_KEYS = (
    "user_rate",
    "user_circuits",
    "circuits",
    "circuits_per_minute",
    "idle",
    "max_duration",
    "global_rate",
)
PEER_KEYS = (
    "username",
    "data_dir",
    "download_dir",
    "listen",
    "advertise",
    "broker",
    "transport_encryption",
    "window",
    "heartbeat_interval",
    "timeout",
    "hello_timeout",
    "seed",
    "upload_rate",
    "data_listen",
    "relay",
)
PEER_BROKER_KEYS = ("endpoint", "public_key", "public_key_file")


def load_broker_config(path: Path) -> BrokerConfig:
    data, base = _read_yaml(path)
    top = _Section(data, path.name, base, BROKER_KEYS)
    config = BrokerConfig(
        path=path.resolve(),
        bind=top.endpoint("bind", bind=True),
        data_dir=top.path("data_dir"),
        bcrypt_rounds=top.integer("bcrypt_rounds", 12, 4, 16),  # 16: ~4 s a login
        workers=top.integer("workers", 4, 1, 64),
        session_ttl=top.integer("session_ttl", 24 * 3600, 1, 365 * 24 * 3600),
        presence_ttl=top.integer("presence_ttl", 30, 3, 3600),
        login_attempts=top.integer("login_attempts", 5, 1, 1000),
        login_lockout=top.integer("login_lockout", 30, 1, 24 * 3600),
        registrations_per_key=top.integer("registrations_per_key", 10, 1, 1000),
        registrations_per_address=top.integer("registrations_per_address", 200, 1, 100_000),
        quota_files=top.integer("quota_files", 100_000, 1, 100_000_000),
        quota_manifest_mib=top.integer("quota_manifest_mib", 1024, 1, 1024 * 1024),
        relay=_relay(top) if "relay" in top.data else None,
        **_database(top, path),
    )
    top.finish()
    return config


def _relay(top: _Section) -> RelaySettings:
    section = top.section("relay", RELAY_KEYS)
    bind = section.endpoint("bind", bind=True)
    advertise = section.endpoint("advertise", bind if not _is_wildcard(bind) else None)
    others: list[tuple[str, bytes]] = []
    listed = section._raw("relays", [])
    if not isinstance(listed, list) or len(listed) > 7:
        raise ConfigError(f"{section._name('relays')}: expected a list of 0 to 7 relays")
    for number, item in enumerate(listed, 1):
        other = _Section(
            item, f"{section._name('relays')} #{number}", top.base, ("endpoint", "key")
        )
        endpoint = other.endpoint("endpoint")
        others.append((endpoint, parse_z85_key(other.string("key"), other._name("key"))))
    limits = RelayLimits()
    if "limits" in section.data:
        given = section.section("limits", RELAY_LIMIT_KEYS)
        limits = RelayLimits(
            user_rate=given.integer("user_rate", limits.user_rate, 64 * 1024, 10**12),
            user_circuits=given.integer("user_circuits", limits.user_circuits, 1, 10_000),
            circuits=given.integer("circuits", limits.circuits, 1, 100_000),
            circuits_per_minute=given.integer(
                "circuits_per_minute", limits.circuits_per_minute, 1, 100_000
            ),
            idle=given.integer("idle", limits.idle, 5, 24 * 3600),
            max_duration=given.integer("max_duration", limits.max_duration, 10, 7 * 24 * 3600),
            global_rate=given.integer("global_rate", 0, 0, 10**12),
        )
        given.finish()
    ttl = section.integer("ticket_ttl", 120, 10, 3600)
    section.finish()
    return RelaySettings(bind, advertise, tuple(others), limits, ttl)


def _database(top: _Section, path: Path) -> dict[str, Any]:
    """`database`: absent or a path is SQLite, a postgresql:// URL is PostgreSQL. The
    URL is never repeated in a message: it may hold a password."""
    if "database" not in top.data:
        return {}
    value = top.string("database")
    if not value.startswith(("postgresql://", "postgres://")):
        if "://" in value:
            raise ConfigError(
                f"{top._name('database')}: expected a file path or a postgresql:// URL"
            )
        return {"database_file": top.path("database")}
    if _url_password(value):
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        if mode & 0o077:
            raise ConfigError(
                f"{top._name('database')}: the URL holds a password and {path} can be read"
                f" by other users: chmod 600 {path} (or keep the password in ~/.pgpass)"
            )
    return {"database_url": value}


def _url_password(url: str) -> bool:
    """Whether a postgresql:// URL holds a password (user:password@ or password=)."""
    authority = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    userinfo = authority.rpartition("@")[0]
    return ":" in userinfo or "password=" in url


def load_peer_config(path: Path) -> PeerConfig:
    data, base = _read_yaml(path)
    top = _Section(data, path.name, base, PEER_KEYS)
    username = top.string("username")
    if not re.fullmatch(USERNAME_PATTERN, username):
        raise ConfigError(
            f"{path.name}: username: use 1-32 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    listen = top.endpoint("listen", bind=True)
    advertise = top.endpoint("advertise", listen, bind=True)  # "*" gets its own message
    if _is_wildcard(advertise):
        raise ConfigError(
            f"{path.name}: advertise: set it to an address other peers can reach "
            f"(listen is {listen})"
        )
    broker = top.section("broker", PEER_BROKER_KEYS)
    brokers = broker.endpoints("endpoint")
    config = PeerConfig(
        path=path.resolve(),
        username=username,
        data_dir=top.path("data_dir"),
        download_dir=top.path("download_dir"),
        listen=listen,
        advertise=advertise,
        broker_endpoint=brokers[0],
        broker_public_key=_broker_key(broker),
        transport_encryption=top.boolean("transport_encryption", True),
        window=top.integer("window", 8, 1, MAX_WINDOW),
        heartbeat_interval=top.integer("heartbeat_interval", 10, 1, 3600),
        timeout=top.integer("timeout", 10, 1, 3600),
        hello_timeout=top.integer("hello_timeout", 2, 1, 3600),
        seed=top.boolean("seed", True),
        upload_rate=_upload_rate(top),
        data_listen=_data_listen(top),
        broker_endpoints=brokers,
        relay=_relay_mode(top),
    )
    broker.finish()
    top.finish()
    return config


# A downloader gives up on a holder after `timeout` (10 s by default) without a chunk, and
# chunks are 1 MiB: a lower cap would starve even a lone download.
MIN_UPLOAD_RATE = 128 * 1024


def _data_listen(top: _Section) -> str | None:
    value = top._raw("data_listen", None)
    if value is None:
        return None
    if value is False or value == "off":  # YAML reads a bare `off` as false
        return "off"
    return top.endpoint("data_listen", bind=True)


RELAY_MODES = ("auto", "always", "never")


def _relay_mode(top: _Section) -> str:
    mode = top.string("relay", "auto")
    if mode not in RELAY_MODES:
        raise ConfigError(f"{top.where}: relay: expected auto, always or never, got {mode!r}")
    return mode


def _upload_rate(top: _Section) -> int:
    rate = top.integer("upload_rate", 0, 0, 10**12)
    if 0 < rate < MIN_UPLOAD_RATE:
        raise ConfigError(
            f"{top.where}: upload_rate: 0 (no cap) or at least {MIN_UPLOAD_RATE} bytes/s "
            "(a 1 MiB chunk must reach a downloader within its timeout)"
        )
    return rate


def _broker_key(broker: _Section) -> bytes:
    has_inline, has_file = "public_key" in broker.data, "public_key_file" in broker.data
    if has_inline == has_file:
        raise ConfigError(f"{broker.where}: set exactly one of public_key or public_key_file")
    if has_inline:
        key, where = broker.string("public_key"), f"{broker.where}: public_key"
    else:
        key_path = broker.path("public_key_file")
        where = f"{broker.where}: public_key_file"
        try:
            key = key_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{where}: cannot read {key_path} (has `sfs-broker init` been run?)"
            ) from exc
    return parse_z85_key(key, where)


def parse_z85_key(text: str, where: str) -> bytes:
    try:
        valid = len(text) == 40 and len(zmq.utils.z85.decode(text)) == 32
    except (ValueError, KeyError, UnicodeError, struct.error):
        valid = False
    if not valid:
        raise ConfigError(f"{where}: not a CurveZMQ key (40 z85 characters)")
    return text.encode("ascii")
