"""A peer's `broker.endpoint`: one endpoint, or the list of every broker of a deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfs.common.config import MAX_BROKERS
from sfs.common.errors import ConfigError
from tests.unit.test_config import KEY, peer, peer_text


def with_endpoint(value: str) -> str:
    return peer_text(broker_section=f"  endpoint: {value}\n  public_key: '{KEY}'\n")


def test_one_endpoint_is_a_list_of_one(tmp_path: Path) -> None:
    config = peer(tmp_path, with_endpoint("tcp://broker.example:5555"))
    assert config.brokers == ("tcp://broker.example:5555",)
    assert config.broker_endpoint == "tcp://broker.example:5555"


def test_a_list_of_endpoints_in_order(tmp_path: Path) -> None:
    text = with_endpoint(
        "\n    - tcp://b1.example:5555\n    - tcp://10.0.0.2:6000\n    - tcp://b3:1"
    )
    config = peer(tmp_path, text)
    assert config.brokers == ("tcp://b1.example:5555", "tcp://10.0.0.2:6000", "tcp://b3:1")
    assert config.broker_endpoint == "tcp://b1.example:5555"  # named in prompts


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "a list of 1 to"),
        ("[tcp://a:1, 5]", "got 5"),
        ("[tcp://a:1, 'http://b:2']", "got 'http://b:2'"),
        ("[tcp://a:1, tcp://a:1]", "lists an endpoint twice"),
        ("{a: 1}", "expected a non-empty string"),
        ("[" + ", ".join(f"tcp://b{n}:1" for n in range(MAX_BROKERS + 1)) + "]", "1 to 16"),
    ],
)
def test_bad_lists_are_refused_naming_the_key(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="broker: endpoint") as refused:
        peer(tmp_path, with_endpoint(value))
    assert message in str(refused.value)
