"""A watcher's queue: what the hub offers comes out in order, a full queue cuts the
watcher off, an idle one gets bookmarks and a busy one does not."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from controlplane.domain.states import EventType
from controlplane.domain.types import Event
from controlplane.watch import Subscription
from tests.helpers import eventually

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(revision: int) -> Event:
    return Event(revision=revision, time=T0, type=EventType.UPDATED, model="projects/p/models/m")


async def test_a_waiting_watcher_wakes_on_an_offer_and_gets_events_in_order() -> None:
    sub = Subscription("projects/p/models/m", size=10)
    waiting = asyncio.ensure_future(sub.next())
    await eventually("the watcher waits", lambda: sub.waiting)
    assert not waiting.done()
    sub.offer(event(1))
    sub.offer(event(2))
    assert (await asyncio.wait_for(waiting, 5)) == event(1)
    assert (await sub.next()) == event(2)


async def test_a_full_queue_cuts_the_watcher_off_with_events_still_queued() -> None:
    sub = Subscription("projects/p/models/m", size=2)
    for rev in (1, 2, 3):
        sub.offer(event(rev))
    assert sub.overflowed
    assert await sub.next() is None, "a watcher that fell behind gets nothing more"
    sub.offer(event(4))
    assert await sub.next() is None


async def test_an_overflow_wakes_a_waiting_watcher() -> None:
    sub = Subscription("projects/p/models/m", size=0)
    waiting = asyncio.ensure_future(sub.next())
    await eventually("the watcher waits", lambda: sub.waiting)
    sub.offer(event(1))
    assert await asyncio.wait_for(waiting, 5) is None


async def test_bookmarks_go_only_to_an_idle_watcher() -> None:
    sub = Subscription("projects/p/models/m", size=10)
    sub.offer(event(1))
    sub.offer_bookmark(5)
    assert list(sub.pending) == [event(1)], "no bookmark into a queue with work"
    await sub.next()
    sub.offer_bookmark(5)
    mark = await sub.next()
    assert mark is not None and mark.type is EventType.BOOKMARK and mark.revision == 5


async def test_drain_forgets_what_is_queued_and_an_overflow() -> None:
    sub = Subscription("projects/p/models/m", size=1)
    sub.offer(event(1))
    sub.offer(event(2))
    sub.drain()
    assert not sub.overflowed and not sub.pending
    sub.offer(event(3))
    assert await sub.next() == event(3)


async def test_a_cancelled_wait_leaves_the_queue_usable() -> None:
    sub = Subscription("projects/p/models/m", size=10)
    waiting = asyncio.ensure_future(sub.next())
    await eventually("the watcher waits", lambda: sub.waiting)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not sub.waiting
    sub.offer(event(1))
    assert await asyncio.wait_for(sub.next(), 5) == event(1)
