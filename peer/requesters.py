"""Who is asking: the holder's check that a requester's key bundle is really theirs.

A bundle must match the fingerprint pinned for that user. On first contact there is
no pin, so the bundle must match the one the broker has registered, and is then
pinned. Asking the broker takes a network round trip, which must never stall the
serving loop: lookups run in a background thread, and until one has answered, the
requester is told to retry in a moment (error `busy`, which downloaders retry).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sfs.common import crypto
from sfs.common.errors import RemoteError, SfsError, TrustError
from sfs.common.identity import KeyBundle
from sfs.common.protocol import ErrorCode, Refused
from sfs.peer.client import BrokerClient
from sfs.peer.pins import PinStore
from sfs.peer.session import DeviceSession

log = logging.getLogger("sfs.peer")

VERDICT_TTL = 60.0  # seconds a broker answer is reused for users not pinned
MAX_PENDING_LOOKUPS = 64
# Broker answers kept at most. Any client may say hello under any name, so without a
# bound a stream of made-up names would grow them without end.
MAX_VERDICTS = 10_000

RETRY = "the holder is checking your key with the broker; retry in a moment"


@dataclass(frozen=True)
class _Verdict:
    fingerprint: bytes | None  # the registered key's fingerprint; None: no such user
    until: float


class RequesterCheck:
    def __init__(
        self,
        pins: PinStore,
        connect: Callable[[], BrokerClient],
        session: DeviceSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pins, self._connect, self._session, self._clock = pins, connect, session, clock
        self._verdicts: dict[str, _Verdict] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._lookups: queue.Queue[str | None] = queue.Queue(MAX_PENDING_LOOKUPS)
        self._worker = threading.Thread(target=self._look_up, name="key-lookups", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._lookups.put(None)
        self._worker.join()

    def __call__(self, username: str, bundle: KeyBundle) -> None:
        """Return if `bundle` is `username`'s; raise `Refused` otherwise, or `busy`
        while the broker is being asked."""
        if self._pins.get(username) is None:
            self._compare_with_broker(username, bundle)
        try:
            self._pins.check(username, bundle)
        except TrustError as exc:
            log.warning("refused a request: %s", exc)
            raise Refused(
                ErrorCode.FORBIDDEN, "your key does not match the one this holder pinned for you"
            ) from exc

    def _compare_with_broker(self, username: str, bundle: KeyBundle) -> None:
        with self._lock:
            verdict = self._verdicts.get(username)
            if verdict is None or verdict.until <= self._clock():
                self._ask(username)
                raise Refused(ErrorCode.BUSY, RETRY)
        if verdict.fingerprint is None:
            raise Refused(ErrorCode.FORBIDDEN, f"{username} is not registered")
        if not crypto.same_bytes(verdict.fingerprint, bundle.fingerprint()):
            raise Refused(ErrorCode.FORBIDDEN, "your key is not the one registered for you")

    def _ask(self, username: str) -> None:
        """Queue a broker lookup for `username` (caller holds the lock)."""
        if username in self._pending:
            return
        try:
            self._lookups.put_nowait(username)
        except queue.Full:
            raise Refused(ErrorCode.BUSY, "the holder is busy; retry later") from None
        self._pending.add(username)

    def _look_up(self) -> None:
        with self._connect() as broker:
            while (username := self._lookups.get()) is not None:
                verdict = self._registered(broker, username)
                with self._lock:
                    self._pending.discard(username)
                    if verdict is not None:
                        self._remember(username, verdict)

    def _remember(self, username: str, verdict: _Verdict) -> None:
        """Keep a broker answer (caller holds the lock), dropping the expired ones and,
        beyond `MAX_VERDICTS`, the oldest. All answers live equally long and are
        (re)inserted as they come, so the oldest are first in the dict."""
        self._verdicts.pop(username, None)
        self._verdicts[username] = verdict
        now = self._clock()
        while self._verdicts:
            oldest = next(iter(self._verdicts))
            if len(self._verdicts) <= MAX_VERDICTS and self._verdicts[oldest].until > now:
                break
            del self._verdicts[oldest]

    def _registered(self, broker: BrokerClient, username: str) -> _Verdict | None:
        """What the broker says of `username`; None if it could not say (ask again)."""
        until = self._clock() + VERDICT_TTL
        try:
            bundle = self._session.call(broker, lambda token: broker.bundle(token, username))
            return _Verdict(bundle.fingerprint(), until)
        except RemoteError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return _Verdict(None, until)
            log.warning("cannot check the key of %s: %s", username, exc)
        except SfsError as exc:
            log.warning("cannot check the key of %s: %s", username, exc)
        return None
