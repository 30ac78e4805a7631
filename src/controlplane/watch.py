"""Watching: replay from the persisted events, then live, each watcher on its own queue.

One hub task tails the events table (woken after every commit, and polling as
a fallback) and fans events out to subscribers. A subscriber whose bounded
queue fills up is cut off (RESOURCE_EXHAUSTED) and resumes from its last
revision; it never slows the hub or the other watchers (after Kubernetes'
cacher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

from sqlmodel import col, delete, select

from controlplane.domain import names, watch_filter
from controlplane.domain.errors import OutOfRange, ResourceExhausted, invalid_field
from controlplane.domain.states import EventType
from controlplane.domain.types import Event, Model, Resource
from controlplane.domain.watch_filter import WatchFilter
from controlplane.storage import repo
from controlplane.storage.changes import now
from controlplane.storage.db import Database
from controlplane.storage.tables import CounterRow, EventRow, ModelRow, OperationRow

log = logging.getLogger(__name__)

PRUNED = "events_pruned_through"
# A watcher's way out: awaited with each event, in order (the API layer writes it).
Send = Callable[[Event], Awaitable[object]]
BOOKMARK_EVERY_S = 30.0


class Subscription:
    """One watcher's bounded queue. ``key`` is a model name, or ``projects/{p}`` for
    every model of a project (then ``wanted`` filters).

    A deque and one waiter, not an ``asyncio.Queue``: every event goes through here once
    per watcher, and a Queue's put and get (its task count, its events, its getters'
    deque) cost several times as much for what one reader and one writer need."""

    __slots__ = ("_waiter", "key", "last_offer", "overflowed", "pending", "size", "wanted")

    def __init__(self, key: str, size: int, wanted: WatchFilter | None = None) -> None:
        self.key = key
        self.wanted = wanted
        self.size = size
        self.pending: deque[Event] = deque()
        self.overflowed = False
        self.last_offer = time.monotonic()  # when the watcher last got something to send
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event, at: float | None = None) -> None:
        """Queues ``event`` for this watcher (``at``: now, by the monotonic clock, when
        the caller offers one event to many)."""
        if self.overflowed or (self.wanted is not None and not self.wanted.matches(event)):
            return
        if len(self.pending) >= self.size:
            self.overflowed = True
        else:
            self.pending.append(event)
            self.last_offer = time.monotonic() if at is None else at
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer_bookmark(self, revision: int) -> None:
        """Wakes an idle watcher to send a BOOKMARK (never into a queue with work)."""
        if not self.pending:
            self.offer(Event(revision=revision, time=now(), type=EventType.BOOKMARK))

    @property
    def waiting(self) -> bool:
        """Its watcher is waiting for an event."""
        return self._waiter is not None

    async def next(self) -> Event | None:
        """The next event, waiting while there is none; None once the queue overflowed
        (the watcher fell behind: it is cut off, whatever is still queued)."""
        while not self.overflowed and not self.pending:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return None if self.overflowed else self.pending.popleft()

    def drain(self) -> None:
        """Forgets what is queued, overflow included: for a subscriber that only wakes
        on a change and then reads the database itself."""
        self.pending.clear()
        self.overflowed = False


class EventHub:
    def __init__(
        self,
        db: Database,
        http_base: str,
        queue_size: int,
        retention_count: int,
        retention_s: float,
        poll_s: float = 1.0,
        bookmark_s: float = BOOKMARK_EVERY_S,
    ) -> None:
        self.bookmark_s = bookmark_s
        self.db = db
        self.http_base = http_base
        self.queue_size = queue_size
        self.retention_count = retention_count
        self.retention_s = retention_s
        self.poll_s = poll_s
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._bookmarker: asyncio.Task[None] | None = None
        self._last = 0
        self._stopping = False
        self._watchers = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last = await asyncio.to_thread(self.db.head_revision)
        self.db.on_commit(lambda _rev: self._notify())
        self._task = asyncio.create_task(self._run(), name="event-hub")
        self._bookmarker = asyncio.create_task(self._bookmarks(), name="event-hub-bookmarks")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._bookmarker:
            self._bookmarker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bookmarker
        if self._task:
            await self._task

    def _notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    @property
    def watchers(self) -> int:
        """Subscriptions open now (a plain int: metrics read it from another thread)."""
        return self._watchers

    def subscribe(self, key: str, wanted: WatchFilter | None = None) -> Subscription:
        sub = Subscription(key, self.queue_size, wanted)
        self._subs[key].add(sub)
        self._watchers += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self._watchers -= 1
            if not subs:
                del self._subs[sub.key]

    async def _run(self) -> None:
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self._fan_out()
                if loop.time() - last_prune > 60:
                    last_prune = loop.time()
                    await asyncio.to_thread(self.prune)
            except Exception:  # the hub never dies
                log.exception("event hub failed; retrying")

    async def _bookmarks(self) -> None:
        """Every watcher idle for ``bookmark_s`` gets a BOOKMARK. One timer for all of them,
        so that a watcher waits on its queue alone (a timeout per wait would cost a task
        and a timer for every event sent to every watcher)."""
        tick = min(1.0, self.bookmark_s / 4)
        while True:
            await asyncio.sleep(tick)
            idle_since = time.monotonic() - self.bookmark_s
            for subs in list(self._subs.values()):
                for sub in list(subs):
                    if sub.last_offer <= idle_since:
                        sub.offer_bookmark(self._last)

    async def _fan_out(self) -> None:
        while True:
            rows = await asyncio.to_thread(self._read_after, self._last)
            at = time.monotonic()
            for event in rows:
                self._last = event.revision
                # Only the watchers of this model and of its project: O(matching watchers).
                for key in (event.model, _project_of(event.model)):
                    for sub in self._subs.get(key, ()):
                        sub.offer(event, at)
            if len(rows) < 1000:
                return

    def _read_after(self, revision: int) -> list[Event]:
        with self.db.read() as s:
            return [repo.to_event(r) for r in repo.events_after(s, None, revision, 1000)]

    def prune(self) -> None:
        """Drops events older than both retention bounds (at least N events and S seconds)."""
        with self.db.write() as tx:
            s = tx.session
            head = tx.session.get(CounterRow, "revision")
            assert head is not None
            cutoff_rev = head.value - self.retention_count
            cutoff_time = now() - timedelta(seconds=self.retention_s)
            newest_old = s.exec(
                select(EventRow.revision)
                .where(EventRow.revision <= cutoff_rev, EventRow.time < cutoff_time)
                .order_by(col(EventRow.revision).desc())
                .limit(1)
            ).first()
            if newest_old is None:
                return
            s.exec(delete(EventRow).where(col(EventRow.revision) <= newest_old))
            marker = s.get(CounterRow, PRUNED) or CounterRow(name=PRUNED, value=0)
            marker.value = max(marker.value, int(newest_old))
            s.add(marker)

    # ---- one watch -------------------------------------------------------------------------

    async def watch(self, name: str, since_revision: int, send: Send) -> None:
        """One model: its current state (since_revision 0) or the events after a revision,
        then every change, live; each handed to ``send`` (awaited) in order. Returns once
        the model is deleted; raises for a bad start or a watcher that fell behind."""
        names.parse_model(name)
        await self._follow(name, since_revision, None, send)

    async def watch_project(
        self, parent: str, filter_text: str, since_revision: int, send: Send
    ) -> None:
        """Every model of a project, with the same ordering and resume rules."""
        key = str(names.parse_project(parent))
        await self._follow(key, since_revision, watch_filter.parse(filter_text), send)

    async def _follow(
        self, key: str, since_revision: int, wanted: WatchFilter | None, send: Send
    ) -> None:
        """The whole watch in one coroutine that awaits ``send`` itself: every live event
        of every watcher passes through here, and each generator between the queue and
        the socket would cost each delivery (a thousand watchers: a thousand times per
        event)."""
        if since_revision < 0:
            raise invalid_field("since_revision", f"must be >= 0, got {since_revision}")
        # Subscribe first: nothing committed after the snapshot's head can be missed.
        sub = self.subscribe(key, wanted)
        try:
            head = await asyncio.to_thread(self._begin, key, since_revision)
            last = since_revision
            if since_revision == 0:
                for event in await asyncio.to_thread(self._snapshot, key):
                    if wanted is None or wanted.matches(event):
                        await send(event)
                last = head
                await send(Event(revision=head, time=now(), type=EventType.BOOKMARK, model=key))
            else:
                async for event in self._replay(key, since_revision, head):
                    last = event.revision
                    if wanted is None or wanted.matches(event):
                        await send(event)
                last = max(last, head)
            # Live: each event from the watcher's own queue (the hub filtered it already).
            while True:
                live = await sub.next()
                if live is None:
                    raise ResourceExhausted(
                        message=f"watcher fell behind by more than {self.queue_size} events; "
                        f"resume with since_revision={last}",
                        reason="WATCHER_TOO_SLOW",
                        metadata={"last_revision": str(last)},
                    )
                if live.type is EventType.BOOKMARK:
                    await send(
                        Event(
                            revision=max(last, live.revision),
                            time=live.time,
                            type=EventType.BOOKMARK,
                            model=key,
                        )
                    )
                    continue
                if live.revision <= last:
                    continue
                last = live.revision
                await send(live)
                if (
                    live.type is EventType.DELETED
                    and isinstance(live.resource, Model)
                    and live.model == key
                ):
                    return  # the watched model is gone
        finally:
            self.unsubscribe(sub)

    def _begin(self, key: str, since: int) -> int:
        """Checks the watch can start: its model exists, its revision is retained."""
        with self.db.read() as s:
            if not key.startswith("projects/") or "/models/" in key:
                repo.model_row(s, key)
            head_row = s.get(CounterRow, "revision")
            head = head_row.value if head_row else 0
            pruned = s.get(CounterRow, PRUNED)
            if since and pruned is not None and since < pruned.value:
                raise OutOfRange(
                    message=f"revision {since} is older than the retained history (events up "
                    f"to {pruned.value} were dropped); watch again with since_revision 0",
                    reason="REVISION_EXPIRED",
                    metadata={"since_revision": str(since), "oldest": str(pruned.value + 1)},
                )
            if since > head:
                raise invalid_field(
                    "since_revision",
                    f"revision {since} is newer than the latest ({head})",
                    reason="REVISION_IN_FUTURE",
                )
            return head

    def _snapshot(self, key: str) -> list[Event]:
        """CURRENT events, in revision order: each model, its active deployment and its
        running operation (one model, or every model of a project)."""
        with self.db.read() as s:
            if "/models/" in key:
                models = [repo.model_row(s, key)]
            else:
                project = key.removeprefix("projects/")
                query = select(ModelRow).where(ModelRow.project == project)
                models = list(s.exec(query.order_by(col(ModelRow.id))).all())
            items: list[tuple[int, str, Resource]] = []
            for model in models:
                items.append((model.revision, model.name, repo.to_model(model, self.http_base)))
                dep = repo.maybe_deployment_row(s, model.active_deployment)
                if dep is not None:
                    items.append((dep.revision, model.name, repo.to_deployment(dep)))
                if model.running_operation:
                    op = s.exec(
                        select(OperationRow).where(OperationRow.name == model.running_operation)
                    ).first()
                    if op is not None:
                        items.append((op.revision, model.name, repo.to_operation(op)))
            items.sort(key=lambda i: i[0])
            ts = now()
            return [
                Event(revision=rev, time=ts, type=EventType.CURRENT, resource=r, model=m)
                for rev, m, r in items
            ]

    async def _replay(self, key: str, after: int, head: int) -> AsyncIterator[Event]:
        last = after
        while last < head:
            rows = await asyncio.to_thread(self._read_scope_after, key, last)
            rows = [e for e in rows if e.revision <= head]
            if not rows:
                return
            for event in rows:
                yield event
            last = rows[-1].revision

    def _read_scope_after(self, key: str, revision: int) -> list[Event]:
        with self.db.read() as s:
            if "/models/" in key:
                rows = repo.events_after(s, key, revision, 500)
            else:
                rows = repo.events_after(s, None, revision, 500, key.removeprefix("projects/"))
            return [repo.to_event(r) for r in rows]


def _project_of(model_name: str) -> str:
    """``projects/p/models/m`` -> ``projects/p`` (the key of the project's watchers)."""
    return model_name.rsplit("/models/", 1)[0]
