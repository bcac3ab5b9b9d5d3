"""The wheel must contain every sub-package: one missing from pyproject's `packages`
still imports in an editable install but is silently left out of a wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_on_disk_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = config["package-dir"]
    on_disk = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *relative.parts]))
    assert on_disk == listed


def test_console_scripts_point_at_real_functions() -> None:
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"sfs-broker", "sfs-peer"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_only_the_crypto_recipes_touch_hazmat() -> None:
    users = [
        path.relative_to(ROOT).as_posix()
        for folder in ("common", "broker", "peer")
        for path in (ROOT / folder).rglob("*.py")
        if "cryptography.hazmat" in path.read_text()
    ]
    assert users == ["common/crypto.py"]
