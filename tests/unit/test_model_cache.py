"""GetModel's cache (SQLite): read-your-writes, and no stale entry from a racing read.

Also: a write that changes nothing a client sees makes no event (watchers are not sent
copies of what they have)."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from controlplane.domain.states import ModelState
from controlplane.files import Files
from controlplane.service import Service
from controlplane.sources import SourceStore
from controlplane.storage.changes import Changes
from controlplane.storage.db import Database
from controlplane.storage.tables import EventRow, ModelRow

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
