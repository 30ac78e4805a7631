"""Pages open on one address share one watch and one load per change (console/hubs.py),
with a fake watch and load: who reads, who gets what, and who is stopped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from controlplane.api.client import ClientError
from controlplane.console import hubs as hub_module
from controlplane.console.hubs import Context, Hubs
from tests.helpers import eventually


@dataclass(eq=False)
class Page:
    """A follower's view: its token works while ``valid``."""

    name: str
    valid: bool = True
    closed: bool = False  # its session ended (signed out): its client no longer works
    got: list[int] = field(default_factory=list)


class Api:
    def __init__(self) -> None:
        self.changes: asyncio.Queue[int] = asyncio.Queue()
        self.watches: list[str] = []
        self.loads: list[str] = []
        self.version = 0

    async def watch(self, view: Page) -> AsyncIterator[object]:
        self.watches.append(view.name)
        yield "current"
        while True:
            self.version = await self.changes.get()
            if view.closed:  # its session ended: its channel is closed under the watch
                raise ClientError("UNAVAILABLE", "the API stream was closed")
            if not view.valid:
                raise ClientError("UNAUTHENTICATED", "revoked")
            yield "changed"

    async def load(self, view: Page) -> Context:
        self.loads.append(view.name)
        return {"version": self.version}

    @staticmethod
    async def ticks(source: AsyncIterator[object]) -> AsyncIterator[None]:
        async for _ in source:
            yield None

    @staticmethod
    async def still_valid(view: Page) -> None:
        if not view.valid or view.closed:
            raise ClientError("UNAUTHENTICATED", "revoked or signed out")


def follow(hubs: Hubs[Page], api: Api, page: Page) -> asyncio.Task[BaseException | None]:
    async def run() -> BaseException | None:
        try:
            async for context in hubs.follow(
                "/p", page, api.load, api.watch, api.ticks, api.still_valid
            ):
                page.got.append(context["version"])
        except ClientError as e:
            return e
        return None

    return asyncio.create_task(run())


async def a_reads_b_follows(
    hubs: Hubs[Page], api: Api
) -> tuple[Page, Page, asyncio.Task[BaseException | None], asyncio.Task[BaseException | None]]:
    """Page a opens first (it reads), then page b; each has had its first context."""
    a, b = Page("a"), Page("b")
    ta = follow(hubs, api, a)
    await eventually("a reads", lambda: a.got == [0])
    tb = follow(hubs, api, b)
    await eventually("b follows", lambda: b.got == [0])
    return a, b, ta, tb


async def test_pages_on_one_address_share_one_watch_and_one_load_per_change() -> None:
    api, hubs = Api(), Hubs[Page]()
    a, b = Page("a"), Page("b")
    tasks = [follow(hubs, api, a)]
    await eventually("a's first page", lambda: a.got == [0])
    tasks.append(follow(hubs, api, b))
    await eventually("b gets the newest at once", lambda: b.got == [0])
    await api.changes.put(1)
    await eventually("both get the change", lambda: a.got[-1] == b.got[-1] == 1)
    assert api.watches == ["a"] and api.loads == ["a", "a"], "one watch, one load per change"
    for t in tasks:
        t.cancel()
    await eventually("the hub is gone with its last page", lambda: len(hubs) == 0)


async def test_when_the_reader_leaves_the_next_page_reads() -> None:
    api, hubs = Api(), Hubs[Page]()
    _, b, ta, tb = await a_reads_b_follows(hubs, api)
    ta.cancel()
    await api.changes.put(2)
    await eventually("b still gets changes", lambda: b.got[-1] == 2, timeout=5)
    tb.cancel()


async def test_a_revoked_readers_page_stops_and_the_others_go_on() -> None:
    api, hubs = Api(), Hubs[Page]()
    a, b, ta, tb = await a_reads_b_follows(hubs, api)
    a.valid = False
    await api.changes.put(3)
    error = await asyncio.wait_for(ta, 5)
    assert isinstance(error, ClientError) and error.code == "UNAUTHENTICATED"
    await eventually("b reads now", lambda: api.watches == ["a", "b"])
    await api.changes.put(4)
    await eventually("b gets what b read", lambda: b.got[-1] == 4)
    tb.cancel()


async def test_an_idle_page_of_a_revoked_token_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "RECHECK_S", 0.1)
    api, hubs = Api(), Hubs[Page]()
    a, b = Page("a"), Page("b")
    ta, tb = follow(hubs, api, a), follow(hubs, api, b)
    await eventually("both follow", lambda: a.got == b.got == [0])
    b.valid = False  # nothing changes: b's own token is asked again anyway
    error = await asyncio.wait_for(tb, 5)
    assert isinstance(error, ClientError) and error.code == "UNAUTHENTICATED"
    assert not ta.done(), "a's page goes on"
    ta.cancel()


async def test_another_refusal_reaches_every_page() -> None:
    class Gone(Api):
        async def load(self, view: Page) -> Context:
            raise ClientError("NOT_FOUND", "model deleted")

    api, hubs = Gone(), Hubs[Page]()
    a, b = Page("a"), Page("b")
    ta, tb = follow(hubs, api, a), follow(hubs, api, b)
    errors = await asyncio.wait_for(asyncio.gather(ta, tb), 5)
    assert [getattr(e, "code", e) for e in errors] == ["NOT_FOUND", "NOT_FOUND"]


async def test_when_the_readers_session_ends_the_others_go_on() -> None:
    """Its channel closes under the watch (an UNAVAILABLE, not a refusal of the page):
    its own page stops, and the next follower reads."""
    api, hubs = Api(), Hubs[Page]()
    a, b, ta, tb = await a_reads_b_follows(hubs, api)
    a.closed = True
    await api.changes.put(5)
    error = await asyncio.wait_for(ta, 5)
    assert isinstance(error, ClientError) and error.code == "UNAUTHENTICATED"
    await eventually("b reads now", lambda: api.watches == ["a", "b"])
    await api.changes.put(6)
    await eventually("b still gets changes", lambda: b.got[-1] == 6)
    tb.cancel()


async def test_when_the_reader_leaves_the_next_reads_at_once() -> None:
    api, hubs = Api(), Hubs[Page]()
    _, _, ta, tb = await a_reads_b_follows(hubs, api)
    ta.cancel()
    await eventually("b reads with its own token", lambda: api.watches == ["a", "b"])
    tb.cancel()
