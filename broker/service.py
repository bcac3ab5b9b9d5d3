"""The broker's request handlers, free of sockets: one frame in, one reply frame out.

`BrokerService.handle` never raises: a frame that cannot be decoded, a request that is
refused and a bug all become error replies, so one bad client cannot stop the broker.
It is called from worker threads; the store and the challenge table are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sfs.broker.store import FileEntry, Store, User, UsernameTaken
from sfs.broker.throttle import BcryptSlots, LoginThrottle
from sfs.common import crypto, protocol
from sfs.common.codec import Record
from sfs.common.errors import IntegrityError, ProtocolError, SfsError, UsageError
from sfs.common.manifest import file_id_of, verify_manifest
from sfs.common.protocol import ErrorCode, Refused

log = logging.getLogger("sfs.broker")

LOGIN_REFUSED = "wrong username or password (or this device's keys are not the registered ones)"
CHALLENGE_TTL = 60
MAX_PENDING_CHALLENGES = 10_000


@dataclass(frozen=True)
class BrokerSettings:
    bcrypt_rounds: int = 12
    session_ttl: int = 24 * 3600
    presence_ttl: int = 30
    login_attempts: int = 5  # failed logins per username or client key before a lockout
    login_lockout: int = 30  # seconds, doubling with each further failure
    bcrypt_slots: int = 3  # workers that may run bcrypt at once; keep one for the rest


class Challenges:
    """Single-use registration challenges, each bound to the client key it was issued to."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._pending: dict[bytes, tuple[float, bytes | None]] = {}
        self._lock = threading.Lock()

    def issue(self, client_key: bytes | None) -> bytes:
        now = self._clock()
        with self._lock:
            if len(self._pending) >= MAX_PENDING_CHALLENGES:
                self._pending = {c: v for c, v in self._pending.items() if v[0] > now}
                if len(self._pending) >= MAX_PENDING_CHALLENGES:
                    raise Refused(ErrorCode.BUSY, "too many registrations in progress; retry")
            challenge = crypto.random_bytes(32)
            self._pending[challenge] = (now + CHALLENGE_TTL, client_key)
            return challenge

    def redeem(self, challenge: bytes, client_key: bytes | None) -> None:
        with self._lock:
            entry = self._pending.pop(challenge, None)
        if entry is None or entry[0] <= self._clock() or entry[1] != client_key:
            raise Refused(ErrorCode.UNAUTHORIZED, "unknown or expired registration challenge")


