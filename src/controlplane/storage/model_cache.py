"""GetModel from memory, every client still reading its own writes.

SQLite (this process makes every write): a write that changes anything a client can see
of a model commits an event with it; every such commit clears the whole cache, in the
writer's thread, before its RPC answers. A read that raced a write never stores what it
read (the generation moved on).

PostgreSQL (other servers write too, and their commits are heard only later): what is kept
is valid at a revision, the head revision read before it was. A read first learns the head
now (one primary-key query, shared by every read waiting at the time: ``HeadCheck``) and
is answered from memory only if the head has not moved; if it has, everything kept is
dropped. As the Kubernetes watch cache serves a consistent read: the latest revision from
the store, then the cache if it is that fresh.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import psycopg

from controlplane.domain.types import Model
from controlplane.storage import notify
from controlplane.storage.db import Database


class ModelCache:
    def __init__(self, db: Database) -> None:
        self.local = db.is_sqlite  # every write is this process's: commits clear the cache
        self._models: dict[str, Model] = {}
        self._generation = 0
        self._head = -1  # PostgreSQL: the revision what is kept is valid at
        self._lock = threading.Lock()
        db.on_commit(lambda _revision: self.clear())

    def get(self, name: str) -> Model | None:
        """SQLite: the model if kept. PostgreSQL: None (ask ``get_at`` with the head)."""
        return self._models.get(name) if self.local else None

    def get_at(self, name: str, head: int) -> Model | None:
        """The model if kept and the database's head revision is still ``head`` (read
        after the caller's request began)."""
        with self._lock:
            if head > self._head:  # something committed since: nothing kept is sure
                self._models.clear()
                self._generation += 1
                self._head = head
                return None
            if head < self._head:  # a slow check: newer ones moved on
                return None
            return self._models.get(name)

    @property
    def generation(self) -> int:
        """Read before the database is: ``put`` takes it back."""
        return self._generation

    def put(self, model: Model, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._models[model.name] = model

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._models.clear()


class HeadCheck:
    """The database's head revision, read after the call began, one query for many
    callers: a caller that comes while a read is under way waits for the next one (which
    starts once that one ends, so after the caller came); every caller waiting then
    shares it. Under 100 concurrent GetModels that is a query per batch, not per call."""

    def __init__(self, read: Callable[[], Awaitable[int]]) -> None:
        self.read = read
        self._running: asyncio.Future[int] | None = None
        self._queued: asyncio.Future[int] | None = None
        self.queries = 0  # how many reads were made (for tests and benchmarks)

    async def now(self) -> int:
        if self._running is None:
            return await asyncio.shield(self._start())
        if self._queued is None:
            self._queued = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._queued)

    def _start(self) -> asyncio.Future[int]:
        self.queries += 1
        running = asyncio.ensure_future(self.read())
        self._running = running
        running.add_done_callback(self._ended)
        return running

    def _ended(self, done: asyncio.Future[int]) -> None:
        self._running = None
        queued, self._queued = self._queued, None
        if queued is None:
            return
        self._start().add_done_callback(lambda nxt: _copy(nxt, queued))


def _copy(source: asyncio.Future[int], target: asyncio.Future[int]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


class PostgresHead:
    """Reads the head revision on a connection of its own, in the event loop: no thread,
    no pool, no ORM session; one prepared primary-key query (~0.1 ms on a local server).
    A broken connection is dropped (the caller sees the error) and made again next time."""

    QUERY = "SELECT value FROM counters WHERE name = 'revision'"

    def __init__(self, url: str) -> None:
        self.url = notify.libpq_url(url)
        self._conn: psycopg.AsyncConnection[tuple[int]] | None = None

    async def __call__(self) -> int:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            cur = await self._conn.execute(self.QUERY, prepare=True)
            row = await cur.fetchone()
            return int(row[0]) if row else 0
        except psycopg.Error:
            await self.close()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()
