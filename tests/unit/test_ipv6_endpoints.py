"""IPv6 endpoints (`tcp://[ADDRESS]:PORT`): accepted by the wire codec and by every config key
that takes an endpoint; hostile forms refused, on the wire with a ProtocolError and in a
config with a one-line ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.utils.z85

from sfs.common.codec import from_wire
from sfs.common.config import load_broker_config, load_peer_config
from sfs.common.errors import ConfigError, ProtocolError
from sfs.common.protocol import Heartbeat, valid_endpoint

KEY = zmq.utils.z85.encode(bytes(range(32))).decode()

GOOD = [
    "tcp://[::1]:5601",
    "tcp://[2001:db8::1]:5601",
    "tcp://[2001:DB8:0:0:0:0:0:1]:1",
    "tcp://[fd00:5f5::2]:65535",
    "tcp://[::ffff:192.0.2.1]:5601",  # IPv4-mapped: still an IPv6 literal
    "tcp://[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:9",  # the longest form, 45
    # The forms accepted before, unchanged:
    "tcp://127.0.0.1:5601",
    "tcp://broker.example:5555",
    "tcp://localhost:1",
]

HOSTILE = [
    "tcp://[::1",  # no closing bracket
    "tcp://[::1]",  # no port
    "tcp://[::1]:",
    "tcp://[::1]:0",
    "tcp://[::1]:99999",
    "tcp://[::1]:65536",
    "tcp://[zz::1]:1",  # not hex
    "tcp://[1:2:3]:1",  # too few groups
    "tcp://[1:2:3:4:5:6:7:8:9]:1",  # too many
    "tcp://[1::2::3]:1",  # two "::"
    "tcp://[:::]:1",
    "tcp://[]:1",
    "tcp://[127.0.0.1]:1",  # brackets around IPv4
    "tcp://[localhost]:1",  # brackets around a name
    "tcp://[fe80::1%eth0]:1",  # zone id: an interface of the sender's machine
    "tcp://[fe80::1%25eth0]:1",  # the same, URL-escaped
    "tcp://::1:5601",  # IPv6 without brackets
    "tcp://[::1]]:1",
    "tcp://[[::1]]:1",
    "tcp://[::1]:1/x",
    "tcp://[::1]:+1",
    "tcp://[" + "0:" * 200 + "1]:1",  # long: refused by the pattern's bound
    "tcp://[::1]:1\n",
    "tcp://[::1]:1\0",
    "tcp://[ ::1]:1",
    "tcp://[::1 ]:1",
    "udp://[::1]:1",
    "tcp://[::]:*",
]


@pytest.mark.parametrize("endpoint", GOOD)
def test_ipv6_and_older_endpoints_pass_the_codec(endpoint: str) -> None:
    assert valid_endpoint(endpoint)
    assert from_wire(Heartbeat, {"token": "t", "endpoint": endpoint}).endpoint == endpoint


@pytest.mark.parametrize("endpoint", HOSTILE)
def test_hostile_ipv6_endpoints_are_refused_by_the_codec(endpoint: str) -> None:
    assert not valid_endpoint(endpoint)
    assert not valid_endpoint(endpoint, bind=True)
    with pytest.raises(ProtocolError, match=r"^endpoint: "):
        from_wire(Heartbeat, {"token": "t", "endpoint": endpoint})


def test_an_endpoint_over_300_characters_is_refused_before_any_pattern() -> None:
    endpoint = "tcp://[" + "1" * 400 + "]:1"
    with pytest.raises(ProtocolError, match=r"^endpoint: longer than 300$"):
        from_wire(Heartbeat, {"token": "t", "endpoint": endpoint})


def test_only_a_bind_may_use_the_wildcard() -> None:
    assert valid_endpoint("tcp://*:1", bind=True)
    assert not valid_endpoint("tcp://*:1")
    assert valid_endpoint("tcp://[::]:1", bind=True)  # every IPv6 address: zmq knows it
    assert not valid_endpoint("tcp://[*]:1", bind=True)


# --- configs ------------------------------------------------------------------------------------


def peer_yaml(tmp_path: Path, listen: str, advertise: str | None, broker: str) -> Path:
    lines = [
        "username: alice",
        f"listen: '{listen}'",
        "data_dir: data",
        "download_dir: downloads",
        "broker:",
        f"  endpoint: {broker}",
        f"  public_key: '{KEY}'",
    ]
    if advertise is not None:
        lines.append(f"advertise: '{advertise}'")
    path = tmp_path / "peer.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_config_endpoint_takes_ipv6(tmp_path: Path) -> None:
    broker = tmp_path / "broker.yaml"
    broker.write_text("bind: 'tcp://[2001:db8::1]:5600'\ndata_dir: d\n")
    assert load_broker_config(broker).bind == "tcp://[2001:db8::1]:5600"

    path = peer_yaml(tmp_path, "tcp://[::]:5601", "tcp://[2001:db8::7]:5601", "'tcp://[::1]:5600'")
    config = load_peer_config(path)
    assert (config.listen, config.advertise) == ("tcp://[::]:5601", "tcp://[2001:db8::7]:5601")
    assert config.broker_endpoints == ("tcp://[::1]:5600",)

    listed = "['tcp://[::1]:5600', 'tcp://127.0.0.1:5600']"
    assert load_peer_config(peer_yaml(tmp_path, "tcp://[::1]:5601", None, listed)).brokers == (
        "tcp://[::1]:5600",
        "tcp://127.0.0.1:5600",
    )


@pytest.mark.parametrize(
    "listen", ["tcp://[::]:5601", "tcp://[0::0]:5601", "tcp://[0:0:0:0:0:0:0:0]:1"]
)
def test_the_ipv6_wildcard_is_not_an_address_to_advertise(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^peer\.yaml: advertise: set it to an address"):
        load_peer_config(peer_yaml(tmp_path, listen, None, "tcp://b:1"))


@pytest.mark.parametrize("endpoint", HOSTILE[:12])
def test_hostile_ipv6_endpoints_are_refused_in_every_config_key(
    tmp_path: Path, endpoint: str
) -> None:
    broker = tmp_path / "broker.yaml"
    broker.write_text(f"bind: '{endpoint}'\ndata_dir: d\n")
    with pytest.raises(
        ConfigError, match=r"^broker\.yaml: bind: expected tcp://HOST:PORT or tcp://\[IPV6\]:PORT"
    ):
        load_broker_config(broker)
    cases = [
        ("listen", endpoint, "tcp://[::1]:1", "tcp://b:1"),
        ("advertise", "tcp://[::1]:1", endpoint, "tcp://b:1"),
        ("broker: endpoint", "tcp://[::1]:1", None, f"'{endpoint}'"),
        ("broker: endpoint", "tcp://[::1]:1", None, f"['tcp://b:1', '{endpoint}']"),
    ]
    for key, listen, advertise, brokers in cases:
        with pytest.raises(ConfigError) as raised:
            load_peer_config(peer_yaml(tmp_path, listen, advertise, brokers))
        message = str(raised.value)
        assert message.startswith(f"peer.yaml: {key}: expected "), message
        assert "\n" not in message
