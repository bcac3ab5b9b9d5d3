"""`upload_rate` in the peer config: off by default, a whole number of bytes a second,
and never so low that a 1 MiB chunk cannot reach a downloader within its timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfs.common.config import MIN_UPLOAD_RATE
from sfs.common.errors import ConfigError
from tests.unit.test_config import peer, peer_text


def test_off_by_default(tmp_path: Path) -> None:
    assert peer(tmp_path, peer_text()).upload_rate == 0


@pytest.mark.parametrize("rate", [0, MIN_UPLOAD_RATE, 10 * 1024 * 1024, 10**12])
def test_accepted(tmp_path: Path, rate: int) -> None:
    assert peer(tmp_path, peer_text({"upload_rate": str(rate)})).upload_rate == rate


@pytest.mark.parametrize("rate", ["1", str(MIN_UPLOAD_RATE - 1)])
def test_too_low_says_why(tmp_path: Path, rate: str) -> None:
    with pytest.raises(ConfigError, match=r"peer\.yaml: upload_rate: 0 \(no cap\) or at least"):
        peer(tmp_path, peer_text({"upload_rate": rate}))


@pytest.mark.parametrize("rate", ["-1", "1.5", "'1MiB'", "true", str(10**12 + 1)])
def test_not_a_rate(tmp_path: Path, rate: str) -> None:
    with pytest.raises(ConfigError, match=r"peer\.yaml: upload_rate: expected a whole number"):
        peer(tmp_path, peer_text({"upload_rate": rate}))
