"""Live pages that share their work: every page open on the same key (live.py makes it of
the address, path and query, and the projects the token sees) follows one API watch and
is re-loaded once per change, whoever opened it; each page then renders what was loaded
for its own session (its CSRF token, its role's buttons).

What a page shows is read through one of its followers' tokens (the "reader"). Every token
that may see a project's pages reads the same data (reads need only the viewer role of that
project), and a follower gets an update only while its own token still works: it is
asked again (GetCaller) at most every ``RECHECK_S``, and at least that often while the page
is idle, so a revoked token's page stops within that time. When the reader's token stops
working or its session ends, the next follower reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from controlplane.api.client import ClientError

RECHECK_S = 10.0

V = TypeVar("V")
Context = dict[str, Any]


@dataclass(eq=False)
class Follower(Generic[V]):
    view: V
    latest: Context | BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    checked: float = field(default_factory=time.monotonic)

    def offer(self, item: Context | BaseException) -> None:
        """Only the newest context matters: an older one not yet sent is dropped."""
        self.latest = item
        self.ready.set()

    async def next(self, wait_s: float) -> Context | BaseException | None:
        """The next item, or None after ``wait_s`` with nothing new."""
        try:
            await asyncio.wait_for(self.ready.wait(), wait_s)
        except TimeoutError:
            return None
        self.ready.clear()
        item, self.latest = self.latest, None
        return item


class Hub(Generic[V]):
    """One address: its followers, the watch and the newest load."""

    def __init__(
        self,
        load: Callable[[V], Awaitable[Context]],
        watch: Callable[[V], AsyncIterator[object]],
        ticks: Callable[[AsyncIterator[object]], AsyncIterator[None]],
        still_valid: Callable[[V], Awaitable[None]],
        on_empty: Callable[[], None],
    ) -> None:
        self.load = load
        self.watch = watch
        self.ticks = ticks
        self.still_valid = still_valid
        self.on_empty = on_empty
        self.followers: list[Follower[V]] = []
        self.latest: Context | None = None
        self.task: asyncio.Task[None] | None = None

    def join(self, follower: Follower[V]) -> None:
        self.followers.append(follower)
        if self.latest is not None:
            follower.offer(self.latest)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())

    def leave(self, follower: Follower[V]) -> None:
        was_reader = bool(self.followers) and self.followers[0] is follower
        with contextlib.suppress(ValueError):
            self.followers.remove(follower)
        if not self.followers:
            if self.task is not None:
                self.task.cancel()
            self.on_empty()
        elif was_reader:  # the next follower reads, with its own token, from now on
            if self.task is not None:
                self.task.cancel()
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self.followers:
            reader = self.followers[0]
            try:
                async for _ in self.ticks(self.watch(reader.view)):
                    self.latest = await self.load(reader.view)
                    for follower in self.followers:
                        follower.offer(self.latest)
                error: BaseException = ClientError("UNAVAILABLE", "the API ended the watch")
            except ClientError as e:
                error = e
            except Exception as e:  # e.g. the reader's channel, closed as its session ended
                error = ClientError("UNAVAILABLE", str(e) or type(e).__name__)
            if reader not in self.followers:
                continue  # it left while reading: the next one reads
            if not (isinstance(error, ClientError) and error.code == "UNAUTHENTICATED"):
                try:  # the reader's own session may be what failed (signed out meanwhile)
                    await self.still_valid(reader.view)
                except ClientError as e:
                    error = e
                except Exception as e:
                    error = ClientError("UNAUTHENTICATED", str(e) or type(e).__name__)
                else:  # a refusal every follower would get: the page is gone, say why
                    for follower in self.followers:
                        follower.offer(error)
                    return
            reader.offer(error)  # its own page stops (signs out); the others go on
            with contextlib.suppress(ValueError):
                self.followers.remove(reader)


class Hubs(Generic[V]):
    def __init__(self) -> None:
        self._hubs: dict[str, Hub[V]] = {}

    def __len__(self) -> int:
        return len(self._hubs)

    async def follow(
        self,
        key: str,
        view: V,
        load: Callable[[V], Awaitable[Context]],
        watch: Callable[[V], AsyncIterator[object]],
        ticks: Callable[[AsyncIterator[object]], AsyncIterator[None]],
        still_valid: Callable[[V], Awaitable[None]],
    ) -> AsyncIterator[Context]:
        """The contexts of the page at ``key``, for ``view``: the newest at once when the
        page is already followed, then one per change. Raises the API's error when the
        watch or a load fails, or when ``still_valid(view)`` does (checked at most every
        RECHECK_S, and at least that often while nothing changes)."""
        hub = self._hubs.get(key)
        if hub is None:
            hub = self._hubs[key] = Hub(load, watch, ticks, still_valid, lambda: self._forget(key))
        follower = Follower(view)
        hub.join(follower)
        try:
            while True:
                item = await follower.next(RECHECK_S)
                if time.monotonic() - follower.checked >= RECHECK_S:
                    await still_valid(view)
                    follower.checked = time.monotonic()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    yield item
        finally:
            hub.leave(follower)

    def _forget(self, key: str) -> None:
        hub = self._hubs.get(key)
        if hub is not None and not hub.followers:
            del self._hubs[key]
