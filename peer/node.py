"""One user's peer: every `sfs-peer` command as a method, used by the CLI and tests.

The CLI parses arguments and prints; everything else happens here. Each method opens
what it needs (keys, session, registry, broker connection) lazily and `close` releases
it all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from sfs.common import crypto, protocol
from sfs.common.config import PeerConfig
from sfs.common.errors import (
    Interrupted,
    RemoteError,
    SfsError,
    StorageError,
    TransportError,
    UsageError,
)
from sfs.common.identity import format_fingerprint, safety_code
from sfs.common.manifest import file_id_of
from sfs.common.protocol import ErrorCode
from sfs.common.tree import FILE, FOLDER, decode_header
from sfs.common.tree_index import TreeIndex, pack_pages, pages_of
from sfs.peer import file_ids, keys, leftovers, session
from sfs.peer.client import BrokerClient
from sfs.peer.partial import partial_path
from sfs.peer.pins import ConfirmReplace, Pin, PinConflict, PinStore, Trusted
from sfs.peer.preflight import already_downloaded, check_free_space
from sfs.peer.registry import Share, ShareRegistry
from sfs.peer.serve_lock import serve_lock
from sfs.peer.share import (
    Progress,
    check_usernames,
    normalise_keywords,
    shareable,
)
from sfs.peer.tree_write import staging_path, tree_on_disk

if TYPE_CHECKING:
    from sfs.peer.download import Downloader, DownloadProgress, DownloadResult

log = logging.getLogger("sfs.peer")

# A get whose relayed holders' path broke (a relay died) waits this long for one of them
# to be listed with a new path, then carries on from the chunks it kept: a holder
# notices a lost relay within 15 s, moves to the next one and heartbeats its new hint.
PATH_CHANGE_WAIT = 40.0
PATH_CHANGE_POLL = 1.0
PATH_CHANGES = 3  # at most, per get

_SESSION_GONE = "the broker no longer knows this session (expired?); run `sfs-peer login`"


@dataclass(frozen=True)
class Verification:
    """What `sfs-peer verify` shows: the pin (as it is now) and the code made from it."""

    pin: Pin
    code: str
    pinned_now: bool  # no pin before: the broker's key was pinned on first use


@dataclass(frozen=True)
class AlreadyDownloaded:
    """`get` found the file in the download folder already, with the signed content."""

    file_id: str
    path: Path
    size: int
    chunks: int  # each checked against its BLAKE3 hash in the owner-signed tree


@dataclass(frozen=True)
class WhoAmI:
    username: str
    fingerprint: str
    logged_in: bool  # a session is saved; the broker decides whether it is still valid


class Peer:
    def __init__(self, config: PeerConfig, passphrase: keys.PassphraseSource | None = None) -> None:
        """`passphrase`: asked for when the private keys turn out to be encrypted."""
        self.config = config
        self._passphrase = passphrase
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._identity: keys.Identity | None = None
        self._broker: BrokerClient | None = None
        self._registry: ShareRegistry | None = None
        self.pins = PinStore(config.data_dir / "pins.json")

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
        if self._registry is not None:
            self._registry.close()
        self._context.destroy(linger=0)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- lazily opened parts ---------------------------------------------------------

    @property
    def identity(self) -> keys.Identity:
        if self._identity is None:
            self._identity = keys.load_identity(
                self.config.data_dir, self.config.username, self._passphrase
            )
        return self._identity

    def _new_broker_client(self) -> BrokerClient:
        return BrokerClient(
            self.config.brokers,
            self.config.broker_public_key,
            self.identity.transport_key,
            timeout=self.config.timeout,
            context=self._context,
        )

    @property
    def broker(self) -> BrokerClient:
        if self._broker is None:
            self._broker = self._new_broker_client()
        return self._broker

    @property
    def registry(self) -> ShareRegistry:
        if self._registry is None:
            self._registry = self._open_registry()
        return self._registry

    def _open_registry(self) -> ShareRegistry:
        """A connection of its own (for a thread of its own, say)."""
        return ShareRegistry(self.config.data_dir / "shares.db")

    def _token(self) -> str:
        return session.load_session(self.config.data_dir, self.config.username).token

    @contextlib.contextmanager
    def _authenticated(self) -> Iterator[None]:
        """Turn the broker's "unauthorized" into the hint to log in again."""
        try:
            yield
        except RemoteError as exc:
            if exc.code == ErrorCode.UNAUTHORIZED:
                raise session.NotLoggedIn(_SESSION_GONE) from exc
            raise

    # --- identity and account --------------------------------------------------------

    def init(self, passphrase: bytes | None = None) -> keys.Identity:
        self._identity = keys.create_identity(
            self.config.data_dir, self.config.username, passphrase
        )
        return self._identity

    def check_broker(self) -> None:
        """Refuse a broker of another protocol version (the CLI asks before it prompts
        for a password; `register`, `login` and `serve` ask anyway)."""
        self.broker.check_version()

    def register(self, password: str) -> protocol.SessionResult:
        crypto.check_password_length(password)
        identity = self.identity
        self.check_broker()
        challenge = self.broker.challenge()
        payload = protocol.register_payload(identity.username, challenge, identity.bundle)
        try:
            result = self.broker.register(
                identity.username, password, identity.bundle, challenge, identity.sign(payload)
            )
        except RemoteError as exc:
            if exc.code == ErrorCode.CONFLICT and self._device_registered():
                raise UsageError(self._already_registered()) from exc
            raise
        self._save_session(result)
        return result

    def check_not_registered(self) -> None:
        """Refuse `register` (before it asks for a password) from a data folder that
        holds a session: it registered or logged in before."""
        try:
            session.load_session(self.config.data_dir, self.config.username)
        except (session.NotLoggedIn, StorageError):
            return
        raise UsageError(self._already_registered())

    def _already_registered(self) -> str:
        return (
            f"{self.config.username} is already registered from this data folder;"
            " use `sfs-peer login`"
        )

    def _device_registered(self) -> bool:
        """Whether the broker accepts this device's keys for this user."""
        device = session.DeviceSession(self.identity)
        try:
            device.call(self.broker, lambda token: token)
        except SfsError:
            return False
        with contextlib.suppress(SfsError):
            device.end(self.broker)
        return True

    def login(self, password: str) -> protocol.SessionResult:
        crypto.check_password_length(password)
        self.check_broker()
        result = self.broker.login(self.config.username, password)
        self._save_session(result)
        return result

    def _save_session(self, result: protocol.SessionResult) -> None:
        if result.username != self.config.username:
            raise SfsError("the broker answered for another user")
        session.save_session(
            self.config.data_dir, session.Session(result.username, result.token, result.expires_at)
        )

    def logout(self) -> None:
        try:
            with contextlib.suppress(session.NotLoggedIn), self._authenticated():
                self.broker.logout(self._token())
        finally:
            session.clear_session(self.config.data_dir)

    def whoami(self) -> WhoAmI:
        try:
            current = session.load_session(self.config.data_dir, self.config.username)
        except session.NotLoggedIn:
            current = None
        # The public keys only: showing them asks for no passphrase.
        bundle = keys.load_public_bundle(
            self.config.data_dir, self.config.username, self._passphrase
        )
        return WhoAmI(
            self.config.username, format_fingerprint(bundle.fingerprint()), current is not None
        )

    # --- sharing -----------------------------------------------------------------------

    def share(
        self,
        path: Path,
        keywords: list[str] | None = None,
        to: list[str] | None = None,
        progress: Progress | None = None,
        skip_unsafe: bool = False,
    ) -> Share:
        """Share a file, or a folder as one share (a tree of many entries)."""
        from sfs.peer.tree_scan import build_tree  # the scanner and hasher: `share` only

        source = shareable(path)
        words = normalise_keywords(keywords or [])
        access = check_usernames(to) if to else None
        token = self._token()
        built = build_tree(source, self.identity, words, skip_unsafe, progress)
        left_out = built.left_out
        if left_out:
            log.warning(
                "left out of %s (not files, folders or links inside it): %s",
                source,
                ", ".join(left_out[:20])
                + (f" and {len(left_out) - 20} more" if len(left_out) > 20 else ""),
            )
        manifest, manifest_bytes, signature = built.header, built.header_bytes, built.signature
        expected_id = file_id_of(manifest_bytes)
        access = protocol.normalise_access(access, self.config.username)
        grant = self.identity.sign(protocol.grant_payload(expected_id, access))
        with self._authenticated():
            file_id = self.broker.publish(token, manifest_bytes, signature, access, grant)
        if file_id != expected_id:
            raise SfsError("the broker assigned an unexpected file id")
        share = Share(
            file_id,
            source,
            manifest.name,
            manifest.size,
            manifest_bytes,
            signature,
            access,
            words,
            int(time.time()),
            stamp=built.stamps[0] if manifest.kind == FILE else None,
            pages=pack_pages(pages_of(built.entry_pages, built.hash_pages)),
        )
        self.registry.add(share)
        return share

    def unshare(self, file_id: str) -> str:
        """Stop serving at once (the holder is where access is enforced), then tell the
        broker to stop listing the file. Returns the whole id (`file_id` may be a
        prefix)."""
        file_id = self._file_id(file_id, local_first=True)
        share = self.registry.get(file_id)
        local = self.registry.remove(file_id)
        seeded = share is not None and share.owner is not None
        try:
            with self._authenticated():
                if seeded:
                    self.broker.release(self._token(), file_id)
                else:
                    self.broker.unpublish(self._token(), file_id)
        except SfsError as exc:
            if not local:
                raise
            if isinstance(exc, RemoteError) and exc.code == ErrorCode.NOT_FOUND:
                return file_id  # the broker had forgotten it already
            raise SfsError(
                f"stopped serving {file_id}, but the broker still lists it: {exc}"
            ) from exc
        return file_id

    def shares(self) -> list[Share]:
        return self.registry.all()

    def unfinished(self, folder: Path | None = None) -> list[leftovers.Leftover]:
        """The downloads stopped part way in `folder` (default: the download folder)."""
        return leftovers.unfinished(folder or self.config.download_dir)

    def clean(self, older_than_days: float, folder: Path | None = None) -> leftovers.Cleaned:
        """Remove the unfinished downloads not written for `older_than_days` days, except
        those a running `get` holds."""
        if not 0 <= older_than_days <= 100_000:
            raise UsageError("--older-than: a number of days from 0 to 100000")
        return leftovers.clean(
            folder or self.config.download_dir, older_than_days * 86_400, time.time()
        )

    def search(self, query: str = "", owner: str | None = None) -> list[protocol.SearchHit]:
        return self.find(query, owner).hits

    def find(self, query: str = "", owner: str | None = None) -> protocol.SearchResult:
        """The hits, and whether the search is partial (more may match: add a word)."""
        if owner is not None:
            check_usernames([owner])
        with self._authenticated():
            return self.broker.find(self._token(), query, owner)

    def get(
        self,
        file_id: str,
        out: Path | None = None,
        progress: DownloadProgress | None = None,
        *,
        force: bool = False,
        include: list[str] | None = None,
    ) -> DownloadResult | AlreadyDownloaded:
        """Download a file; not one's own, and (unless `force`: a second copy) not one
        already in the folder with the same content."""
        from sfs.peer.download import verify_lookup  # the download engine: `get` only

        file_id = self._file_id(file_id)
        folder = out or self.config.download_dir
        self._refuse_own(file_id, None)
        with self._authenticated():
            lookup = self.broker.lookup(self._token(), file_id)
        header = verify_lookup(file_id, lookup, self.pins)
        self._refuse_own(file_id, header.owner)  # signed: a broker cannot make it up
        downloader = self._downloader(file_id)
        tree = downloader.fetch_index(file_id, lookup)
        chosen = None
        if include:
            if tree.kind != FOLDER:
                raise UsageError("--include chooses paths in a folder share; this is a file")
            chosen = tree.matching(include)
            if not chosen:
                raise UsageError(f"nothing in {tree.name} matches {', '.join(include)}")
        if not force and chosen is None:
            present = (
                tree_on_disk(folder, tree, file_id)
                if tree.kind == FOLDER
                else already_downloaded(folder, file_id, tree)
            )
            if present is not None:
                return AlreadyDownloaded(file_id, present, tree.size, tree.chunk_count)
        check_free_space(folder, file_id, tree)
        try:
            return self._download(downloader, file_id, lookup, tree, folder, progress, chosen)
        except KeyboardInterrupt:
            part = (staging_path if tree.kind == FOLDER else partial_path)(folder, file_id)
            if not part.exists():
                raise Interrupted("interrupted; nothing was kept") from None
            raise Interrupted(
                f"interrupted; the verified chunks are kept in {part}:"
                f" run the same `sfs-peer get {file_id}` to resume"
            ) from None

    def _file_id(self, text: str, *, local_first: bool = False) -> str:
        """The file id a user typed, whole or a unique prefix: found among this peer's
        shares and seeded copies first if `local_first`, else (or if none matches)
        among the files the broker lets this user see."""
        typed = file_ids.parse(text)
        if typed.whole:
            return typed.text
        if local_first:
            local = [
                file_ids.Candidate(s.file_id, s.name, s.owner or self.config.username)
                for s in self.registry.all()
                if s.file_id.startswith(typed.text)
            ]
            if local:
                return file_ids.pick(typed.text, local)
        with self._authenticated():
            matches = self.broker.resolve(self._token(), typed.text)
        return file_ids.pick(
            typed.text,
            [file_ids.Candidate(m.file_id, m.name, m.owner) for m in matches],
            more=len(matches) >= protocol.MAX_ID_MATCHES,
        )

    def _refuse_own(self, file_id: str, owner: str | None) -> None:
        """`owner`: as the signed manifest says; None: ask the local share registry."""
        share = self.registry.get(file_id) if owner is None else None
        mine = owner == self.config.username or (share is not None and share.owner is None)
        if mine:
            where = f" (shared from {share.path})" if share is not None else ""
            raise UsageError(f"{file_id} is your own file{where}; there is nothing to download")

    def _downloader(self, file_id: str) -> Downloader:
        from sfs.peer.connect import zmq_connector
        from sfs.peer.download import Downloader

        lock = threading.Lock()  # holders' threads share this peer's broker client

        def tickets(holder: str) -> tuple[bytes, bytes]:
            """A relay ticket for `holder` and this file, from the broker."""
            with lock, self._authenticated():
                return self.broker.ticket(self._token(), file_id, holder)

        return Downloader(
            self.identity,
            self.pins,
            self._context,
            self.config.window,
            self.config.timeout,
            self.config.transport_encryption,
            self.config.hello_timeout,
            connector=zmq_connector(
                self._context,
                self.identity,
                self.config.transport_encryption,
                self.config.timeout,
                tickets,
            ),
        )

    def _download(
        self,
        downloader: Downloader,
        file_id: str,
        lookup: protocol.LookupResult,
        tree: TreeIndex,
        folder: Path,
        progress: DownloadProgress | None,
        chosen: set[int] | None = None,
    ) -> DownloadResult:
        from sfs.peer.download import DownloadInterrupted

        changes = 0
        while True:
            try:
                result = downloader.fetch(file_id, lookup, folder, progress, tree, chosen)
                break
            except DownloadInterrupted as exc:
                fresh = self._new_path(file_id, lookup) if changes < PATH_CHANGES else None
                if fresh is None:
                    raise
                changes += 1
                log.warning("%s; a holder has a new path: carrying on", exc.cause)
                lookup = fresh
        whole = chosen is None  # only a whole copy is seeded
        if whole and self.config.seed and lookup.owner != self.config.username:
            result = dataclasses.replace(result, seeding=self._seed(lookup, tree, result))
        return result

    def _new_path(
        self, file_id: str, lookup: protocol.LookupResult
    ) -> protocol.LookupResult | None:
        """After a download through a relay stopped: a lookup of the same manifest in
        which a holder has a hint it did not have (another relay, or direct), within
        `PATH_CHANGE_WAIT` seconds; None if none comes, or if no holder was relayed."""
        if not any(h.kind == "relay" for holder in lookup.holders for h in holder.hints):
            return None
        known = {
            (holder.username, hint.kind, hint.endpoint)
            for holder in lookup.holders
            for hint in holder.hints
        }
        deadline = time.monotonic() + PATH_CHANGE_WAIT
        while time.monotonic() < deadline:
            time.sleep(PATH_CHANGE_POLL)
            try:
                with self._authenticated():
                    fresh = self.broker.lookup(self._token(), file_id)
            except SfsError as exc:  # the broker is gone too: the interruption is the news
                log.debug("no new path: %s", exc)
                return None
            if fresh.manifest != lookup.manifest or fresh.signature != lookup.signature:
                return None  # the file changed: a new get will say so
            hints = {
                (holder.username, hint.kind, hint.endpoint)
                for holder in fresh.holders
                if holder.username != self.config.username
                for hint in holder.hints
            }
            if hints - known:
                return fresh
        return None

    def _seed(self, lookup: protocol.LookupResult, tree: TreeIndex, result: DownloadResult) -> bool:
        """Serve the downloaded copy too, to those the owner's signed grant allows.
        Best effort: the download itself is done whatever happens here."""
        try:
            crypto.verify(
                lookup.owner_bundle.rsa_key(),  # checked against its pin by the download
                lookup.grant,
                protocol.grant_payload(lookup.file_id, lookup.access),
                f"access grant of {lookup.owner}",
            )
            manifest = decode_header(lookup.manifest)
            if tree.pages is None:
                raise SfsError("the index pages were not kept")
            self.registry.add(
                Share(
                    lookup.file_id,
                    result.path,
                    manifest.name,
                    manifest.size,
                    lookup.manifest,
                    lookup.signature,
                    lookup.access,
                    manifest.keywords,
                    int(time.time()),
                    owner=lookup.owner,
                    grant=lookup.grant,
                    stamp=result.stamp,
                    pages=pack_pages(tree.pages),
                )
            )
            with self._authenticated():
                self.broker.hold(self._token(), lookup.file_id)
        except SfsError as exc:
            log.warning("not seeding %s: %s", lookup.file_id, exc)
            return False
        return True

    # --- trust -------------------------------------------------------------------------

    def peers(self) -> list[Pin]:
        return self.pins.all()

    def verify(self, username: str, *, confirm: bool = False) -> Verification:
        """The safety code of this user and `username`, from the pinned key; a user not
        pinned yet is pinned to the key the broker serves (on first use, as a download
        would). With `confirm` (the user compared the code), the pin is marked verified,
        only if it was there before: a code nobody has seen cannot have been compared."""
        check_usernames([username])
        if username == self.config.username:
            raise UsageError("that is you: verify the user you exchange files with")
        pin = self.pins.get(username)
        pinned_now = pin is None
        if pin is None:
            if confirm:
                raise UsageError(
                    f"{username} is not pinned yet: run `sfs-peer verify {username}` first,"
                    " and compare the code with them"
                )
            with self._authenticated():
                bundle = self.broker.bundle(self._token(), username)
            self.pins.check(username, bundle)
            pin = self.pins.get(username)
            if pin is None:
                raise SfsError(f"the pin of {username} could not be saved")
        # The public keys only: a code is shown, nothing signed, so no passphrase is asked.
        mine = keys.load_public_bundle(
            self.config.data_dir, self.config.username, self._passphrase
        ).fingerprint()
        code = safety_code((self.config.username, mine), (username, pin.fingerprint))
        if confirm:
            pin = self.pins.mark_verified(username, pin.fingerprint)
        return Verification(pin, code, pinned_now)

    def trust(
        self,
        username: str,
        fingerprint: bytes,
        *,
        replace: bool = False,
        allow_unknown: bool = False,
        confirm: ConfirmReplace | None = None,
    ) -> Trusted:
        """Pin `username` to `fingerprint`, once the broker says it knows the user (and
        which key it serves). A user the broker does not know, or a broker that cannot be
        asked, is refused unless `allow_unknown`. A pin to another key is replaced only
        with `replace`, or if `confirm` says yes; otherwise `PinConflict`, pin kept."""
        check_usernames([username])
        served: bytes | None = None
        broker, note = "not asked", None  # or why not
        try:
            with self._authenticated():
                served = self.broker.bundle(self._token(), username).fingerprint()
        except session.NotLoggedIn as exc:
            if not allow_unknown:
                raise session.NotLoggedIn(
                    f"cannot ask the broker whether it knows {username}: {exc}, or add"
                    f" --allow-unknown to pin {username} without asking"
                ) from exc
            note = str(exc)
        except TransportError as exc:
            if not allow_unknown:
                raise TransportError(
                    f"{exc}; add --allow-unknown to pin {username} without asking the broker"
                ) from exc
            note = str(exc)
        except RemoteError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            if not allow_unknown:
                raise UsageError(
                    f"the broker does not know the user {username}; check the name, or add"
                    " --allow-unknown to pin it anyway"
                ) from exc
            broker, note = "unknown user", f"it does not know {username}"
        try:
            previous = self.pins.trust(username, fingerprint, replace=replace)
        except PinConflict as conflict:
            if confirm is None or not confirm(conflict.pin, served):
                raise
            # Only the pin the user was shown: another `trust` may have changed it since.
            previous = self.pins.trust(username, fingerprint, replace=conflict.pin.fingerprint)
        if served is not None:
            broker = "same" if crypto.same_bytes(served, fingerprint) else "different"
        return Trusted(username, fingerprint, previous, broker, served, note)

    # --- serving -----------------------------------------------------------------------

    def serve(self, stop: threading.Event, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve shares and keep this peer online until `stop` is set (blocks).
        `on_ready(endpoint)` is called once the server listens. Seeded copies that are
        gone are released in the background (`SeedKeeper`).

        The server logs in with the device's own keys, not the password session of
        `login`: it keeps serving across that session's expiry and the user's `logout`.
        One server per data folder (`serve_lock`)."""
        with serve_lock(self.config.data_dir):
            self._serve(stop, on_ready)

    def _serve(self, stop: threading.Event, on_ready: Callable[[str], None] | None) -> None:
        # The holder side, imported here: the other commands start faster without it.
        from sfs.peer.reads import read_chunk
        from sfs.peer.relay_link import RelayState
        from sfs.peer.requesters import RequesterCheck
        from sfs.peer.seeds import SeedKeeper
        from sfs.peer.server import Heartbeat, PeerServer
        from sfs.peer.transfer import HolderService

        self.check_broker()
        device = session.DeviceSession(self.identity)
        relay = None
        if self.config.relay != "never":
            relay = RelayState(self.config.relay, self.config.advertise)
        # Fail early, and clearly, if the broker refuses this device.
        ttl = device.call(
            self.broker, lambda token: self.broker.heartbeat(token, self.config.advertise)
        )
        if relay is not None:
            try:
                grant = device.call(
                    self.broker,
                    lambda token: self.broker.relay_grant(token, [self.config.advertise]),
                )
                relay.set_grant(grant)
            except RemoteError as exc:  # an older broker: direct only
                log.info("no relay from the broker: %s", exc)
        checker = RequesterCheck(self.pins, self._new_broker_client, device)
        heartbeat = Heartbeat(
            self._new_broker_client,
            device,
            self.config.advertise,
            min(self.config.heartbeat_interval, max(1.0, ttl / 3)),
            on_session_lost=stop.set,
            relay=relay,
        )
        keeper = SeedKeeper(
            self._open_registry, self._new_broker_client, device, self.config.heartbeat_interval
        )

        def listening(endpoint: str) -> None:
            keeper.start()  # not before: a server that cannot listen has nothing to check
            if on_ready is not None:
                on_ready(endpoint)

        try:
            service = HolderService(
                self.identity, self.registry.get, checker, read_chunk, on_failed_read=keeper.check
            )
            server = PeerServer(
                service,
                self.identity,
                self.config.listen,
                self.config.transport_encryption,
                stop,
                listening,
                upload_rate=self.config.upload_rate,
                config=str(self.config.path),
                data_listen=self.config.data_listen,
                advertise=self.config.advertise,
                relay=relay,
            )
            heartbeat.start()  # its last act is to tell the broker this peer went offline
            server.serve(self._context)
        finally:
            for thread in (heartbeat, keeper):
                thread.stop()
                if thread.is_alive():
                    thread.join()
            checker.close()
        if heartbeat.session_lost is not None:
            raise heartbeat.session_lost
