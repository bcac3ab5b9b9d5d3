"""Pinned fingerprints, like SSH's known_hosts: the first key bundle seen for a user is
pinned; a different one later is refused until the user trusts it explicitly. Trusting
never replaces a pin silently: `trust` refuses a different fingerprint unless asked to
replace it, so that a message like "bob has a new key, trust XXXX" needs a second,
deliberate step.

A pin is "verified" once the user compared `sfs-peer verify`'s safety code with the other
person and confirmed it; the mark belongs to that fingerprint and goes with any change.

Stored in data_dir/pins.json as {username: {"fingerprint": hex, "source": ..., "at": time,
"verified_at": time or absent}}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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
    verified_at: int | None = None  # when the safety code was confirmed, for this key

    @property
    def verified(self) -> bool:
        return self.verified_at is not None


# Asked before a pin to another key is replaced: (the pin there is, the fingerprint of
# the key the broker serves for that user, if it was asked) -> replace it?
ConfirmReplace = Callable[[Pin, bytes | None], bool]


@dataclass(frozen=True)
class Trusted:
    """What `sfs-peer trust` did, and what the broker said about it."""

    username: str
    fingerprint: bytes
    previous: Pin | None  # the pin there was, if any
    broker: str  # "same", "different", "unknown user" or "not asked"
    served: bytes | None  # the fingerprint of the key the broker serves for the user
    note: str | None = None  # why the broker was not asked

    @property
    def changed(self) -> bool:
        return self.previous is None or self.previous.fingerprint != self.fingerprint


class PinStore:
    def __init__(self, path: Path) -> None:
        self._path = path

    def _load(self) -> dict[str, Pin]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
            pins = {
                name: Pin(
                    name,
                    bytes.fromhex(entry["fingerprint"]),
                    entry["source"],
                    entry["at"],
                    entry.get("verified_at"),
                )
                for name, entry in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"the pin file {self._path} is unreadable or corrupt") from exc
        if not all(type(p.verified_at) in (int, type(None)) for p in pins.values()):
            raise StorageError(f"the pin file {self._path} is unreadable or corrupt")
        return pins

    def _save(self, pins: dict[str, Pin]) -> None:
        data = {
            pin.username: {
                "fingerprint": pin.fingerprint.hex(),
                "source": pin.source,
                "at": pin.pinned_at,
                **({"verified_at": pin.verified_at} if pin.verified_at is not None else {}),
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
                f"{format_fingerprint(fingerprint)} --replace"
            )
        return False

    def trust(
        self, username: str, fingerprint: bytes, *, replace: bool | bytes = False
    ) -> Pin | None:
        """Pin `username` to `fingerprint` by hand; return the pin there was (None if none).

        A pin to another fingerprint is replaced only with `replace`: True replaces any
        pin, bytes only a pin to exactly that fingerprint (the one the user was shown).
        Otherwise `PinConflict` is raised and the pin is kept. Trusting the pinned
        fingerprint again changes only its source, to "trusted by hand"."""
        with locked(self._path):
            pins = self._load()
            previous = pins.get(username)
            since = int(time.time())
            if previous is not None and crypto.same_bytes(previous.fingerprint, fingerprint):
                since = previous.pinned_at
            elif previous is not None:
                shown = replace if isinstance(replace, bytes) else previous.fingerprint
                if replace is False or not crypto.same_bytes(previous.fingerprint, shown):
                    raise PinConflict(previous, fingerprint)
            verified = None
            if previous is not None and crypto.same_bytes(previous.fingerprint, fingerprint):
                verified = previous.verified_at  # the same key: still the one compared
            pins[username] = Pin(username, fingerprint, "trusted by hand", since, verified)
            self._save(pins)
        return previous

    def mark_verified(self, username: str, fingerprint: bytes) -> Pin:
        """Mark `username`'s pin verified, if it is still pinned to `fingerprint` (the key
        whose safety code the user compared); `TrustError` if not."""
        with locked(self._path):
            pins = self._load()
            pin = pins.get(username)
            if pin is None or not crypto.same_bytes(pin.fingerprint, fingerprint):
                raise TrustError(
                    f"the pin of {username} changed while the safety code was shown;"
                    " run `sfs-peer verify` again"
                )
            pins[username] = dataclasses.replace(pin, verified_at=int(time.time()))
            self._save(pins)
            return pins[username]


class PinConflict(TrustError):
    """A user is pinned to another fingerprint than the one to trust; `pin` is kept."""

    def __init__(self, pin: Pin, fingerprint: bytes) -> None:
        since = datetime.fromtimestamp(pin.pinned_at, UTC).strftime("%Y-%m-%d")
        super().__init__(
            f"{pin.username} is pinned to {format_fingerprint(pin.fingerprint)} ({pin.source},"
            f" {since}), not {format_fingerprint(fingerprint)}; if {pin.username} really has"
            " a new key (check with them), run again with --replace"
        )
        self.pin = pin
        self.fingerprint = fingerprint
