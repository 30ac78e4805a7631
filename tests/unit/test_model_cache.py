"""GetModel's cache (SQLite, and PostgreSQL's head check): read-your-writes, and no stale
entry from a racing read.

Also: a write that changes nothing a client sees makes no event (watchers are not sent
copies of what they have)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from sqlmodel import select

from controlplane.domain.states import ModelState
from controlplane.files import Files
from controlplane.service import Service
from controlplane.sources import SourceStore
from controlplane.storage.changes import Changes
from controlplane.storage.db import Database
from controlplane.storage.model_cache import HeadCheck
from controlplane.storage.tables import EventRow, ModelRow
from tests.helpers import eventually

MODEL = "projects/p/models/m"


def service(tmp_path: Path) -> Service:
    db = Database(Database.sqlite_url(tmp_path))
    db.migrate()
    sources = SourceStore(tmp_path / "sources", 1 << 20, 100, 1 << 20)
    files = Files(tmp_path / "artifacts", tmp_path / "logs", None)
    svc = Service(db, sources, "http://127.0.0.1:8000", files)
    svc.create_model("projects/p", "m", "", "first", "")
    return svc


def describe(svc: Service, text: str) -> None:
    with svc.db.write() as tx:
        row = tx.session.exec(select(ModelRow).where(ModelRow.name == MODEL)).one()
        Changes(tx, svc.http_base).model(row, description=text)


def test_a_read_is_served_from_memory_until_the_next_write(tmp_path: Path) -> None:
    svc = service(tmp_path)
    assert svc.cached_model(MODEL) is None
    first = svc.get_model(MODEL)
    assert svc.cached_model(MODEL) == first
    describe(svc, "second")
    assert svc.cached_model(MODEL) is None, "a write clears the cache before it returns"
    assert svc.get_model(MODEL).description == "second"
    assert svc.cached_model(MODEL) is not None


def test_a_read_that_raced_a_write_is_not_kept(tmp_path: Path) -> None:
    svc = service(tmp_path)
    generation = svc.models.generation  # a read starts...
    stale = svc.get_model(MODEL)
    describe(svc, "second")  # ...a write commits before it stores what it read
    svc.models.put(stale, generation)
    assert svc.cached_model(MODEL) is None
    assert svc.get_model(MODEL).description == "second"


def events(db: Database) -> list[EventRow]:
    with db.read() as s:
        return list(s.exec(select(EventRow)).all())


def test_only_a_visible_change_makes_an_event(tmp_path: Path) -> None:
    svc = service(tmp_path)
    before = len(events(svc.db))
    with svc.db.write() as tx:
        row = tx.session.exec(select(ModelRow).where(ModelRow.name == MODEL)).one()
        revision = row.revision
        Changes(tx, svc.http_base).model(row, next_build_version=7, description="first")
    with svc.db.read() as s:
        row = s.exec(select(ModelRow).where(ModelRow.name == MODEL)).one()
        assert row.next_build_version == 7, "the bookkeeping is saved"
        assert row.revision == revision, "no new resource version for an invisible change"
    assert len(events(svc.db)) == before
    with svc.db.write() as tx:
        row = tx.session.exec(select(ModelRow).where(ModelRow.name == MODEL)).one()
        Changes(tx, svc.http_base).model(row, ModelState.PENDING)
    after = events(svc.db)
    assert len(after) == before + 1
    assert '"PENDING"' in after[-1].body


# ---- PostgreSQL's path: kept entries checked against the head revision -----------------


def test_an_entry_is_used_only_while_the_head_has_not_moved(tmp_path: Path) -> None:
    svc = service(tmp_path)
    cache = svc.models
    cache.local = False  # as on PostgreSQL: no answer without the head
    assert cache.get(MODEL) is None
    assert cache.get_at(MODEL, 10) is None  # the first check: nothing kept yet
    generation = cache.generation
    cache.put(svc.get_model(MODEL), generation)
    assert cache.get(MODEL) is None, "never without the head"
    assert cache.get_at(MODEL, 10) is not None
    assert cache.get_at(MODEL, 9) is None, "an older head (a slow check) is not trusted"
    assert cache.get_at(MODEL, 10) is not None, "...nor does it drop what is kept"
    assert cache.get_at(MODEL, 11) is None, "the head moved: everything kept goes"
    assert cache.get_at(MODEL, 11) is None


def test_a_read_begun_before_the_head_moved_is_not_kept(tmp_path: Path) -> None:
    svc = service(tmp_path)
    cache = svc.models
    cache.local = False
    cache.get_at(MODEL, 10)
    generation = cache.generation  # a read starts at head 10...
    stale = svc.get_model(MODEL)
    assert cache.get_at(MODEL, 11) is None  # ...another caller sees head 11 first
    cache.put(stale, generation)
    assert cache.get_at(MODEL, 11) is None


async def test_callers_that_come_during_a_head_read_share_the_next_one() -> None:
    head = [1]
    started = threading.Event()
    release = threading.Event()

    def read() -> int:
        value = head[0]
        started.set()
        assert release.wait(10)
        return value

    check = HeadCheck(lambda: asyncio.to_thread(read))
    first = asyncio.create_task(check.now())
    assert await asyncio.to_thread(started.wait, 10)
    head[0] = 2  # a write commits while the first read is under way...
    came = 0

    async def caller() -> int:
        nonlocal came
        came += 1  # now() queues the caller in this same step, before its first await
        return await check.now()

    later = [asyncio.create_task(caller()) for _ in range(10)]  # ...then these come
    await eventually("ten callers waiting for the next read", lambda: came == 10)
    release.set()
    assert await first == 1
    assert await asyncio.gather(*later) == [2] * 10, "each saw a read begun after it came"
    assert check.queries == 2, "one read for the ten"


async def test_a_failed_head_read_fails_its_callers_and_the_next_call_reads_again() -> None:
    fail = [True]

    async def read() -> int:
        if fail[0]:
            raise ConnectionError("database away")
        return 5

    check = HeadCheck(read)
    with pytest.raises(ConnectionError):
        await check.now()
    fail[0] = False
    assert await check.now() == 5
    assert list(await asyncio.gather(check.now(), check.now())) == [5, 5]
