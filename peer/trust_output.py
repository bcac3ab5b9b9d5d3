"""What `sfs-peer` prints about pinned keys: `peers`, `verify`, `trust`, and the note on
first contact with a user."""

from __future__ import annotations

import sys

from sfs.common.cli import print_json, stdout
from sfs.common.identity import format_fingerprint
from sfs.peer import tables
from sfs.peer.node import Verification
from sfs.peer.output import pin_text, print_table, warn, when
from sfs.peer.pins import Pin, Trusted
from sfs.peer.tables import Column


def print_peers(pins: list[Pin], wide: bool, json: bool) -> None:
    if json:
        print_json(
            [
                {
                    "username": p.username,
                    "fingerprint": format_fingerprint(p.fingerprint),
                    "source": p.source,
                    "pinned_at": p.pinned_at,
                    "verified": p.verified,
                    "verified_at": p.verified_at,
                }
                for p in pins
            ]
        )
        return
    full = wide or not stdout.is_terminal
    columns = [
        Column("user", wraps=True),
        Column("fingerprint"),
        Column("verified"),
        Column("pinned", keep=2),
        Column("since", keep=1),
    ]
    rows = [
        [
            p.username,
            format_fingerprint(p.fingerprint) if full else tables.short_fingerprint(p.fingerprint),
            "yes" if p.verified else "no",
            p.source,
            when(p.pinned_at),
        ]
        for p in pins
    ]
    shortened = None if full else "full fingerprints"
    print_table(columns, rows, wide=wide, empty="no pinned peers yet", shortened=shortened)
    if not all(p.verified for p in pins) and stdout.is_terminal:
        stdout.print("compare safety codes with `sfs-peer verify USER` to verify a pin")


def print_verification(done: Verification, username: str, confirm: bool, json: bool) -> None:
    pin = done.pin
    if json:
        print_json(
            {
                "username": pin.username,
                "fingerprint": format_fingerprint(pin.fingerprint),
                "safety_code": done.code,
                "verified": pin.verified,
                "verified_at": pin.verified_at,
                "pinned_now": done.pinned_now,
            }
        )
        return
    if done.pinned_now:
        stdout.print(f"pinned the key the broker serves for {username} (first use)")
    groups = done.code.split()
    half = len(groups) // 2
    stdout.print(f"safety code of you and {username} (they see the same):")
    stdout.print("  " + " ".join(groups[:half]))
    stdout.print("  " + " ".join(groups[half:]))
    if pin.verified and confirm:
        stdout.print(f"the pin of {username} is now marked verified")
    elif pin.verified:
        stdout.print(f"verified on {when(pin.verified_at or 0)}")
    else:
        stdout.print(
            f"compare it with {username} in person or on a call (not in a message sent through"
            f" sfs); if it matches, run: sfs-peer verify {username} --confirm"
        )


def print_trusted(done: Trusted, username: str, wanted: bytes, json: bool) -> None:
    previous = done.previous
    if json:
        print_json(
            {
                "username": done.username,
                "fingerprint": format_fingerprint(done.fingerprint),
                "previous": format_fingerprint(previous.fingerprint) if previous else None,
                "changed": done.changed,
                "broker": done.broker,
                "broker_fingerprint": format_fingerprint(done.served) if done.served else None,
            }
        )
    elif not done.changed:
        stdout.print(f"{username} was already pinned to {format_fingerprint(wanted)}")
    else:
        stdout.print(f"{username} is now pinned to {format_fingerprint(wanted)}")
        if previous is not None:
            stdout.print(f"replaced the pin to {pin_text(previous)}")
    if done.broker == "same" and not json:
        stdout.print(f"the broker serves this same key for {username}")
    elif done.broker == "different" and done.served is not None:
        warn(
            f"the broker serves another key for {username}: {format_fingerprint(done.served)};"
            f" {username}'s files and requests are refused until the two match"
        )
    elif done.note is not None:
        warn(f"not checked with the broker: {done.note}")


def first_contact(pins: list[Pin]) -> None:
    """Say, once per user, that a key was pinned on first use and how to verify it."""
    for pin in pins:
        print(
            f"first contact with {pin.username}: pinned their key"
            f" ({tables.short_fingerprint(pin.fingerprint)}) on first use; to be sure it is"
            f" theirs, compare safety codes with them: sfs-peer verify {pin.username}",
            file=sys.stderr,
        )
