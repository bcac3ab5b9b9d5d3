"""Shared by the benchmarks: sizes, the random payload, checking what arrived."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

BLOCK = 1 << 20
# Binary units before decimal ones, so that "MiB" is never read as "...B".
UNITS = {
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def progress(message: str) -> None:
    """A line on stderr while a benchmark runs (results go to stdout and results.md)."""
    print(message, file=sys.stderr, flush=True)


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


class BenchError(Exception):
    """A benchmark cannot run or went wrong; the message is one line for the user."""


def parse_size(text: str) -> int:
    """`1GiB`, `64MiB`, `500MB` or a number of bytes."""
    lowered = text.strip().lower()
    factor = 1
    for unit, value in UNITS.items():
        if lowered.endswith(unit):
            lowered, factor = lowered[: -len(unit)], value
            break
    try:
        size = int(float(lowered) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB or 1GiB)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive: {text!r}")
    return size


def format_size(size: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size:,} bytes"


def write_random_file(path: Path, size: int) -> str:
    """`size` random bytes, written in 1 MiB blocks (constant memory); returns their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        left = size
        while left > 0:
            block = os.urandom(min(BLOCK, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
        handle.flush()
        # On disk before the first round, so that no round competes with its writeback.
        os.fsync(handle.fileno())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_and_remove(path: Path, size: int, digest: str) -> None:
    """The received copy has the source's size and SHA-256; it is deleted either way."""
    try:
        if not path.is_file():
            raise BenchError(f"nothing was received at {path}")
        if path.stat().st_size != size:
            raise BenchError(f"{path} has {path.stat().st_size} bytes, expected {size}")
        if sha256_file(path) != digest:
            raise BenchError(f"{path} differs from the source (SHA-256)")
    finally:
        path.unlink(missing_ok=True)
