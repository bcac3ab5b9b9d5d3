"""Reads of PostgreSQL's cache generation that never block the broker's socket thread.

The socket thread needs one read of the generation per batch of requests, made after the
batch arrived (`sfs.broker.cache`). On SQLite that is a few microseconds; on PostgreSQL it
is a round trip, and a socket thread that waited for each would serve one batch per round
trip. Here each read is sent on one of a few connections in non-blocking mode, whose
sockets the socket thread polls with its ZeroMQ sockets: several batches' reads are in
flight at once, and the loop goes on reading clients meanwhile.

A connection that fails is dropped (its batch is answered by the workers, which read the
generation themselves) and replaced from a background thread, so that a database that is
away never stalls the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import psycopg
from psycopg import pq

log = logging.getLogger("sfs.broker")

_QUERY = b"SELECT n FROM generation"
_RECONNECT_EVERY = 2.0  # seconds between attempts while connections are missing
READ_TIMEOUT = 5.0  # seconds: a read still unanswered is given up (its connection too)


class GenerationReads:
    def __init__(self, url: str, width: int = 4, connect_timeout: int = 10) -> None:
        self._url = url
        self._width = width
        self._connect_timeout = connect_timeout
        self._free: list[psycopg.Connection[tuple[object, ...]]] = []
        # By socket: the connection, the ticket, and when the read was sent (monotonic).
        self._busy: dict[int, tuple[psycopg.Connection[tuple[object, ...]], int, float]] = {}
        self._values: dict[int, int | None] = {}  # by socket: the read's value so far
        # From the connecting thread: a new connection, or None for a failed attempt.
        self._fresh: queue.SimpleQueue[psycopg.Connection[tuple[object, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._missing = 0  # connections neither open nor being opened
        self._reconnecting = threading.Event()
        self._last_attempt = 0.0
        self._closed = False
        self._connect(width)  # at start, in this thread: the broker waits for its database
        self._take_fresh()

    # --- what the socket thread calls ---------------------------------------------------

    def sockets(self) -> list[int]:
        """The sockets of the reads in flight: poll them for input."""
        return list(self._busy)

    def in_flight(self) -> int:
        return len(self._busy)

    def give_up_slow(self) -> None:
        """Drop the reads in flight for longer than READ_TIMEOUT (a database that stopped
        answering), with their connections; their batches wait for another read."""
        now = time.monotonic()
        for sock, (db, _, started) in list(self._busy.items()):
            if now - started > READ_TIMEOUT:
                del self._busy[sock]
                self._values.pop(sock, None)
                self._drop(db, TimeoutError(f"no answer in {READ_TIMEOUT:g} s"))

    def newest_start(self) -> float | None:
        """When the most recent read in flight was sent (None: none in flight)."""
        return max((started for _, _, started in self._busy.values()), default=None)

    def send(self, ticket: int) -> bool:
        """Start a read for `ticket`; False if no connection is free (try again later)."""
        self._take_fresh()
        while self._free:
            db = self._free.pop()
            pg = db.pgconn
            started = time.monotonic()  # before sending: the snapshot is taken after it
            try:
                pg.send_query(_QUERY)
                while pg.flush():  # a tiny query: the socket buffer takes it at once
                    pass
            except psycopg.Error as exc:
                self._drop(db, exc)
                continue
            self._busy[pg.socket] = (db, ticket, started)
            self._values[pg.socket] = None
            return True
        if self._missing:
            self._replace()
        return False

    def receive(self, sock: int) -> tuple[int, int | None, float] | None:
        """After `sock` polled readable: (ticket, generation, when it was sent) once its
        read is complete; generation None if the read failed."""
        db, ticket, started = self._busy[sock]
        pg = db.pgconn
        try:
            pg.consume_input()
            while not pg.is_busy():
                result = pg.get_result()
                if result is None:  # the query is complete
                    del self._busy[sock]
                    self._free.append(db)
                    return ticket, self._values.pop(sock), started
                if result.status == pq.ExecStatus.TUPLES_OK and result.ntuples == 1:
                    value = result.get_value(0, 0)
                    self._values[sock] = int(value) if value is not None else None
                else:
                    raise psycopg.OperationalError(result.get_error_message())
        except (psycopg.Error, ValueError) as exc:
            del self._busy[sock]
            self._values.pop(sock, None)
            self._drop(db, exc)
            return ticket, None, started
        return None

    def close(self) -> None:
        self._closed = True
        self._take_fresh()
        for db in [*self._free, *(db for db, _, _ in self._busy.values())]:
            db.close()
        self._free.clear()
        self._busy.clear()

    # --- connections -----------------------------------------------------------------------

    def _drop(self, db: psycopg.Connection[tuple[object, ...]], exc: Exception) -> None:
        log.warning("a generation read failed (%s); the workers read it meanwhile", exc)
        db.close()
        self._missing += 1
        self._replace()

    def _take_fresh(self) -> None:
        while True:
            try:
                db = self._fresh.get_nowait()
            except queue.Empty:
                return
            if db is None:
                self._missing += 1
            elif self._closed:
                db.close()
            else:
                self._free.append(db)

    def _replace(self) -> None:
        """Open the missing connections in a background thread (one thread at a time,
        not more often than every few seconds)."""
        now = time.monotonic()
        if not self._missing or self._reconnecting.is_set():
            return
        if now - self._last_attempt < _RECONNECT_EVERY:
            return
        self._last_attempt = now
        self._reconnecting.set()
        missing, self._missing = self._missing, 0
        threading.Thread(
            target=self._connect, args=(missing,), name="generation-connect", daemon=True
        ).start()

    def _connect(self, count: int) -> None:
        try:
            for _ in range(count):
                try:
                    db = psycopg.connect(
                        self._url, autocommit=True, connect_timeout=self._connect_timeout
                    )
                    db.pgconn.nonblocking = 1
                except psycopg.Error as exc:
                    log.warning("cannot open a connection for generation reads: %s", exc)
                    self._fresh.put(None)
                    continue
                self._fresh.put(db)
        finally:
            self._reconnecting.clear()
