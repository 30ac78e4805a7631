"""Models' log lines on SQLite and PostgreSQL: written once however often they are read
from the collector, read back filtered and tailed, and trimmed to the newest bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controlplane.storage import model_logs
from controlplane.storage.db import Database
from controlplane.storage.model_logs import ROW_OVERHEAD, LogQuery

M = "projects/p/models/m"
T = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def row(seq: int, text: str = "x" * 36, replica: str = "r1", model: str = M) -> dict[str, object]:
    return {
        "model": model,
        "replica": replica,
        "seq": seq,
        "build": f"{model}/builds/{1 if replica == 'r1' else 2}",
        "node": "10.0.0.1",
        "time": T + timedelta(seconds=seq),
        "stream": "stdout",
        "request_id": f"req-{seq}",
        "text": text,
    }


def write(db: Database, rows: list[dict[str, object]]) -> None:
    with db.write() as tx:
        model_logs.insert(tx.session, rows)


def read(db: Database, q: LogQuery) -> list[str]:
    with db.read() as s:
        return [f"{line.replica}:{line.seq}" for line in model_logs.read(s, q)]


def test_a_line_written_twice_is_kept_once(db: Database) -> None:
    write(db, [row(0), row(1)])
    write(db, [row(1), row(2)])  # a second server, or a restart, read the same lines
    assert read(db, LogQuery(M)) == ["r1:0", "r1:1", "r1:2"]


def test_lines_filtered_by_replica_build_time_and_tailed(db: Database) -> None:
    write(db, [row(0), row(1, replica="r2"), row(2), row(3, replica="r2"), row(4)])
    write(db, [row(0, model="projects/p/models/other")])
    assert read(db, LogQuery(M, replica="r2")) == ["r2:1", "r2:3"]
    assert read(db, LogQuery(M, build=f"{M}/builds/1")) == ["r1:0", "r1:2", "r1:4"]
    assert read(db, LogQuery(M, since=T + timedelta(seconds=3))) == ["r2:3", "r1:4"]
    assert read(db, LogQuery(M, tail=2)) == ["r2:3", "r1:4"]
    with db.read() as s:
        first = model_logs.read(s, LogQuery(M, limit=2))
    assert read(db, LogQuery(M, after_id=first[-1].id)) == ["r1:2", "r2:3", "r1:4"]


def test_trim_keeps_the_newest_bytes_of_each_model(db: Database) -> None:
    per_line = 36 + ROW_OVERHEAD  # 100 bytes counted per line
    write(db, [row(i) for i in range(10)])
    write(db, [row(i, model="projects/p/models/other") for i in range(10)])
    with db.write() as tx:
        removed = model_logs.trim(tx.session, M, max_bytes=3 * per_line + 50)
    assert removed == 7
    assert read(db, LogQuery(M)) == ["r1:7", "r1:8", "r1:9"]
    assert len(read(db, LogQuery("projects/p/models/other"))) == 10  # another model's stay
    with db.write() as tx:
        assert model_logs.trim(tx.session, M, max_bytes=10 * per_line) == 0


def test_a_deleted_models_lines_go_with_it(db: Database) -> None:
    write(db, [row(0), row(1)])
    with db.write() as tx:
        model_logs.delete_model(tx.session, M)
    assert read(db, LogQuery(M)) == []


def test_a_large_batch_is_written_whole(db: Database) -> None:
    # A server that was away reads up to 20,000 lines at once: more than one INSERT holds.
    write(db, [row(i, text="y") for i in range(2500)])
    assert len(read(db, LogQuery(M, limit=5000))) == 2500
