"""sfs.common.config: YAML configs; every refusal is a ConfigError naming its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import zmq.utils.z85

from sfs.common.config import (
    BROKER_KEYS,
    PEER_KEYS,
    BrokerConfig,
    PeerConfig,
    load_broker_config,
    load_peer_config,
    parse_z85_key,
)
from sfs.common.errors import ConfigError

KEY = zmq.utils.z85.encode(bytes(range(32))).decode()
assert len(KEY) == 40


def write(folder: Path, text: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from a folder that is not the config's, so cwd-relative paths would show."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# --- broker ------------------------------------------------------------------------------------

BROKER = "bind: tcp://*:5555\ndata_dir: data\n"


def broker(tmp_path: Path, text: str) -> BrokerConfig:
    return load_broker_config(write(tmp_path / "conf", text, "broker.yaml"))


def test_broker_minimal_config_and_defaults(tmp_path: Path, elsewhere: Path) -> None:
    config = broker(tmp_path, BROKER)
    conf = (tmp_path / "conf").resolve()
    assert config.path == conf / "broker.yaml"
    assert config.bind == "tcp://*:5555"
    assert config.data_dir == conf / "data"  # against the config's folder, not the cwd
    assert config.data_dir != elsewhere / "data"
    assert config.bcrypt_rounds == 12
    assert config.workers == 4
    assert config.session_ttl == 24 * 3600
    assert config.presence_ttl == 30
    assert (config.registrations_per_key, config.registrations_per_address) == (10, 200)
    assert (config.quota_files, config.quota_manifest_mib) == (100_000, 1024)
    assert config.database == conf / "data" / "broker.db"
    assert config.secret_key_file == conf / "data" / "broker.key"
    assert config.public_key_file == conf / "data" / "broker.pub"


def test_broker_relative_config_path_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf", BROKER, "broker.yaml")
    monkeypatch.chdir(tmp_path)
    config = load_broker_config(Path("conf/broker.yaml"))
    assert config.path == (tmp_path / "conf" / "broker.yaml").resolve()
    assert config.data_dir == (tmp_path / "conf" / "data").resolve()


def test_broker_all_keys(tmp_path: Path) -> None:
    config = broker(
        tmp_path,
        "bind: tcp://127.0.0.1:6000\n"
        f"data_dir: {tmp_path / 'abs'}\n"
        "bcrypt_rounds: 4\n"
        "workers: 64\n"
        "session_ttl: 60\n"
        "presence_ttl: 3600\n",
    )
    assert config.bind == "tcp://127.0.0.1:6000"
    assert config.data_dir == (tmp_path / "abs").resolve()  # absolute paths stay
    assert (config.bcrypt_rounds, config.workers) == (4, 64)
    assert (config.session_ttl, config.presence_ttl) == (60, 3600)


def test_broker_parent_relative_and_home_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        broker(tmp_path, "bind: tcp://*:1\ndata_dir: ../up\n").data_dir
        == (tmp_path / "up").resolve()
    )
    assert (
        broker(tmp_path, "bind: tcp://*:1\ndata_dir: ~/sfs\n").data_dir
        == (tmp_path / "home" / "sfs").resolve()
    )


@pytest.mark.parametrize(
    "bind",
    ["tcp://*:1", "tcp://*:65535", "tcp://0.0.0.0:5555", "tcp://localhost:5555", "tcp://a-b.c:9"],
)
def test_broker_bind_values_accepted(tmp_path: Path, bind: str) -> None:
    assert broker(tmp_path, f"bind: '{bind}'\ndata_dir: d\n").bind == bind


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (BROKER + "colour: red\n", "colour"),
        (BROKER + "Bind: tcp://*:1\n", "Bind"),
        (BROKER + "1: x\n", "1"),
        ("data_dir: data\n", "bind"),
        ("bind: tcp://*:5555\n", "data_dir"),
        ("bind: 5555\ndata_dir: d\n", "bind"),
        ("bind: [tcp://*:5555]\ndata_dir: d\n", "bind"),
        ("bind: ''\ndata_dir: d\n", "bind"),
        ("bind: null\ndata_dir: d\n", "bind"),
        ("bind: localhost:5555\ndata_dir: d\n", "bind"),
        ("bind: tcp://host\ndata_dir: d\n", "bind"),
        ("bind: tcp://host:0\ndata_dir: d\n", "bind"),
        ("bind: tcp://host:65536\ndata_dir: d\n", "bind"),
        ("bind: tcp://host:123456\ndata_dir: d\n", "bind"),
        ("bind: udp://host:5555\ndata_dir: d\n", "bind"),
        ("bind: tcp://host:5555/x\ndata_dir: d\n", "bind"),
        ("bind: tcp://ho st:5555\ndata_dir: d\n", "bind"),
        ("bind: ' tcp://host:5555'\ndata_dir: d\n", "bind"),
        ("bind: tcp://*:5555\ndata_dir: 5\n", "data_dir"),
        ("bind: tcp://*:5555\ndata_dir: ''\n", "data_dir"),
        ("bind: tcp://*:5555\ndata_dir: [a]\n", "data_dir"),
        ('bind: tcp://*:5555\ndata_dir: "a\\0b"\n', "data_dir"),  # NUL byte in a path
        ("bind: tcp://*:5555\ndata_dir: ~no-such-user-sfs/x\n", "data_dir"),
        (BROKER + "bcrypt_rounds: 3\n", "bcrypt_rounds"),
        (BROKER + "bcrypt_rounds: 17\n", "bcrypt_rounds"),
        (BROKER + "bcrypt_rounds: '12'\n", "bcrypt_rounds"),
        (BROKER + "bcrypt_rounds: 12.0\n", "bcrypt_rounds"),
        (BROKER + "bcrypt_rounds: true\n", "bcrypt_rounds"),  # bool is not a number
        (BROKER + "bcrypt_rounds: null\n", "bcrypt_rounds"),
        (BROKER + "workers: 0\n", "workers"),
        (BROKER + "workers: 65\n", "workers"),
        (BROKER + "workers: -1\n", "workers"),
        (BROKER + "session_ttl: 0\n", "session_ttl"),
        (BROKER + "login_attempts: 0\n", "login_attempts"),
        (BROKER + "login_lockout: 86401\n", "login_lockout"),
        (BROKER + f"session_ttl: {365 * 24 * 3600 + 1}\n", "session_ttl"),
        (BROKER + "presence_ttl: 2\n", "presence_ttl"),
        (BROKER + "presence_ttl: 3601\n", "presence_ttl"),
        (BROKER + "registrations_per_key: 0\n", "registrations_per_key"),
        (BROKER + "registrations_per_address: 100001\n", "registrations_per_address"),
        (BROKER + "quota_files: 0\n", "quota_files"),
        (BROKER + "quota_manifest_mib: 1.5\n", "quota_manifest_mib"),
    ],
)
def test_broker_refusals_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"broker\.yaml: {re.escape(key)}\b"):
        broker(tmp_path, text)


def test_broker_out_of_range_message_gives_the_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="workers: expected a whole number from 1 to 64"):
        broker(tmp_path, BROKER + "workers: 100\n")


def test_broker_missing_key_says_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.yaml: bind: missing \(required\)"):
        broker(tmp_path, "data_dir: data\n")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n", "42\n"])
def test_config_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        broker(tmp_path, text)


@pytest.mark.parametrize(
    "text", ["bind: [\n", "bind: tcp://*:1\n  data_dir: x\n", "a: b: c\n", "\tbind: x\n", "{"]
)
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"broker\.yaml, line \d+, column \d+: not valid YAML"):
        broker(tmp_path, text)


def test_invalid_yaml_gives_the_line_and_column_of_the_problem(tmp_path: Path) -> None:
    text = "bind: tcp://*:1\ndata_dir: data\nworkers: 4\n  bcrypt_rounds: 4\n"
    with pytest.raises(ConfigError) as refused:
        broker(tmp_path, text)
    # Line 4, where the stray indentation is; columns are counted from 1, as editors do.
    assert re.search(
        r"broker\.yaml, line 4, column 16: not valid YAML \(mapping values", str(refused.value)
    ), refused.value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bind: tcp://*:1\ndata_dri: data\n", "data_dri: unknown key (did you mean data_dir?)"),
        (BROKER + "bcrypt_round: 4\n", "bcrypt_round: unknown key (did you mean bcrypt_rounds?)"),
        (BROKER + "colour: blue\n", "colour: unknown key"),
    ],
)
def test_broker_unknown_key_is_named_with_a_suggestion(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        broker(tmp_path, text)
    assert str(refused.value) == f"broker.yaml: {message}"


def test_every_key_read_is_declared(tmp_path: Path) -> None:
    """The declared lists (for the early unknown-key check) match what the loaders read:
    a key added to a loader but not to its list would be refused as unknown."""
    full = BROKER + "".join(f"{key}: {value}\n" for key, value in BROKER_EXTRA.items())
    assert set(BROKER_KEYS) == {"bind", "data_dir", *BROKER_EXTRA}
    broker(tmp_path / "b", full)  # every declared key accepted together
    text = peer_text({**{key: value for key, value in PEER_EXTRA.items()}})
    assert set(PEER_KEYS) == {*PEER, "broker", *PEER_EXTRA}
    peer(tmp_path / "p", text)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_broker_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_peer_config(tmp_path / "nope.yaml")


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_broker_config(tmp_path)


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_bytes(b"bind: tcp://*:1\ndata_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_broker_config(path)


# --- peer -----------------------------------------------------------------------------------------

PEER = {
    "username": "alice",
    "listen": "tcp://*:7000",
    "advertise": "tcp://alice.example:7000",
    "data_dir": "data",
    "download_dir": "downloads",
}


def peer_text(top: dict[str, str | None] | None = None, broker_section: str | None = None) -> str:
    values = {**PEER, **(top or {})}
    lines = [f"{key}: {value}" for key, value in values.items() if value is not None]
    if broker_section is None:
        broker_section = f"  endpoint: tcp://broker.example:5555\n  public_key: '{KEY}'\n"
    if broker_section != "":
        lines.append("broker:\n" + broker_section.rstrip("\n"))
    return "\n".join(lines) + "\n"


def peer(tmp_path: Path, text: str) -> PeerConfig:
    return load_peer_config(write(tmp_path / "conf", text, "peer.yaml"))


def test_peer_minimal_config_and_defaults(tmp_path: Path, elsewhere: Path) -> None:
    config = peer(tmp_path, peer_text())
    conf = (tmp_path / "conf").resolve()
    assert config.path == conf / "peer.yaml"
    assert config.username == "alice"
    assert config.listen == "tcp://*:7000"
    assert config.advertise == "tcp://alice.example:7000"
    assert config.data_dir == conf / "data"
    assert config.download_dir == conf / "downloads"
    assert config.broker_endpoint == "tcp://broker.example:5555"
    assert config.broker_public_key == KEY.encode()
    assert config.transport_encryption is True
    assert (config.window, config.heartbeat_interval, config.timeout) == (8, 10, 10)
    assert config.hello_timeout == 2


def test_peer_all_keys(tmp_path: Path) -> None:
    text = peer_text(
        {
            "transport_encryption": "false",
            "window": "32",
            "heartbeat_interval": "3600",
            "timeout": "1",
            "hello_timeout": "3600",
        }
    )
    config = peer(tmp_path, text)
    assert config.transport_encryption is False
    assert (config.window, config.heartbeat_interval, config.timeout) == (32, 3600, 1)
    assert config.hello_timeout == 3600


def test_peer_advertise_defaults_to_a_concrete_listen_address(tmp_path: Path) -> None:
    config = peer(tmp_path, peer_text({"listen": "tcp://10.0.0.5:7000", "advertise": None}))
    assert config.advertise == "tcp://10.0.0.5:7000"


def test_peer_public_key_file_resolves_against_the_config_folder(
    tmp_path: Path, elsewhere: Path
) -> None:
    write(tmp_path / "conf" / "keys", f"{KEY}\n", "broker.pub")  # trailing newline is fine
    write(elsewhere / "keys", "wrong", "broker.pub")  # would be found if cwd were used
    broker_section = "  endpoint: tcp://b:5555\n  public_key_file: keys/broker.pub\n"
    config = peer(tmp_path, peer_text(broker_section=broker_section))
    assert config.broker_public_key == KEY.encode()


@pytest.mark.parametrize("username", ["a", "0", "alice", "a.b_c-d", "9lives", "a" * 32])
def test_peer_usernames_accepted(tmp_path: Path, username: str) -> None:
    assert peer(tmp_path, peer_text({"username": f"'{username}'"})).username == username


@pytest.mark.parametrize(
    "username",
    ["Alice", "-alice", ".alice", "_alice", "a" * 33, "al ice", "alice\\n", "ali/ce", "é"],
)
def test_peer_bad_username(tmp_path: Path, username: str) -> None:
    with pytest.raises(ConfigError, match=r"peer\.yaml: username: use 1-32 lowercase"):
        peer(tmp_path, peer_text({"username": f'"{username}"'}))


@pytest.mark.parametrize(
    ("top", "key"),
    [
        ({"colour": "red"}, "colour"),
        ({"username": None}, "username"),
        ({"username": "''"}, "username"),
        ({"username": "42"}, "username"),
        ({"listen": None}, "listen"),
        ({"listen": "tcp://*:0"}, "listen"),
        ({"listen": "7000"}, "listen"),
        ({"advertise": "tcp://alice.example"}, "advertise"),
        ({"advertise": "tcp://alice.example:70000"}, "advertise"),
        ({"data_dir": None}, "data_dir"),
        ({"download_dir": None}, "download_dir"),
        ({"download_dir": "''"}, "download_dir"),
        ({"transport_encryption": "1"}, "transport_encryption"),
        ({"transport_encryption": "'true'"}, "transport_encryption"),
        ({"transport_encryption": "null"}, "transport_encryption"),
        ({"window": "0"}, "window"),
        ({"window": "33"}, "window"),
        ({"window": "false"}, "window"),
        ({"heartbeat_interval": "0"}, "heartbeat_interval"),
        ({"heartbeat_interval": "3601"}, "heartbeat_interval"),
        ({"timeout": "0"}, "timeout"),
        ({"timeout": "1.5"}, "timeout"),
        ({"hello_timeout": "0"}, "hello_timeout"),
        ({"hello_timeout": "3601"}, "hello_timeout"),
    ],
)
def test_peer_refusals_name_the_key(tmp_path: Path, top: dict[str, str | None], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"peer\.yaml: {key}\b"):
        peer(tmp_path, peer_text(top))


@pytest.mark.parametrize(
    "top",
    [
        {"listen": "tcp://*:7000", "advertise": None},  # the default would be the wildcard
        {"listen": "tcp://0.0.0.0:7000", "advertise": None},
        {"advertise": "tcp://0.0.0.0:7000"},
        {"advertise": "'tcp://*:7000'"},
    ],
)
def test_peer_wildcard_advertise_is_refused(tmp_path: Path, top: dict[str, str | None]) -> None:
    with pytest.raises(ConfigError, match=r"peer\.yaml: advertise: "):
        peer(tmp_path, peer_text(top))


@pytest.mark.parametrize(
    ("broker_section", "key"),
    [
        ("  endpoint: tcp://b:5555\n  public_key: '{KEY}'\n  colour: red\n", "broker: colour"),
        ("  public_key: '{KEY}'\n", "broker: endpoint"),
        ("  endpoint: 'tcp://*:5555'\n  public_key: '{KEY}'\n", "broker: endpoint"),
        ("  endpoint: tcp://b:0\n  public_key: '{KEY}'\n", "broker: endpoint"),
        ("  endpoint: 5555\n  public_key: '{KEY}'\n", "broker: endpoint"),
        ("  endpoint: tcp://b:5555\n", "broker: set exactly one of public_key or public_key_file"),
        (
            "  endpoint: tcp://b:5555\n  public_key: '{KEY}'\n  public_key_file: k.pub\n",
            "broker: set exactly one of public_key or public_key_file",
        ),
        ("  endpoint: tcp://b:5555\n  public_key: ''\n", "broker: public_key"),
        ("  endpoint: tcp://b:5555\n  public_key: 42\n", "broker: public_key"),
        ("  endpoint: tcp://b:5555\n  public_key: null\n", "broker: public_key"),
        ("  endpoint: tcp://b:5555\n  public_key_file: ''\n", "broker: public_key_file"),
    ],
)
def test_peer_broker_section_refusals_name_the_key(
    tmp_path: Path, broker_section: str, key: str
) -> None:
    text = peer_text(broker_section=broker_section.replace("{KEY}", KEY))
    with pytest.raises(ConfigError, match=rf"peer\.yaml: {re.escape(key)}"):
        peer(tmp_path, text)


def test_peer_missing_broker_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"peer\.yaml: broker: missing \(required\)"):
        peer(tmp_path, peer_text(broker_section=""))


@pytest.mark.parametrize("value", ["tcp://b:5555", "[]", "null", "42"])
def test_peer_broker_section_that_is_not_a_mapping(tmp_path: Path, value: str) -> None:
    text = peer_text(broker_section="") + f"broker: {value}\n"
    with pytest.raises(ConfigError, match=r"peer\.yaml: broker"):
        peer(tmp_path, text)


@pytest.mark.parametrize(
    "bad_key",
    [
        KEY[:-1],  # 39 characters
        KEY + "0",  # 41 characters
        KEY[:-5],  # 35: a multiple of 5, decodes, but to 28 bytes
        "~" * 40,  # not in the z85 alphabet
        " " * 40,
        "é" * 40,
        "#" * 40,  # z85 characters whose groups overflow 32 bits
    ],
)
def test_peer_bad_inline_public_key(tmp_path: Path, bad_key: str) -> None:
    text = peer_text(broker_section=f"  endpoint: tcp://b:5555\n  public_key: '{bad_key}'\n")
    with pytest.raises(ConfigError, match=r"peer\.yaml: broker: public_key: not a CurveZMQ"):
        peer(tmp_path, text)


def test_peer_bad_key_in_the_public_key_file(tmp_path: Path) -> None:
    write(tmp_path / "conf", "#" * 40, "broker.pub")
    section = "  endpoint: tcp://b:5555\n  public_key_file: broker.pub\n"
    with pytest.raises(ConfigError, match=r"broker: public_key_file: not a CurveZMQ"):
        peer(tmp_path, peer_text(broker_section=section))


@pytest.mark.parametrize("case", ["missing", "folder", "not-ascii"])
def test_peer_unreadable_public_key_file(tmp_path: Path, case: str) -> None:
    # (Permission bits are no test here: the suite may run as root.)
    target = tmp_path / "conf" / "broker.pub"
    target.parent.mkdir(parents=True)
    if case == "folder":
        target.mkdir()
    elif case == "not-ascii":
        target.write_bytes(KEY.encode()[:-1] + b"\xe9")
    section = "  endpoint: tcp://b:5555\n  public_key_file: broker.pub\n"
    with pytest.raises(ConfigError, match=r"broker: public_key_file: cannot read .*broker\.pub"):
        peer(tmp_path, peer_text(broker_section=section))


# --- parse_z85_key directly --------------------------------------------------------------------


def test_parse_z85_key() -> None:
    assert parse_z85_key(KEY, "here") == KEY.encode()
    with pytest.raises(ConfigError, match=r"^here: "):
        parse_z85_key("#" * 40, "here")
    with pytest.raises(ConfigError, match=r"^here: "):
        parse_z85_key("", "here")


BROKER_EXTRA = {
    "bcrypt_rounds": 4,
    "workers": 2,
    "session_ttl": 60,
    "presence_ttl": 30,
    "login_attempts": 5,
    "login_lockout": 30,
    "registrations_per_key": 10,
    "registrations_per_address": 200,
    "quota_files": 10,
    "quota_manifest_mib": 10,
    "database": "other.db",
    "relay": "{bind: 'tcp://*:5602', advertise: 'tcp://relay.example:5602'}",
}
PEER_EXTRA = {
    "transport_encryption": "true",
    "window": "8",
    "heartbeat_interval": "10",
    "timeout": "10",
    "hello_timeout": "2",
    "seed": "false",
    "upload_rate": "0",
    "data_listen": "tcp://*:7011",
    "relay": "always",
}


@pytest.mark.parametrize(
    ("top", "message"),
    [
        # A misspelled required key is named, not reported as the correct one missing.
        (
            {"downlaod_dir": "x", "download_dir": None},
            "downlaod_dir: unknown key (did you mean download_dir?)",
        ),
        ({"usernmae": "alice", "username": None}, "usernmae: unknown key (did you mean username?)"),
        ({"widnow": "8"}, "widnow: unknown key (did you mean window?)"),
        ({"colour": "blue", "listen": None}, "colour: unknown key"),
    ],
)
def test_peer_unknown_key_comes_before_missing_ones(
    tmp_path: Path, top: dict[str, str | None], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        peer(tmp_path, peer_text(top))
    assert str(refused.value) == f"peer.yaml: {message}"


def test_peer_broker_section_unknown_key_has_a_suggestion(tmp_path: Path) -> None:
    text = peer_text(broker_section=f"  endpiont: tcp://b:5555\n  public_key: '{KEY}'\n")
    with pytest.raises(ConfigError) as refused:
        peer(tmp_path, text)
    assert str(refused.value) == "peer.yaml: broker: endpiont: unknown key (did you mean endpoint?)"


def test_shipped_configs_load_and_their_comments_agree_with_the_limits(tmp_path: Path) -> None:
    """The configs in configs/ load (copied, beside a broker key where `init` puts it),
    and broker.yaml's comment on bcrypt_rounds gives the validator's range, 4 to 16."""
    shipped = Path(__file__).resolve().parents[2] / "configs"
    configs = tmp_path / "configs"
    configs.mkdir()
    for path in shipped.glob("*.yaml"):
        (configs / path.name).write_text(path.read_text())
    write(tmp_path / "var" / "broker", KEY + "\n", "broker.pub")
    for name in ("alice", "bob", "carol"):
        assert load_peer_config(configs / f"{name}.yaml").username == name
    text = (configs / "broker.yaml").read_text()
    assert re.search(r"bcrypt_rounds: \d+ +# .*\(4 to 16\)", text)
    assert load_broker_config(configs / "broker.yaml").bcrypt_rounds == 12
    for rounds, accepted in ((3, False), (4, True), (16, True), (17, False)):
        changed = write(
            configs, re.sub(r"bcrypt_rounds: \d+", f"bcrypt_rounds: {rounds}", text), "b.yaml"
        )
        if accepted:
            assert load_broker_config(changed).bcrypt_rounds == rounds
        else:
            with pytest.raises(
                ConfigError, match="bcrypt_rounds: expected a whole number from 4 to 16"
            ):
                load_broker_config(changed)


def test_data_listen(tmp_path: Path) -> None:
    assert peer(tmp_path / "a", peer_text({})).data_listen is None
    assert peer(tmp_path / "b", peer_text({"data_listen": "off"})).data_listen == "off"
    text = peer_text({"data_listen": "tcp://*:7011"})
    assert peer(tmp_path / "c", text).data_listen == "tcp://*:7011"
    with pytest.raises(ConfigError, match="data_listen: expected"):
        peer(tmp_path / "d", peer_text({"data_listen": "7011"}))


# --- the relay ----------------------------------------------------------------------------


def test_relay_section_defaults_and_limits(tmp_path: Path) -> None:
    assert broker(tmp_path / "none", BROKER).relay is None
    config = broker(tmp_path / "a", BROKER + "relay:\n  bind: tcp://10.0.0.1:5602\n")
    assert config.relay is not None
    assert config.relay.advertise == "tcp://10.0.0.1:5602"  # a concrete bind is its own
    assert config.relay.limits.user_circuits == 8 and config.relay.limits.global_rate == 0
    text = (
        BROKER + "relay:\n  bind: tcp://*:5602\n  advertise: tcp://[2001:db8::1]:5602\n"
        "  limits: {user_circuits: 2, idle: 30}\n"
        "  relays: [{endpoint: 'tcp://r2.example:5602', key: '" + "0" * 40 + "'}]\n"
    )
    config = broker(tmp_path / "b", text)
    assert config.relay is not None
    assert config.relay.limits.user_circuits == 2 and config.relay.limits.idle == 30
    assert config.relay.others == (("tcp://r2.example:5602", b"0" * 40),)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("relay:\n  bind: tcp://*:5602\n", "relay: advertise: missing (required)"),
        ("relay:\n  bind: tcp://[::1:5602\n", "relay: bind: expected"),
        ("relay:\n  bind: tcp://a:1\n  limits: {idle: 1}\n", "limits: idle: expected"),
        ("relay:\n  bind: tcp://a:1\n  limit: {}\n", "unknown key (did you mean limits?)"),
        ("relay:\n  bind: tcp://a:1\n  relays: [{endpoint: 'tcp://b:1', key: x}]\n", "key: not"),
    ],
)
def test_relay_section_errors_are_one_line(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        broker(tmp_path, BROKER + section)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_peer_relay_mode(tmp_path: Path) -> None:
    assert peer(tmp_path / "a", peer_text({})).relay == "auto"
    with pytest.raises(ConfigError, match="relay: expected auto, always or never"):
        peer(tmp_path / "b", peer_text({"relay": "sometimes"}))
