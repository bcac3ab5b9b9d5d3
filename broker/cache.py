"""What a broker keeps in memory so that most requests need no SQL: sessions, who may see
which file, and each file's lookup answer, packed.

Correct across brokers: every entry is tagged with the store's generation
(`Store.generation`), read *before* the data it was filled from, and is used only by a
request whose own generation, read *after* it arrived, is the same. Any change that an
entry depends on, committed by any broker or by `sfs-broker user ...`, adds one to the
generation in the writer's transaction (database triggers), so the next request
anywhere misses and reads the database again. One generation read serves a whole batch
of requests that had all arrived before it (`BrokerServer`).

On PostgreSQL a read is a round trip, so a broker there also uses a read that started at
most `LEASE` seconds before a request arrived, and pays for it on the writing side: a
broker holds the reply to a request that moved the generation for `LEASE` seconds after
its commit, and `sfs-broker user disable|delete` waits as long before it returns. A
request sent after such a reply (or command) reaches any broker more than `LEASE` after
the commit, so a read that started less than `LEASE` before it arrived started after the
commit, and saw it. Only durations on one machine are compared: brokers on several
machines need no common clock.

Two things are not in the generation, and have their own bound:
- a session's sliding expiry: an entry is trusted for at most `session_step` seconds,
  then the store is asked again (and slides the expiry, as without a cache);
- presence renewals: a heartbeat that only renews does not count. A file's answer is
  dropped when the first holder it lists lapses (unless renewed meanwhile: then it is
  rebuilt for nothing), and at least every `PRESENCE_REFRESH` seconds, to pick up a holder
  that came back at the same endpoint after its presence lapsed (presence is soft state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from sfs.broker.store_contract import User

# Seconds a file's packed lookup answer is kept at most. Refilling one costs a few queries,
# and on a busy broker every request for that file meanwhile misses too: not too often.
PRESENCE_REFRESH = 5.0
LEASE = 0.05  # seconds; PostgreSQL only (see above)
MAX_BODY = 1024 * 1024  # larger answers (huge manifests) are not kept
MAX_BODY_BYTES = 128 * 1024 * 1024  # all kept answers together
MAX_ENTRIES = 200_000  # per table; a full table starts again empty

Key = TypeVar("Key")
Value = TypeVar("Value")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[Value]):
    generation: int
    value: Value
    until: float  # the clock time after which it is not used


class _Table(Generic[Key, Value]):
    """A dict of tagged entries. Reads and writes are single dict operations, safe from
    the socket thread and the workers at once; clearing swaps in a new dict."""

    def __init__(self) -> None:
        self._entries: dict[Key, _Entry[Value]] = {}

    def get(self, key: Key, generation: int, now: float) -> _Entry[Value] | None:
        entry = self._entries.get(key)
        if entry is None or entry.generation != generation or now >= entry.until:
            return None
        return entry

    def put(self, key: Key, value: Value, generation: int, until: float) -> None:
        if len(self._entries) >= MAX_ENTRIES:
            self._entries = {}
        self._entries[key] = _Entry(generation, value, until)

    def clear(self) -> None:
        self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)


class BrokerCache:
    def __init__(self, session_step: float) -> None:
        self.session_step = session_step
        self.sessions: _Table[bytes, User] = _Table()  # token digest -> its user
        self.visible: _Table[tuple[int, str], bool] = _Table()  # (user id, file id)
        self.answers: _Table[str, bytes] = _Table()  # file id -> packed LookupResult
        self._answer_bytes = 0
        self._newest = -1

    def saw(self, generation: int) -> None:
        """Drop what an older generation filled, to free its memory (entries are checked
        against each request's own generation regardless)."""
        if generation > self._newest:
            if self._newest >= 0:
                for table in (self.sessions, self.visible, self.answers):
                    table.clear()
                self._answer_bytes = 0
            self._newest = generation

    def session(self, digest: bytes, generation: int, now: float) -> User | None:
        entry = self.sessions.get(digest, generation, now)
        return None if entry is None else entry.value

    def keep_session(self, digest: bytes, user: User, generation: int, now: float) -> None:
        self.sessions.put(digest, user, generation, now + self.session_step)

    def visibility(self, user_id: int, file_id: str, generation: int, now: float) -> bool | None:
        entry = self.visible.get((user_id, file_id), generation, now)
        return None if entry is None else entry.value

    def keep_visibility(
        self, user_id: int, file_id: str, visible: bool, generation: int, now: float
    ) -> None:
        self.visible.put((user_id, file_id), visible, generation, float("inf"))

    def answer(self, file_id: str, generation: int, now: float) -> bytes | None:
        entry = self.answers.get(file_id, generation, now)
        return None if entry is None else entry.value

    def keep_answer(
        self, file_id: str, body: bytes, generation: int, now: float, lapses: float | None = None
    ) -> None:
        """`lapses`: when the first holder it lists goes offline unless renewed."""
        if len(body) > MAX_BODY:
            return
        self._answer_bytes += len(body)
        if self._answer_bytes > MAX_BODY_BYTES:
            self.answers.clear()
            self._answer_bytes = len(body)
        until = now + PRESENCE_REFRESH
        self.answers.put(file_id, body, generation, until if lapses is None else min(until, lapses))