class BrokerService:
    def __init__(
        self,
        store: Store,
        settings: BrokerSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self._challenges = Challenges(clock)
        self._throttle = LoginThrottle(clock, settings.login_attempts, settings.login_lockout)
        self._bcrypt = BcryptSlots(settings.bcrypt_slots)
        # Unknown users are checked against this hash so they cost as much as known ones.
        self._dummy_hash = crypto.hash_password("not a real password", settings.bcrypt_rounds)
        # Each handler takes the request record its key names.
        self._handlers: dict[type[Record], Callable[[Any, bytes | None], Record]] = {
            protocol.Ping: self._ping,
            protocol.GetChallenge: self._challenge,
            protocol.Register: self._register,
            protocol.Login: self._login,
            protocol.Logout: self._logout,
            protocol.Heartbeat: self._heartbeat,
            protocol.GoOffline: self._offline,
            protocol.Publish: self._publish,
            protocol.Unpublish: self._unpublish,
            protocol.Search: self._search,
            protocol.Lookup: self._lookup,
            protocol.Hold: self._hold,
            protocol.Release: self._release,
            protocol.GetBundle: self._bundle,
        }

    def _now(self) -> int:
        return int(self._clock())

    # --- dispatch ------------------------------------------------------------------------

    def handle(self, frame: bytes, client_key: bytes | None) -> bytes:
        """Answer one request frame. `client_key`: the CurveZMQ key of the sender."""
        rid = 0
        try:
            envelope = protocol.decode_envelope(frame)
            rid = envelope.rid
            request = protocol.decode_body(envelope, protocol.BROKER_REQUESTS)
            result = self._handlers[type(request)](request, client_key)
            return protocol.encode("result", result, rid)
        except ProtocolError as exc:
            return protocol.encode_error(ErrorCode.BAD_REQUEST, str(exc), rid)
        except Refused as exc:
            return protocol.encode_error(exc.code, str(exc), rid)
        except SfsError as exc:
            log.error("request failed: %s", exc)
            return protocol.encode_error(ErrorCode.INTERNAL, "the broker could not do that", rid)
        except Exception:
            log.exception("bug while handling a request")
            return protocol.encode_error(
                ErrorCode.INTERNAL, "the broker hit an internal error", rid
            )

    def _session(self, token: str, client_key: bytes | None) -> User:
        now = self._now()
        user = self.store.session_user(
            crypto.token_digest(token), now, now + self.settings.session_ttl
        )
        # A session is only valid from the device whose transport key it was made on.
        if user is None or client_key is None or client_key != user.bundle.curve_public:
            raise Refused(ErrorCode.UNAUTHORIZED, "not logged in (or the session expired)")
        return user

    # --- accounts ------------------------------------------------------------------------

    def _ping(self, request: protocol.Ping, client_key: bytes | None) -> Record:
        return protocol.PingResult(protocol.VERSION, self._now())

    def _challenge(self, request: protocol.GetChallenge, client_key: bytes | None) -> Record:
        return protocol.ChallengeResult(self._challenges.issue(client_key))

    def _register(self, request: protocol.Register, client_key: bytes | None) -> Record:
        with self._bcrypt:  # taken first: a busy broker leaves the challenge usable
            return self._register_with_slot(request, client_key)

    def _register_with_slot(self, request: protocol.Register, client_key: bytes | None) -> Record:
        self._challenges.redeem(request.challenge, client_key)
        bundle = request.bundle
        try:
            crypto.verify(
                bundle.rsa_key(),
                request.signature,
                protocol.register_payload(request.username, request.challenge, bundle),
                "registration",
            )
        except IntegrityError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, f"registration refused: {exc}") from exc
        if client_key != bundle.curve_public:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                "registration refused: the connection's transport key is not the bundle's",
            )
        if self.store.get_user(request.username) is not None:  # before paying for bcrypt
            raise Refused(ErrorCode.CONFLICT, f"the username {request.username!r} is taken")
        try:
            password_hash = crypto.hash_password(request.password, self.settings.bcrypt_rounds)
        except UsageError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from exc
        try:
            user = self.store.add_user(request.username, password_hash, bundle, self._now())
        except UsernameTaken as exc:
            raise Refused(
                ErrorCode.CONFLICT,
                f"the username {request.username!r} is taken (or this key is registered already)",
            ) from exc
        log.info("registered %s", user.username)
        return self._new_session(user)

    def _new_session(self, user: User) -> protocol.SessionResult:
        token = crypto.new_token()
        now = self._now()
        expires_at = now + self.settings.session_ttl
        self.store.add_session(crypto.token_digest(token), user.id, expires_at, now)
        return protocol.SessionResult(user.username, token, expires_at)

    def _login(self, request: protocol.Login, client_key: bytes | None) -> Record:
        keys = (b"user:" + request.username.encode(), b"key:" + (client_key or b""))
        self._throttle.check(*keys)
        with self._bcrypt:
            user = self.store.get_user(request.username)
            # Unknown users cost a bcrypt too, and every failure reads the same, so
            # neither the time nor the answer tells which usernames exist. A right
            # password from another device's key is a failure too: confirming the
            # password to whoever holds some other key would help a guesser.
            hashed = user.password_hash if user else self._dummy_hash
            matches = crypto.password_matches(request.password, hashed)
        if user is None or not matches or client_key != user.bundle.curve_public:
            self._throttle.failed(*keys)
            log.info("failed login for %s", request.username)
            raise Refused(ErrorCode.UNAUTHORIZED, LOGIN_REFUSED)
        self._throttle.succeeded(*keys)
        log.info("login %s", user.username)
        return self._new_session(user)

    def _logout(self, request: protocol.Logout, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        self.store.delete_session(crypto.token_digest(request.token))
        self.store.set_offline(user.id)
        return protocol.Empty()

    # --- presence ------------------------------------------------------------------------

    def _heartbeat(self, request: protocol.Heartbeat, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        ttl = self.settings.presence_ttl
        self.store.set_online(user.id, request.endpoint, self._now() + ttl)
        return protocol.HeartbeatResult(ttl)

    def _offline(self, request: protocol.GoOffline, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        self.store.set_offline(user.id)
        return protocol.Empty()

    # --- files ---------------------------------------------------------------------------

    def _publish(self, request: protocol.Publish, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        try:
            manifest = verify_manifest(request.manifest, request.signature, user.bundle)
        except IntegrityError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, f"manifest refused: {exc}") from exc
        if manifest.owner != user.username:
            raise Refused(ErrorCode.BAD_REQUEST, "manifest refused: it names another owner")
        access = protocol.normalise_access(request.access, user.username)
        if access is not None:
            unknown = self.store.unknown_users(access)
            if unknown:
                raise Refused(ErrorCode.NOT_FOUND, f"no such user: {', '.join(unknown)}")
        file_id = file_id_of(request.manifest)
        try:  # seeders enforce this list: it must be the owner's, exactly as stored
            crypto.verify(
                user.bundle.rsa_key(),
                request.grant,
                protocol.grant_payload(file_id, access),
                "access grant",
            )
        except IntegrityError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, f"share refused: {exc}") from exc
        entry = FileEntry(
            file_id,
            user.username,
            manifest.name,
            manifest.size,
            manifest.keywords,
            request.manifest,
            request.signature,
            self._now(),
            request.grant,
        )
        self.store.add_file(user.id, entry, access)
        log.info("%s shared a file (%d bytes)", user.username, manifest.size)
        return protocol.PublishResult(file_id)

    def _unpublish(self, request: protocol.Unpublish, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        if not self.store.remove_file(request.file_id, user.id):
            raise Refused(ErrorCode.NOT_FOUND, f"you share no file {request.file_id}")
        return protocol.Empty()

    def _search(self, request: protocol.Search, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        terms = request.query.split()[:8]
        hits = self.store.search(user.id, terms, request.owner, request.limit, self._now())
        return protocol.SearchResult(
            [
                protocol.SearchHit(
                    hit.file.file_id,
                    hit.file.name,
                    hit.file.size,
                    hit.file.owner,
                    hit.file.keywords,
                    hit.file.shared_at,
                    hit.online,
                )
                for hit in hits
            ]
        )

    def _lookup(self, request: protocol.Lookup, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        entry = self.store.visible_file(request.file_id, user.id)
        if entry is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no file {request.file_id} is shared with you")
        owner = self.store.get_user(entry.owner)
        if owner is None:  # the owner was removed between the two reads
            raise Refused(ErrorCode.NOT_FOUND, f"no file {request.file_id} is shared with you")
        holders = [
            protocol.Holder(p.username, p.endpoint, p.bundle)
            for p in self.store.online_holders(entry.file_id, self._now())
        ]
        return protocol.LookupResult(
            entry.file_id,
            entry.owner,
            owner.bundle,
            entry.manifest,
            entry.signature,
            holders,
            self.store.signed_access(entry.file_id),
            entry.grant,
        )

    def _hold(self, request: protocol.Hold, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        entry = self.store.visible_file(request.file_id, user.id)
        if entry is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no file {request.file_id} is shared with you")
        if entry.owner != user.username:  # the owner holds its files anyway
            self.store.add_holder(entry.file_id, user.id)
        return protocol.Empty()

    def _release(self, request: protocol.Release, client_key: bytes | None) -> Record:
        user = self._session(request.token, client_key)
        if not self.store.remove_holder(request.file_id, user.id):
            raise Refused(ErrorCode.NOT_FOUND, f"you hold no copy of file {request.file_id}")
        return protocol.Empty()

    def _bundle(self, request: protocol.GetBundle, client_key: bytes | None) -> Record:
        self._session(request.token, client_key)
        target = self.store.get_user(request.username)
        if target is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no such user: {request.username}")
        return protocol.BundleResult(target.username, target.bundle)
