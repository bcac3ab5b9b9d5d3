"""The sfs exception tree. Every error sfs raises on purpose descends from `SfsError`,
and `str(error)` is the one line a user sees.

    SfsError
    ├── UsageError        a value the user gave is not acceptable (a password too long)
    ├── ConfigError       a config file is missing, unreadable or invalid
    ├── KeyFileError      a key file is missing, unreadable, malformed or too open
    ├── StorageError      a local file or database could not be read or written
    ├── ProtocolError     a frame could not be decoded or is not a valid message
    ├── IntegrityError    a signature, AEAD tag or hash did not verify
    ├── TrustError        a key does not match the fingerprint pinned for its user
    ├── TransportError    the other side did not answer or could not be reached
    ├── RemoteError       the other side answered with an error (carries its code)
    ├── InUse             another process holds what this one needs (a lock, an address)
    ├── Interrupted       Ctrl-C or SIGTERM stopped a command; says what was kept
    └── protocol.Refused  raised by a server to answer a request with an error code

Foreign exceptions (zmq, sqlite3, msgpack, yaml, OSError) are translated into this
tree where they happen, with `raise ... from exc`, so the CLI catches only these.
"""

from __future__ import annotations


class SfsError(Exception):
    """Base class; the message is written for a person."""

    exit_code = 1


class UsageError(SfsError):
    exit_code = 2


class ConfigError(SfsError):
    exit_code = 2


class KeyFileError(SfsError):
    pass


class StorageError(SfsError):
    pass


class ProtocolError(SfsError):
    pass


class IntegrityError(SfsError):
    exit_code = 3


class TrustError(SfsError):
    exit_code = 4


class TransportError(SfsError):
    exit_code = 5


class InUse(SfsError):
    pass


class Interrupted(SfsError):
    exit_code = 130


class RemoteError(SfsError):
    """An error reply; `code` is one of `sfs.common.protocol.ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
