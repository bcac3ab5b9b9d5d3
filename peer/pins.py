"""Pinned fingerprints, like SSH's known_hosts: the first key bundle seen for a user is
pinned; a different one later is refused until the user trusts it explicitly.

Stored in data_dir/pins.json as {username: {"fingerprint": hex, "source": ...}}.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sfs.common import crypto
from sfs.common.errors import StorageError, TrustError
from sfs.common.files import locked, write_private_file
from sfs.common.identity import KeyBundle, format_fingerprint


@dataclass(frozen=True)
class Pin:
    username: str
    fingerprint: bytes
    source: str  # "first use" or "trusted by hand"
    pinned_at: int


class PinStore:
    def __init__(self, path: Path) -> None:
        self._path = path

    def _load(self) -> dict[str, Pin]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
            return {
                name: Pin(name, bytes.fromhex(entry["fingerprint"]), entry["source"], entry["at"])
                for name, entry in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"the pin file {self._path} is unreadable or corrupt") from exc

    def _save(self, pins: dict[str, Pin]) -> None:
        data = {
            pin.username: {
                "fingerprint": pin.fingerprint.hex(),
                "source": pin.source,
                "at": pin.pinned_at,
            }
            for pin in sorted(pins.values(), key=lambda p: p.username)
        }
        write_private_file(self._path, json.dumps(data, indent=2).encode() + b"\n")

    def all(self) -> list[Pin]:
        with locked(self._path):
            return sorted(self._load().values(), key=lambda p: p.username)

    def get(self, username: str) -> Pin | None:
        with locked(self._path):
            return self._load().get(username)

    def check(self, username: str, bundle: KeyBundle, *, pin_new: bool = True) -> bool:
        """Accept `bundle` for `username` if it matches the pin, or (with `pin_new`) pin
        it on first use. Returns True if there was no pin. Raises `TrustError` if the
        key changed."""
        fingerprint = bundle.fingerprint()
        with locked(self._path):
            pins = self._load()
            pin = pins.get(username)
            if pin is None:
                if pin_new:
                    pins[username] = Pin(username, fingerprint, "first use", int(time.time()))
                    self._save(pins)
                return True
        if not crypto.same_bytes(pin.fingerprint, fingerprint):
            raise TrustError(
                f"the key of {username} has changed: pinned {format_fingerprint(pin.fingerprint)}, "
                f"now offered {format_fingerprint(fingerprint)}. If {username} really has a new "
                f"key (check with them), run: sfs-peer trust {username} "
                f"{format_fingerprint(fingerprint)}"
            )
        return False

    def trust(self, username: str, fingerprint: bytes) -> None:
        with locked(self._path):
            pins = self._load()
            pins[username] = Pin(username, fingerprint, "trusted by hand", int(time.time()))
            self._save(pins)
