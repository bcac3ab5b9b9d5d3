"""The broker's request handlers, free of sockets: one frame in, one reply frame out.

`BrokerService.handle` never raises: a frame that cannot be decoded, a request that is
refused and a bug all become error replies, so one bad client cannot stop the broker.
It is called from worker threads; the store and the limits' state are thread-safe.
The limits (login throttle, registrations, challenges) are policies of
`sfs.broker.throttle`: the handlers only call them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sfs.broker.cache import LEASE, BrokerCache
from sfs.broker.generation_reads import GenerationReads
from sfs.broker.presence_hints import hints_text, parse_hints_text
from sfs.broker.store_contract import FileEntry, Quota, QuotaExceeded, Store, User, UsernameTaken
from sfs.broker.throttle import (
    BcryptSlots,
    Challenges,
    LimitState,
    LoginThrottle,
    RegistrationLimit,
)
from sfs.common import crypto, protocol, relay_protocol
from sfs.common.codec import Record, pack, to_wire
from sfs.common.errors import IntegrityError, ProtocolError, SfsError, UsageError
from sfs.common.manifest import file_id_of
from sfs.common.protocol import ErrorCode, Refused
from sfs.common.tree import verify_header

log = logging.getLogger("sfs.broker")

LOGIN_REFUSED = "wrong username or password (or this device's keys are not the registered ones)"
DEVICE_LOGIN_REFUSED = "this device's keys are not the ones registered for that username"
DISABLED = "the account {} is disabled at this broker; ask its operator"
MiB = 1024 * 1024


@dataclass(frozen=True)
class BrokerSettings:
    bcrypt_rounds: int = 12
    session_ttl: int = 24 * 3600
    presence_ttl: int = 30
    login_attempts: int = 5  # failed logins per username or client key before a lockout
    login_lockout: int = 30  # seconds, doubling with each further failure
    bcrypt_slots: int = 3  # workers that may run bcrypt at once; keep one for the rest
    # Registrations per hour; a source address may also hold that many challenges at once.
    registrations_per_key: int = 10
    registrations_per_address: int = 200
    quota_files: int = 100_000  # files shared per user
    quota_manifest_mib: int = 1024  # bytes of their manifests per user, in MiB


@dataclass(frozen=True)
class RelayDirectory:
    """The relays this broker hands out (its own first), and the Ed25519 key it signs
    their tickets with."""

    relays: tuple[protocol.RelayInfo, ...]
    ticket_key: bytes  # Ed25519 private key, raw
    ticket_ttl: int = 120  # seconds a circuit ticket is good for
    attach_ttl: int = 600  # seconds an attach ticket is good for (a holder renews it)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the transport saw it."""

    key: bytes | None  # the CurveZMQ public key
    address: str | None = None  # the source IP address (ZeroMQ's Peer-Address)
    generation: int = -1  # the store's generation, read after the request arrived


@dataclass(frozen=True)
class Packed:
    """A result already packed (`pack(to_wire(record))`), as the cache keeps it."""

    body: bytes


