"""The systemd units in configs/: hardened as the README says, and valid to systemd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
UNITS = ["sfs-broker.service", "sfs-peer-serve@.service", "sfs-relay.service"]


def settings(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (CONFIGS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_hardened_and_restart_on_failure(unit: str) -> None:
    found = settings(unit)
    assert found["User"][0].startswith("sfs-") and found["User"][0] != "root"
    for key, value in {
        "ProtectSystem": "strict",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "PrivateTmp": "yes",
        "SystemCallFilter": "@system-service",
    }.items():
        assert found[key] == [value], key
    assert found["StateDirectoryMode"] == ["0700"]
    serve = found["ExecStart"][0].split()
    assert serve[1] == ("relay" if unit == "sfs-relay.service" else "serve")
    assert "--config" in serve


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_accepts_the_units(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    name = unit.replace("@.", "@x.")  # a template is checked as an instance
    (tmp_path / name).write_text((CONFIGS / unit).read_text())
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The executables are where `pip install` puts them on the target, not here.
    problems = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert problems == []
