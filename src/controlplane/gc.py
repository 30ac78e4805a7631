"""Removes build artifacts and uploads nothing uses any more, on a schedule.

Kept: the image of every build a deployment record names (so any earlier version can
be rolled back to), and of each model's last ``keep_builds`` builds; the uploads those
builds were made from, and those of builds not finished yet. The rest goes once unused
for ``min_age_s`` (an upload that young may be about to be built). With PostgreSQL, one
server at a time collects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlmodel import Session, col, func, select

from controlplane.config import Settings
from controlplane.domain.states import BuildState
from controlplane.files import Files
from controlplane.sources import SourceStore
from controlplane.storage.db import Database
from controlplane.storage.tables import BuildRow, DeploymentRow
from workers.artifact_gc import Collected, collect, digest_of

log = logging.getLogger(__name__)

GC_LOCK = 0x6763  # "gc": PostgreSQL advisory lock key


def _kept_builds(s: Session, keep_builds: int, column: Any) -> list[Any]:
    """``column`` of the builds whose image stays: deployed ever, or among a model's
    newest ``keep_builds``."""
    deployed = select(column).where(col(BuildRow.name).in_(select(DeploymentRow.build).distinct()))
    rank = (
        func.row_number()
        .over(partition_by=BuildRow.model, order_by=col(BuildRow.version).desc())
        .label("rank")
    )
    ranked = select(column.label("kept"), rank).where(BuildRow.artifact_path != "").subquery()
    newest = select(ranked.c.kept).where(ranked.c.rank <= keep_builds)
    return list(s.exec(deployed).all()) + list(s.exec(newest).all())


def kept_digests(s: Session, keep_builds: int) -> set[str]:
    """Artifacts that must stay: deployed ever, or among a model's newest builds."""
    paths = _kept_builds(s, keep_builds, BuildRow.artifact_path)
    return {d for d in (digest_of(str(p)) for p in paths) if d}


def kept_sources(s: Session, keep_builds: int) -> set[str]:
    """Uploads that must stay: those of the kept builds and of builds not finished."""
    running = select(BuildRow.source_sha256).where(
        col(BuildRow.state).not_in([BuildState.BUILT, BuildState.FAILED])
    )
    kept = _kept_builds(s, keep_builds, BuildRow.source_sha256)
    return {str(sha) for sha in [*kept, *s.exec(running).all()]}


def collect_once(
    db: Database,
    settings: Settings,
    files: Files | None = None,
    sources: SourceStore | None = None,
) -> Collected | None:
    """One collection; None when another server holds the lock (it collects). With
    ``files``' shared store, the archives of artifacts not kept go from it too; with
    ``sources``, the uploads no kept or unfinished build uses (on disk and shared)."""
    release = db.try_lock(GC_LOCK)
    if release is None:
        return None
    try:
        with db.read() as s:
            keep = kept_digests(s, settings.gc_keep_builds)
            keep_sources = kept_sources(s, settings.gc_keep_builds)
        done = collect(
            settings.artifacts_dir,
            keep,
            min_age_s=settings.gc_min_age_s,
            staging_max_age_s=settings.build_timeout_s * 2 + 60,
        )
        if files is not None:
            done.shared_removed = files.collect(keep, settings.gc_min_age_s)
        if sources is not None:
            done.sources_removed = sources.collect(keep_sources, settings.gc_min_age_s)
    finally:
        release()
    if done.shared_removed:
        log.info("gc: removed %d unused artifacts from the database", done.shared_removed)
    if done.sources_removed:
        log.info("gc: removed %d uploads no kept build uses", done.sources_removed)
    if done.removed or done.stale_staging:
        log.info(
            "gc: removed %d unused artifacts and %d stale staging folders, %.1f MiB freed; %d kept",
            len(done.removed),
            done.stale_staging,
            done.freed_bytes / 1024 / 1024,
            done.kept,
        )
    return done


class Collector:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        files: Files | None = None,
        sources: SourceStore | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.files = files
        self.sources = sources
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.settings.gc_interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="artifact-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gc_interval_s)
            try:
                await asyncio.to_thread(
                    collect_once, self.db, self.settings, self.files, self.sources
                )
            except Exception:  # the loop never dies; the next round tries again
                log.exception("gc: collecting artifacts failed")