class BrokerService:
    def __init__(
        self,
        store: Store,
        settings: BrokerSettings,
        clock: Callable[[], float] = time.time,
        limits: LimitState | None = None,
        relays: RelayDirectory | None = None,
    ) -> None:
        """`limits`: where throttle counts and pending challenges live (None: where the
        store keeps them). `relays`: None when this broker hands out no relay."""
        self.store = store
        self._relays = relays
        self.settings = settings
        self._clock = clock
        state = limits or store.limit_state()
        self._challenges = Challenges(state, clock, settings.registrations_per_address)
        self._registrations = RegistrationLimit(
            state, clock, settings.registrations_per_key, settings.registrations_per_address
        )
        self._throttle = LoginThrottle(
            state, clock, settings.login_attempts, settings.login_lockout
        )
        # Trusted for a tenth of the session's lifetime at most (the store's slide step).
        self.cache = BrokerCache(session_step=min(300, max(1, settings.session_ttl // 10)))
        # Where a generation read is a round trip (PostgreSQL), one that started up to this
        # long before a request may answer it (`sfs.broker.cache`).
        self.lease = LEASE if hasattr(store, "generation_reads") else 0.0
        self._quota = Quota(settings.quota_files, settings.quota_manifest_mib * MiB)
        self._bcrypt = BcryptSlots(settings.bcrypt_slots)
        # Unknown users are checked against this hash so they cost as much as known ones.
        self._dummy_hash = crypto.hash_password("not a real password", settings.bcrypt_rounds)
        # Each handler takes the request record its key names.
        self._handlers: dict[type[Record], Callable[[Any, Caller], Record | Packed]] = {
            protocol.Ping: self._ping,
            protocol.GetChallenge: self._challenge,
            protocol.Register: self._register,
            protocol.Login: self._login,
            protocol.DeviceLogin: self._device_login,
            protocol.Logout: self._logout,
            protocol.Heartbeat: self._heartbeat,
            protocol.GoOffline: self._offline,
            protocol.Publish: self._publish,
            protocol.Unpublish: self._unpublish,
            protocol.Search: self._search,
            protocol.Lookup: self._lookup,
            protocol.Resolve: self._resolve,
            protocol.Hold: self._hold,
            protocol.Release: self._release,
            protocol.GetBundle: self._bundle,
            protocol.RelayGrant: self._relay_grant,
            protocol.GetTicket: self._ticket,
        }

    def _now(self) -> int:
        return int(self._clock())

    # --- dispatch ------------------------------------------------------------------------

    def generation(self) -> int:
        """The store's generation, read now: a request that arrived before this call may
        use the cache with it (`sfs.broker.cache`)."""
        generation = self.store.generation()
        self.cache.saw(generation)
        return generation

    def generation_reads(self) -> GenerationReads | None:
        """Reads of the generation that do not block the socket thread, if the store
        has them (PostgreSQL), on connections of their own."""
        opener = getattr(self.store, "generation_reads", None)
        return None if opener is None else cast(GenerationReads, opener())

    def handle(
        self,
        frame: bytes,
        client_key: bytes | None,
        address: str | None = None,
        generation: int | None = None,
    ) -> bytes:
        """Answer one request frame. `client_key`: the CurveZMQ key of the sender;
        `address`: its source IP address (None: unknown, counted as one address);
        `generation`: the store's, read after the frame arrived (None: read it here)."""
        rid = 0
        try:
            envelope = protocol.decode_envelope(frame)
            rid = envelope.rid
            request = protocol.decode_body(envelope, protocol.BROKER_REQUESTS)
            if generation is None:
                generation = self.generation()
            caller = Caller(client_key, address, generation)
            result = self._handlers[type(request)](request, caller)
            if isinstance(result, Packed):
                return protocol.encode_packed("result", result.body, rid)
            return protocol.encode("result", result, rid)
        except ProtocolError as exc:
            return protocol.encode_refusal(exc, rid)
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

    def answer_from_cache(
        self, frame: bytes, client_key: bytes | None, generation: int
    ) -> bytes | None:
        """The answer to a lookup whose session, visibility and file are all cached for
        `generation` (read after the frame arrived), else None: then `handle` it. The
        frame is only peeked at: what the full checks would refuse was never cached."""
        peeked = protocol.peek_lookup(frame)
        if peeked is None or client_key is None:
            return None
        rid, token, file_id = peeked
        now = self._now()
        user = self.cache.session(crypto.token_digest(token), generation, now)
        if user is None or client_key != user.bundle.curve_public:
            return None
        if self.cache.visibility(user.id, file_id, generation, now) is not True:
            return None
        body = self.cache.answer(file_id, generation, now)
        if body is None:
            return None
        return protocol.encode_packed("result", body, rid)

    def _session(self, token: str, caller: Caller) -> User:
        now = self._now()
        digest = crypto.token_digest(token)
        user = self.cache.session(digest, caller.generation, now)
        if user is None:
            user = self.store.session_user(digest, now, now + self.settings.session_ttl)
            if user is not None:
                self.cache.keep_session(digest, user, caller.generation, now)
        # A session is only valid from the device whose transport key it was made on.
        if user is None or caller.key is None or caller.key != user.bundle.curve_public:
            raise Refused(ErrorCode.UNAUTHORIZED, "not logged in (or the session expired)")
        return user

    # --- accounts ------------------------------------------------------------------------

    def _ping(self, request: protocol.Ping, caller: Caller) -> Record:
        return protocol.PingResult(protocol.VERSION, self._now())

    def _challenge(self, request: protocol.GetChallenge, caller: Caller) -> Record:
        return protocol.ChallengeResult(self._challenges.issue(caller.key, caller.address))

    def _register(self, request: protocol.Register, caller: Caller) -> Record:
        with self._bcrypt:  # taken first: a busy broker leaves the challenge usable
            return self._register_with_slot(request, caller)

    def _register_with_slot(self, request: protocol.Register, caller: Caller) -> Record:
        self._challenges.redeem(request.challenge, caller.key)
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
        if caller.key != bundle.curve_public:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                "registration refused: the connection's transport key is not the bundle's",
            )
        try:  # every check before the name is looked up, whose answer tells it is taken
            crypto.check_password_length(request.password)
        except UsageError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from exc
        self._registrations.attempt(caller.key, caller.address)
        if self.store.get_user(request.username) is not None:  # before paying for bcrypt
            raise Refused(ErrorCode.CONFLICT, f"the username {request.username!r} is taken")
        password_hash = crypto.hash_password(request.password, self.settings.bcrypt_rounds)
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

    def _login(self, request: protocol.Login, caller: Caller) -> Record:
        keys = (f"login-user:{request.username}", f"login-key:{(caller.key or b'').hex()}")
        self._throttle.check(*keys)
        with self._bcrypt:
            user = self.store.get_user(request.username)
            # Unknown users cost a bcrypt too, and every failure reads the same, so
            # neither the time nor the answer tells which usernames exist. A right
            # password from another device's key is a failure too: confirming the
            # password to whoever holds some other key would help a guesser.
            hashed = user.password_hash if user else self._dummy_hash
            matches = crypto.password_matches(request.password, hashed)
        if user is None or not matches or caller.key != user.bundle.curve_public:
            self._throttle.failed(*keys)
            log.info("failed login for %s", request.username)
            raise Refused(ErrorCode.UNAUTHORIZED, LOGIN_REFUSED)
        self._throttle.succeeded(*keys)
        # Said only to whoever proved the password and the key: it tells nobody else
        # that the account exists.
        if user.disabled:
            raise Refused(ErrorCode.FORBIDDEN, DISABLED.format(user.username))
        log.info("login %s", user.username)
        return self._new_session(user)

    def _device_login(self, request: protocol.DeviceLogin, caller: Caller) -> Record:
        """A session for an unattended server (`serve`), proven by the device's registered
        keys: the CurveZMQ key of the connection, and the RSA key's signature over a
        challenge issued to that connection. No password is involved, so nothing here can
        be guessed: failures are counted per client key only, to bound the work, and
        never lock the username (an attacker could otherwise keep its owner's server
        from logging in)."""
        key = f"device-key:{(caller.key or b'').hex()}"
        self._throttle.check(key)
        self._challenges.redeem(request.challenge, caller.key)
        user = self.store.get_user(request.username)
        # The cheap check first: a connection made with any other transport key is
        # refused before any RSA work.
        if (
            user is None
            or caller.key is None
            or not crypto.same_bytes(caller.key, user.bundle.curve_public)
            or not self._signed_by(user, request)
        ):
            self._throttle.failed(key)
            log.info("failed device login for %s", request.username)
            raise Refused(ErrorCode.UNAUTHORIZED, DEVICE_LOGIN_REFUSED)
        if user.disabled:  # the keys are proven: this tells their owner only
            raise Refused(ErrorCode.FORBIDDEN, DISABLED.format(user.username))
        log.info("device login %s", user.username)
        return self._new_session(user)

    @staticmethod
    def _signed_by(user: User, request: protocol.DeviceLogin) -> bool:
        payload = protocol.device_login_payload(user.username, request.challenge, user.bundle)
        try:
            crypto.verify(user.bundle.rsa_key(), request.signature, payload, "device login")
        except IntegrityError:
            return False
        return True

    def _logout(self, request: protocol.Logout, caller: Caller) -> Record:
        """End this session only. Presence is the server's (`serve` has a session of its
        own, from `device_login`): it goes with `offline`, or lapses after its ttl."""
        self._session(request.token, caller)
        self.store.delete_session(crypto.token_digest(request.token))
        return protocol.Empty()

    # --- presence ------------------------------------------------------------------------

    def _heartbeat(self, request: protocol.Heartbeat, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        ttl = self.settings.presence_ttl
        for hint in request.hints:
            if hint.kind == "relay" and not self._known_relay(hint):
                raise Refused(
                    ErrorCode.BAD_REQUEST, f"{hint.endpoint} is not a relay of this broker"
                )
        text = hints_text(request.endpoint, request.hints)
        self.store.set_online(user.id, text, self._now() + ttl)
        return protocol.HeartbeatResult(ttl)

    def _offline(self, request: protocol.GoOffline, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        self.store.set_offline(user.id)
        return protocol.Empty()

    # --- files ---------------------------------------------------------------------------

    def _publish(self, request: protocol.Publish, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        try:
            manifest = verify_header(request.manifest, request.signature, user.bundle)
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
            manifest.kind,
            manifest.files,
        )
        try:
            self.store.add_file(user.id, entry, access, self._quota)
        except QuotaExceeded as exc:
            raise Refused(ErrorCode.FORBIDDEN, f"share refused: {self._over_quota(exc)}") from exc
        log.info("%s shared a file (%d bytes)", user.username, manifest.size)
        return protocol.PublishResult(file_id)

    def _over_quota(self, exc: QuotaExceeded) -> str:
        if exc.files >= self._quota.files:
            return (
                f"you share {exc.files:,} files, and the broker allows {self._quota.files:,}"
                " per user (quota_files); unshare some first"
            )
        return (
            f"with this manifest ({exc.adding / MiB:,.1f} MiB), yours would take"
            f" {(exc.manifest_bytes + exc.adding) / MiB:,.1f} MiB at the broker, over its"
            f" {self.settings.quota_manifest_mib:,} MiB per user (quota_manifest_mib);"
            " unshare some first"
        )

    def _unpublish(self, request: protocol.Unpublish, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        if not self.store.remove_file(request.file_id, user.id):
            raise Refused(ErrorCode.NOT_FOUND, f"you share no file {request.file_id}")
        return protocol.Empty()

    def _search(self, request: protocol.Search, caller: Caller) -> Record:
        user = self._session(request.token, caller)
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
                    hit.file.kind,
                    hit.file.files,
                )
                for hit in hits
            ],
            hits.partial,
        )

    def _lookup(self, request: protocol.Lookup, caller: Caller) -> Record | Packed:
        user = self._session(request.token, caller)
        file_id, generation, now = request.file_id, caller.generation, self._now()
        refused = Refused(ErrorCode.NOT_FOUND, f"no file {file_id} is shared with you")
        entry = None
        visible = self.cache.visibility(user.id, file_id, generation, now)
        if visible is None:
            entry = self.store.visible_file(file_id, user.id)
            visible = entry is not None
            self.cache.keep_visibility(user.id, file_id, visible, generation, now)
        if not visible:
            raise refused
        body = self.cache.answer(file_id, generation, now)
        if body is None:
            entry = entry or self.store.visible_file(file_id, user.id)
            if entry is None:
                raise refused
            owner = self.store.get_user(entry.owner)
            if owner is None:  # the owner was removed between the two reads
                raise refused
            online = self.store.online_holders(entry.file_id, now)
            holders = []
            for p in online:
                endpoint, hints = parse_hints_text(p.endpoint)
                holders.append(protocol.Holder(p.username, endpoint, p.bundle, hints))
            result = protocol.LookupResult(
                entry.file_id,
                entry.owner,
                owner.bundle,
                entry.manifest,
                entry.signature,
                holders,
                self.store.signed_access(entry.file_id),
                entry.grant,
            )
            # The same for everyone who may see the file: kept once, packed.
            body = pack(to_wire(result))
            # Kept until the first listed holder's presence lapses, if that comes sooner.
            lapses = min((p.online_until for p in online if p.online_until), default=None)
            self.cache.keep_answer(file_id, body, generation, now, lapses)
        return Packed(body)

    def _resolve(self, request: protocol.Resolve, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        if len(request.prefix) < protocol.MIN_ID_PREFIX:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"file id prefix {request.prefix} is too short: ids are 32 hex characters;"
                f" give at least {protocol.MIN_ID_PREFIX} of them",
            )
        matches = self.store.files_by_prefix(user.id, request.prefix, protocol.MAX_ID_MATCHES)
        return protocol.ResolveResult(
            [protocol.IdMatch(m.file_id, m.name, m.owner) for m in matches]
        )

    def _hold(self, request: protocol.Hold, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        entry = self.store.visible_file(request.file_id, user.id)
        if entry is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no file {request.file_id} is shared with you")
        if entry.owner != user.username:  # the owner holds its files anyway
            self.store.add_holder(entry.file_id, user.id)
        return protocol.Empty()

    def _release(self, request: protocol.Release, caller: Caller) -> Record:
        user = self._session(request.token, caller)
        if not self.store.remove_holder(request.file_id, user.id):
            raise Refused(ErrorCode.NOT_FOUND, f"you hold no copy of file {request.file_id}")
        return protocol.Empty()

    # --- relays --------------------------------------------------------------------------

    def _known_relay(self, hint: protocol.ConnectionHint) -> bool:
        if self._relays is None:
            return False
        return any(
            r.endpoint == hint.endpoint and r.key == hint.relay_key for r in self._relays.relays
        )

    def _relay_grant(self, request: protocol.RelayGrant, caller: Caller) -> Record:
        """The relays, and a ticket that lets this peer attach to them as itself."""
        user = self._session(request.token, caller)
        if self._relays is None:
            return protocol.RelayGrantResult([], b"", bytes(64))
        ticket = relay_protocol.AttachTicket(
            relay_protocol.ATTACH_DOMAIN,
            user.username,
            user.bundle.curve_public,
            list(request.endpoints),
            self._now() + self._relays.attach_ttl,
            crypto.random_bytes(16),
        )
        data, signature = relay_protocol.sign_ticket(self._relays.ticket_key, ticket)
        return protocol.RelayGrantResult(list(self._relays.relays), data, signature)

    def _ticket(self, request: protocol.GetTicket, caller: Caller) -> Record:
        """A ticket for one circuit: this requester, to a holder online with the file."""
        user = self._session(request.token, caller)
        if self._relays is None:
            raise Refused(ErrorCode.NOT_FOUND, "this broker runs no relay")
        entry = self.store.visible_file(request.file_id, user.id)
        if entry is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no file {request.file_id} is shared with you")
        holder = next(
            (
                p
                for p in self.store.online_holders(entry.file_id, self._now())
                if p.username == request.holder
            ),
            None,
        )
        if holder is None:
            raise Refused(
                ErrorCode.NOT_FOUND, f"{request.holder} does not serve {request.file_id} now"
            )
        ticket = relay_protocol.CircuitTicket(
            relay_protocol.CIRCUIT_DOMAIN,
            user.username,
            user.bundle.curve_public,
            holder.username,
            holder.bundle.curve_public,
            entry.file_id,
            self._now() + self._relays.ticket_ttl,
            crypto.random_bytes(16),
        )
        data, signature = relay_protocol.sign_ticket(self._relays.ticket_key, ticket)
        return protocol.TicketResult(data, signature)

    def _bundle(self, request: protocol.GetBundle, caller: Caller) -> Record:
        self._session(request.token, caller)
        target = self.store.get_user(request.username)
        if target is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no such user: {request.username}")
        return protocol.BundleResult(target.username, target.bundle)
