"""Seeded copies that are gone: `sfs-peer serve` stops announcing what it no longer has.

A seeded copy is a downloaded file this peer serves too (a share whose `owner` is
someone else). If it was deleted, moved or changed since, requesters would still be sent
here by the broker and be told "the holder cannot read it any more". `SeedKeeper` checks
every seeded copy when serving starts, and again each one whose read fails; a copy that is
gone is released at the broker (`release`) and removed from the share registry.

It is a thread of its own, with its own registry connection and broker client: the
serving loop only queues a check (`check`), and never waits for the broker.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import stat
import threading
from collections.abc import Callable

from sfs.common.errors import RemoteError, SfsError
from sfs.common.protocol import ErrorCode
from sfs.peer.client import BrokerClient
from sfs.peer.registry import Share, ShareRegistry
from sfs.peer.session import DeviceSession

log = logging.getLogger("sfs.peer")

MAX_QUEUED_CHECKS = 256  # more are dropped: the next failed read asks again


def why_gone(share: Share) -> str | None:
    """Why the copy at the share's path can no longer be served, or None if it looks
    in place (a regular file of the right size; chunks are still checked as they are
    read). Errors that may pass (a full table of open files, say) are not reasons."""
    try:
        info = share.path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return "is gone"
    except OSError as exc:
        log.info("cannot check %s now: %s", share.path, exc.strerror or exc)
        return None
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file any more"
    if info.st_size != share.size:
        return "has another size than the file it is a copy of"
    return None


class SeedKeeper(threading.Thread):
    """Releases the seeded copies this peer no longer has. `check` may be called from
    any thread; everything else happens in this one."""

    def __init__(
        self,
        open_registry: Callable[[], ShareRegistry],
        connect: Callable[[], BrokerClient],
        session: DeviceSession,
        retry_interval: float,
    ) -> None:
        super().__init__(name="seed-keeper", daemon=True)
        self._open_registry, self._connect, self._session = open_registry, connect, session
        self._retry_interval = retry_interval
        self._checks: queue.Queue[tuple[Share, bool] | None] = queue.Queue()
        self._retry: dict[str, tuple[Share, str]] = {}  # file id -> copy, why it is gone
        self._halt = threading.Event()

    def check(self, share: Share, changed: bool) -> None:
        """A read of `share` failed (`changed`: its bytes are not the ones shared): check
        whether the copy is gone. Never blocks; the peer's own files are left alone."""
        if share.owner is None or self._checks.qsize() >= MAX_QUEUED_CHECKS:
            return
        self._checks.put_nowait((share, changed))

    def stop(self) -> None:
        """End soon: at most one broker call (bounded by its timeout) is under way."""
        self._halt.set()
        self._checks.put_nowait(None)

    def run(self) -> None:
        try:
            with contextlib.closing(self._open_registry()) as registry, self._connect() as broker:
                self._check_all(registry, broker)
                self._follow_failures(registry, broker)
        except SfsError as exc:  # the registry cannot be opened: serving reports that too
            log.error("cannot check the seeded copies: %s", exc)
        except Exception:
            log.exception("bug while checking the seeded copies")

    def _check_all(self, registry: ShareRegistry, broker: BrokerClient) -> None:
        kept = gone = 0
        for share in registry.all():
            if self._halt.is_set():
                return
            if share.owner is None:
                continue
            reason = why_gone(share)
            if reason is None:
                kept += 1
            else:
                gone += 1
                self._release(registry, broker, share, reason)
        log.info("seeded copies checked: %d in place, %d gone", kept, gone)

    def _follow_failures(self, registry: ShareRegistry, broker: BrokerClient) -> None:
        while not self._halt.is_set():
            try:
                item = self._checks.get(timeout=self._retry_interval if self._retry else None)
            except queue.Empty:
                for again, why in list(self._retry.values()):
                    self._release(registry, broker, again, why)
                continue
            if item is None:
                return
            share, changed = item
            reason = "changed since it was downloaded" if changed else why_gone(share)
            if reason is not None:
                self._release(registry, broker, share, reason)

    def _release(
        self, registry: ShareRegistry, broker: BrokerClient, share: Share, reason: str
    ) -> None:
        """Release `share` at the broker, then forget it here. On a network failure,
        keep it for the next retry (the broker keeps listing it until then)."""
        self._retry.pop(share.file_id, None)
        current = registry.get(share.file_id)
        if self._halt.is_set() or current is None or current.path != share.path:
            return  # unshared, or downloaded again elsewhere, meanwhile
        try:
            self._session.call(broker, lambda token: broker.release(token, share.file_id))
        except RemoteError as exc:
            if exc.code != ErrorCode.NOT_FOUND:  # not found: the broker forgot it already
                log.warning("could not release %s at the broker: %s", share.file_id, exc)
                return
        except SfsError as exc:
            log.warning("could not release %s at the broker: %s (retrying)", share.file_id, exc)
            self._retry[share.file_id] = (share, reason)
            return
        registry.remove(share.file_id)
        log.warning(
            "no longer seeding %s (%s): %s %s; released it at the broker",
            share.name,
            share.file_id,
            share.path,
            reason,
        )
