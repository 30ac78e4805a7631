"""Claims jobs from the queue and runs each with its handler.

A job is an *action* (build an image: ``build_job``; apply the desired Serve config:
``apply_job``). Whether an action's result is reached is decided by the reconciler from
observation, so a job never sleeps waiting for replicas. The queue itself (claims,
leases, hand-back, fencing) is ``storage.jobs``. This loop never dies: a claim that
fails is tried again at the next wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from controlplane import failpoints, logs, tracing
from controlplane.apply_job import ApplyJobs
from controlplane.build_job import BuildJobs
from controlplane.config import Settings
from controlplane.files import Files
from controlplane.sources import SourceStore
from controlplane.storage.db import Database
from controlplane.storage.jobs import Job, JobKind, JobQueue
from workers.backend import Backend, ClusterUnavailable

log = logging.getLogger(__name__)

CLUSTER_WAIT_S = 3.0  # a job that needs the cluster, while it is gone, is tried again then


class Handler(Protocol):
    async def run(self, job: Job) -> None: ...

    def crashed(self, job: Job, error: str) -> None:
        """The job raised ``error``: what it worked for fails with the reason."""
        ...

    def cancelled(self, job: Job) -> None:
        """The job was stopped because its operation was cancelled."""
        ...


class Dispatcher:
    def __init__(
        self,
        db: Database,
        backend: Backend,
        settings: Settings,
        http_base: str,
        sources: SourceStore,
        files: Files,
    ) -> None:
        self.settings = settings
        self.queue = JobQueue(db, settings.server_id, settings.job_lease_s)
        self.applies = ApplyJobs(db, backend, settings, http_base, files)
        self.handlers: dict[JobKind, Handler] = {
            JobKind.BUILD: BuildJobs(db, backend, settings, http_base, sources, files),
            JobKind.APPLY: self.applies,
        }
        self._db = db
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._by_job: dict[int, asyncio.Task[None]] = {}  # the jobs this server runs
        self._cancelling: set[int] = set()
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Jobs an earlier run of this server held go back to the queue at once; those of
        # other servers only when their lease runs out.
        await asyncio.to_thread(self.queue.hand_back)
        self._db.on_commit(lambda _rev: self.wake())
        self._task = asyncio.create_task(self._run(), name="dispatcher")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="job-leases")

    async def stop(self) -> None:
        self._stopping = self.applies.stopping = True
        self.wake()
        if self._task:
            await self._task
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        running = list(self._by_job.values())
        if running:
            # Jobs are in the database: unfinished ones run again, here or on another server.
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # Hand this server's unfinished jobs back now rather than at lease expiry: another
        # server (or this one, started again) takes them over at once.
        await asyncio.to_thread(self.queue.hand_back)

    def wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def _heartbeat(self) -> None:
        """Renews the leases of the jobs this server runs, so no other server takes them."""
        while not self._stopping:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                await asyncio.to_thread(self.queue.renew)
            except Exception:  # the loop never dies; a missed renewal is retried
                log.exception("dispatcher: renewing job leases failed")

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                free = self.settings.dispatcher_concurrency - len(self._by_job)
                jobs = await asyncio.to_thread(self.queue.claim, free)
                if jobs:
                    failpoints.hit("job.claimed")
                for job in jobs:
                    task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
                    self._by_job[job.id] = task
                    task.add_done_callback(self._finished)
                if self._by_job:
                    await self._stop_cancelled()
            except Exception:  # the loop never dies
                log.exception("dispatcher: claiming jobs failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    def _finished(self, task: asyncio.Task[None]) -> None:
        for job_id in [j for j, running in self._by_job.items() if running is task]:
            del self._by_job[job_id]
        self.wake()

    async def _stop_cancelled(self) -> None:
        """Stops the jobs whose operation a client cancelled (through any server)."""
        for job_id in await asyncio.to_thread(self.queue.cancelled, list(self._by_job)):
            task = self._by_job.get(job_id)
            if task is not None and job_id not in self._cancelling:
                log.info("job %s: its operation was cancelled; stopping it", job_id)
                self._cancelling.add(job_id)
                task.cancel()

    async def _execute(self, job: Job) -> None:
        # Its log lines name the model and operation; its span continues the RPC's trace.
        with (
            logs.about(model=job.model, operation=job.operation),
            tracing.span(
                f"job {job.kind.value}", job.trace_parent, job_id=job.id, model=job.model
            ) as span,
        ):
            log.info("job %s (%s) started", job.id, job.kind.value)
            start = time.monotonic()
            error = await self._run_job(job)
            took = time.monotonic() - start
            if error:
                span.set_status(tracing.error_status(error))
                log.warning("job %s (%s) ended in %.2f s: %s", job.id, job.kind.value, took, error)
            else:
                log.info("job %s (%s) done in %.2f s", job.id, job.kind.value, took)

    async def _run_job(self, job: Job) -> str:
        handler = self.handlers[job.kind]
        error = ""
        try:
            await handler.run(job)
        except asyncio.CancelledError:
            if job.id not in self._cancelling:
                raise  # the server is stopping: the job runs again later
            self._cancelling.discard(job.id)
            await asyncio.to_thread(handler.cancelled, job)
            error = "cancelled"
        except ClusterUnavailable as e:  # waits for the cluster, neither failed nor lost
            log.warning("job %s (%s) waits: %s", job.id, job.kind.value, e)
            await asyncio.to_thread(self.queue.later, job.id, CLUSTER_WAIT_S)
            return str(e)
        except Exception as e:
            log.exception("job %s (%s) failed", job.id, job.kind.value)
            error = f"{type(e).__name__}: {e}"
            await asyncio.to_thread(handler.crashed, job, error)
        failpoints.hit("job.done")
        await asyncio.to_thread(self.queue.complete, job.id, error)
        return error
