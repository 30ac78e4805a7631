"""Applies that wait behind one another: a job claimed before a successful apply began
reading the desired set is landed by it, without another whole config to the cluster."""

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
    """Its first apply waits until released; it counts every apply."""

    def __init__(self) -> None:
        self.applies = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        self.applies += 1
        if self.applies == 1:
            self.entered.set()
            await self.release.wait()


def job(i: int) -> Job:
    return Job(id=i, kind=JobKind.APPLY, model="", operation="", target="", trace_parent="")


async def test_jobs_waiting_behind_an_apply_that_read_before_them_apply_once_more(
    tmp_path: Path,
) -> None:
    db = Database(Database.sqlite_url(tmp_path))
    db.migrate()
    backend = HeldBackend()
    files = Files(tmp_path / "artifacts", tmp_path / "logs", None)
    applies = ApplyJobs(db, backend, Settings(data_dir=tmp_path), "http://h", files)  # type: ignore[arg-type]  # only apply is called
    first = asyncio.create_task(applies.run(job(1)))
    await asyncio.wait_for(backend.entered.wait(), 10)
    # Claimed while the first apply is on its way: it read the desired set before them.
    came = 0

    async def run(i: int) -> None:
        nonlocal came
        came += 1  # run() notes when the job came in this same step, before waiting
        await applies.run(job(i))

    later = [asyncio.create_task(run(i)) for i in (2, 3, 4)]
    await eventually("three jobs waiting behind the first apply", lambda: came == 3)
    backend.release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert backend.applies == 2, "one for the first job, one for the three behind it"
    assert applies.coalesced == 2
    db.close()
