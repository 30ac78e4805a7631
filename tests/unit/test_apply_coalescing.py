"""Applies that wait behind one another: a job claimed before a successful apply began
reading the desired set is landed by it, without another whole config to the cluster;
an apply reads it only once the cluster builds nothing it would hand over again."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from controlplane.apply_job import ApplyJobs
from controlplane.config import Settings
from controlplane.files import Files
from controlplane.storage.db import Database
from controlplane.storage.jobs import Job, JobKind
from tests.helpers import eventually
from workers.backend import AppSpec


class HeldBackend:
    """Its first apply waits until released (or, ``building``, its first wait for the
    cluster's builds does); it counts every apply."""

    def __init__(self, building: bool = False) -> None:
        self.applies = 0
        self.building = building
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def until_built(self) -> int:
        if not self.building:
            return 0
        self.building = False
        self.entered.set()
        await self.release.wait()
        return 1

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        self.applies += 1
        if self.applies == 1 and not self.release.is_set():
            self.entered.set()
            await self.release.wait()


def job(i: int) -> Job:
    return Job(id=i, kind=JobKind.APPLY, model="", operation="", target="", trace_parent="")


def apply_jobs(tmp_path: Path, backend: HeldBackend) -> tuple[Database, ApplyJobs]:
    db = Database(Database.sqlite_url(tmp_path))
    db.migrate()
    files = Files(tmp_path / "artifacts", tmp_path / "logs", None)
    settings = Settings(data_dir=tmp_path)
    return db, ApplyJobs(db, backend, settings, "http://h", files)  # type: ignore[arg-type]  # only until_built and apply are called


async def waiting_behind(applies: ApplyJobs, ids: tuple[int, ...]) -> list[asyncio.Task[None]]:
    """Jobs run now, once each has come (noted) and waits behind the apply under way."""
    came = 0

    async def run(i: int) -> None:
        nonlocal came
        came += 1  # run() notes when the job came in this same step, before waiting
        await applies.run(job(i))

    later = [asyncio.create_task(run(i)) for i in ids]
    await eventually(f"{len(ids)} jobs waiting behind the first apply", lambda: came == len(ids))
    return later


async def test_jobs_waiting_behind_an_apply_that_read_before_them_apply_once_more(
    tmp_path: Path,
) -> None:
    backend = HeldBackend()
    db, applies = apply_jobs(tmp_path, backend)
    first = asyncio.create_task(applies.run(job(1)))
    await asyncio.wait_for(backend.entered.wait(), 10)
    # Claimed while the first apply is on its way: it read the desired set before them.
    later = await waiting_behind(applies, (2, 3, 4))
    backend.release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert backend.applies == 2, "one for the first job, one for the three behind it"
    assert applies.coalesced == 2
    db.close()


async def test_jobs_that_come_while_the_cluster_builds_go_with_the_apply_that_waited(
    tmp_path: Path,
) -> None:
    """Serve would start a build over if an application it builds were handed to it
    again: the apply waits first, then reads the desired set, so the changes committed
    while it waited are in the one config it hands over."""
    backend = HeldBackend(building=True)
    db, applies = apply_jobs(tmp_path, backend)
    first = asyncio.create_task(applies.run(job(1)))
    await asyncio.wait_for(backend.entered.wait(), 10)
    assert backend.applies == 0, "nothing handed over while the cluster builds"
    later = await waiting_behind(applies, (2, 3))
    backend.release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert backend.applies == 1, "the apply that waited carried the two that came meanwhile"
    assert applies.coalesced == 2
    db.close()
