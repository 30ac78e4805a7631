"""Claims jobs from the database and runs them against the backend.

A job is an *action* (build an image, apply the desired Serve config). Whether
an action's result is reached is decided by the reconciler from observation,
so a job never sleeps waiting for replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlmodel import Session, col, or_, select

from controlplane import desired, failpoints, logs, rollouts, tracing
from controlplane.config import Settings
from controlplane.domain import states as st
from controlplane.domain import types as t
from controlplane.jobs import JOB_APPLY, JOB_BUILD
from controlplane.service import start_deploying
from controlplane.storage import codec, repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.tables import JobRow, OperationRow
from workers.backend import AppSpec, Backend, BuildOutcome, BuildSpec
from workers.builder import cached_build

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serializes applies of the Serve config.
APPLY_LOCK = 0x6D6F64656C  # "model"
_IN_FLIGHT = (st.DeploymentState.DEPLOYING.value, st.DeploymentState.STOPPING.value)
# An apply the cluster refuses (its connection lost for a moment) is tried again: it
# sends the whole desired set, so a repeat is harmless. Waits between attempts:
APPLY_RETRY_S = (0.25, 0.5, 1.0, 2.0)
APPLY_TIMEOUT_S = 60.0  # an apply that hangs (a cluster that stopped answering) fails
# An apply that failed for good leaves the desired set (a revoked key, a last good
# deployment to go back to) not applied: a whole-set apply is queued to try again after a
# pause that doubles with each failure in a row, from the first to the last.
RESYNC_AFTER_S = (5.0, 60.0)
# The control plane's own build deadline is the builder's plus this much (at most twice
# the builder's): it also covers a build task that never starts (the cluster has no free
# CPU for it) or that never ends.
BUILD_DEADLINE_MARGIN_S = 10.0


@dataclass(frozen=True)
class Claimed:
    """A job this server claimed: what it runs, and what its logs and trace name."""

    id: int
    kind: str
    model: str
    operation: str
    trace_parent: str


class Dispatcher:
    def __init__(
        self,
        db: Database,
        backend: Backend,
        settings: Settings,
        http_base: str,
        source_path: SourcePath,
    ) -> None:
        self.db = db
        self.backend = backend
        self.settings = settings
        self.http_base = http_base
        self.source_path = source_path
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._apply_lock = asyncio.Lock()
        self._stopping = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._by_job: dict[int, asyncio.Task[None]] = {}
        self._cancelling: set[int] = set()
        self._failed_applies = 0  # in a row: how long the next retry waits

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._recover)
        self.db.on_commit(lambda _rev: self.wake())
        self._task = asyncio.create_task(self._run(), name="dispatcher")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="job-leases")

    async def stop(self) -> None:
        self._stopping = True
        self.wake()
        if self._task:
            await self._task
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        if self._running:
            # Jobs are in the database: unfinished ones run again, here or on another server.
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        # Hand this server's unfinished jobs back now rather than at lease expiry: another
        # server (or this one, started again) takes them over at once.
        await asyncio.to_thread(self._recover)

    def wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def _recover(self) -> None:
        """Jobs an earlier run of this server (same ``server_id``) held go back to the queue
        at once; those of other servers only when their lease runs out (``_requeue_expired``).
        """
        with self.db.write() as tx:
            mine = select(JobRow).where(
                JobRow.state == "running", JobRow.claimed_by == self.settings.server_id
            )
            for job in tx.session.exec(mine).all():
                self._requeue(tx.session, job)

    @staticmethod
    def _requeue(s: Session, job: JobRow) -> None:
        log.warning("job %s (%s) of %s goes back to the queue", job.id, job.kind, job.claimed_by)
        job.state = "pending"
        job.claimed_by = ""
        job.lease_until = None
        job.update_time = now()
        s.add(job)

    @property
    def _lease(self) -> timedelta:
        return timedelta(seconds=self.settings.job_lease_s)

    async def _heartbeat(self) -> None:
        """Renews the leases of the jobs this server runs, so no other server takes them."""
        while not self._stopping:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                await asyncio.to_thread(self._renew_leases)
            except Exception:  # the loop never dies; a missed renewal is retried
                log.exception("dispatcher: renewing job leases failed")

    def _renew_leases(self) -> None:
        with self.db.write() as tx:
            mine = select(JobRow).where(
                JobRow.state == "running", JobRow.claimed_by == self.settings.server_id
            )
            for job in tx.session.exec(mine).all():
                job.lease_until = now() + self._lease
                tx.session.add(job)

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                free = self.settings.dispatcher_concurrency - len(self._running)
                jobs = await asyncio.to_thread(self._claim, free) if free > 0 else []
                if jobs:
                    failpoints.hit("job.claimed")
                for job in jobs:
                    task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
                    self._running.add(task)
                    self._by_job[job.id] = task
                    task.add_done_callback(self._finished)
                if self._by_job:
                    await self._cancel_requested()
            except Exception:  # the loop never dies
                log.exception("dispatcher: claiming jobs failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        for job_id in [j for j, t_ in self._by_job.items() if t_ is task]:
            del self._by_job[job_id]
        self.wake()

    async def _cancel_requested(self) -> None:
        """Stops the jobs whose operation a client cancelled (through any server)."""
        running = list(self._by_job)
        for job_id in await asyncio.to_thread(self._to_cancel, running):
            task = self._by_job.get(job_id)
            if task is not None and job_id not in self._cancelling:
                log.info("job %s: its operation was cancelled; stopping it", job_id)
                self._cancelling.add(job_id)
                task.cancel()

    def _to_cancel(self, job_ids: list[int]) -> list[int]:
        with self.db.read() as s:
            rows = s.exec(
                select(JobRow.id)
                .join(OperationRow, col(OperationRow.name) == col(JobRow.operation))
                .where(
                    col(JobRow.id).in_(job_ids),
                    JobRow.kind == JOB_BUILD,
                    col(OperationRow.cancel_requested).is_(True),
                )
            ).all()
            return [int(r) for r in rows if r is not None]

    def _requeue_expired(self, s: Session) -> None:
        """Jobs whose server stopped renewing their lease (it died) are taken over."""
        query = select(JobRow).where(JobRow.state == "running", col(JobRow.lease_until) < now())
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        for job in s.exec(query).all():
            self._requeue(s, job)

    def _claim(self, limit: int) -> list[Claimed]:
        with self.db.write() as tx:
            self._requeue_expired(tx.session)
            query = (
                select(JobRow)
                .where(
                    JobRow.state == "pending",
                    or_(col(JobRow.not_before).is_(None), col(JobRow.not_before) <= now()),
                )
                .order_by(col(JobRow.id))
                .limit(limit)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            out = []
            for job in tx.session.exec(query).all():
                job.state = "running"
                job.attempts += 1
                job.claimed_by = self.settings.server_id
                job.lease_until = now() + self._lease
                job.update_time = now()
                tx.session.add(job)
                assert job.id is not None
                out.append(Claimed(job.id, job.kind, job.model, job.operation, job.trace_parent))
            return out

    async def _execute(self, job: Claimed) -> None:
        # Its log lines name the model and operation; its span continues the RPC's trace.
        with (
            logs.about(model=job.model, operation=job.operation),
            tracing.span(
                f"job {job.kind}", job.trace_parent, job_id=job.id, model=job.model
            ) as span,
        ):
            log.info("job %s (%s) started", job.id, job.kind)
            start = time.monotonic()
            error = await self._run_job(job.id, job.kind)
            took = time.monotonic() - start
            if error:
                span.set_status(tracing.error_status(error))
                log.warning("job %s (%s) ended in %.2f s: %s", job.id, job.kind, took, error)
            else:
                log.info("job %s (%s) done in %.2f s", job.id, job.kind, took)

    async def _run_job(self, job_id: int, kind: str) -> str:
        error = ""
        try:
            if kind == JOB_BUILD:
                await self._build(job_id)
            elif kind == JOB_APPLY:
                await self._apply(job_id)
            else:
                error = f"unknown job kind {kind!r}"
        except asyncio.CancelledError:
            if job_id not in self._cancelling:
                raise  # the server is stopping: the job runs again later
            self._cancelling.discard(job_id)
            await asyncio.to_thread(self._finish_cancelled, job_id)
            error = "cancelled"
        except Exception as e:
            log.exception("job %s (%s) failed", job_id, kind)
            error = f"{type(e).__name__}: {e}"
            await asyncio.to_thread(self._fail_job_operation, job_id, error)
            if kind == JOB_APPLY:
                await asyncio.to_thread(self._resync_later)
        failpoints.hit("job.done")
        await asyncio.to_thread(self._complete, job_id, error)
        return error

    def _complete(self, job_id: int, error: str) -> None:
        with self.db.write() as tx:
            job = tx.session.get(JobRow, job_id)
            # Fencing: a job whose lease another server took over is that server's now.
            if job is not None and job.claimed_by == self.settings.server_id:
                job.state = "done"
                job.error = error
                job.update_time = now()
                tx.session.add(job)

    def _resync_later(self) -> None:
        """After an apply that failed for good, the whole desired set is applied again
        later (or sooner, by an apply queued already: it sends the whole set too)."""
        self._failed_applies += 1
        first, most = RESYNC_AFTER_S
        delay = min(most, first * 2 ** (self._failed_applies - 1))
        log.warning("the desired Serve config is applied again within %.0f s", delay)
        with self.db.write() as tx:
            Changes(tx, self.http_base).resync(delay)

    def _finish_cancelled(self, job_id: int) -> None:
        job = self._job(job_id)
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            op = repo.operation_row(c.s, job.operation)
            if op.done:
                return
            model = repo.model_row(c.s, job.model)
            build = repo.build_row(c.s, job.target)
            rollouts.end_build_without_result(
                c, model, op, build, f"cancelled while building ({op.name})"
            )

    def _job(self, job_id: int) -> JobRow:
        with self.db.read() as s:
            job = s.get(JobRow, job_id)
            assert job is not None
            return job

    def _fail_job_operation(self, job_id: int, error: str) -> None:
        """A job that crashed fails what it was doing, with the reason: never left hanging."""
        job = self._job(job_id)
        if job.kind == JOB_BUILD:
            self._finish_build(job, BuildOutcome(ok=False, error=f"build crashed: {error}"))
            return
        if not job.operation:
            return
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            op = repo.operation_row(c.s, job.operation)
            model = repo.model_row(c.s, job.model)
            message = f"applying the change failed: {error}"
            dep = repo.maybe_deployment_row(c.s, model.active_deployment)
            if (
                not op.done
                and dep is not None
                and dep.state == st.DeploymentState.DEPLOYING.value
                and model.state == st.ModelState.DEPLOYING.value
            ):  # a rollout that never reached Serve: back to what served before it
                rollouts.fail_rollout(c, model, dep, op, message, "UNAVAILABLE", "APPLY_FAILED")
                return
            if dep is not None and not dep.applied and dep.state in _IN_FLIGHT:
                c.deployment(dep, st.DeploymentState.FAILED, message=message)
            if model.state in _IN_FLIGHT:
                c.model(model, st.ModelState.FAILED, message=message)
            c.operation_done(
                op, model, "failed", t.OperationError("INTERNAL", message, "JOB_FAILED")
            )

    # ---- build -----------------------------------------------------------------------------

    async def _build(self, job_id: int) -> None:
        job = self._job(job_id)
        spec = await asyncio.to_thread(self._start_build, job)
        if spec is None:
            return
        failpoints.hit("build.started")
        limit = spec.timeout_s + min(BUILD_DEADLINE_MARGIN_S, spec.timeout_s)
        try:
            cached = await self._cached(spec)
            outcome = (
                cached
                if cached is not None
                else await asyncio.wait_for(self._backend_build(spec), limit)
            )
        except TimeoutError:  # the build task was stopped (as a cancelled one is)
            outcome = BuildOutcome(
                ok=False,
                error=f"build timed out after {spec.timeout_s:g} s (its task did not finish; "
                "it may have waited for a free CPU on the cluster)",
            )
        failpoints.hit("build.finished")
        await asyncio.to_thread(self._finish_build, job, outcome)
        failpoints.hit("build.recorded")

    async def _backend_build(self, spec: BuildSpec) -> BuildOutcome:
        with tracing.span("backend build", build=spec.build_name) as span:
            outcome = await self.backend.build(spec)
            span.set_attribute("ok", outcome.ok)
            return outcome

    async def _cached(self, spec: BuildSpec) -> BuildOutcome | None:
        """An earlier build's result for the same inputs on the cluster's runtime: an
        unchanged rebuild never goes to the cluster (a file read, not a task)."""
        if spec.no_cache:
            return None
        rt = await self.backend.runtime()
        return await asyncio.to_thread(cached_build, spec, rt)

    def _start_build(self, job: JobRow) -> BuildSpec | None:
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            build = repo.build_row(c.s, job.target)
            if build.state in (st.BuildState.BUILT.value, st.BuildState.FAILED.value):
                return None  # finished before a restart of the server
            op = repo.operation_row(c.s, job.operation)
            if op.cancel_requested:  # cancelled while its server was gone: never run again
                model = repo.model_row(c.s, job.model)
                why = f"cancelled while building ({op.name})"
                rollouts.end_build_without_result(c, model, op, build, why)
                return None
            c.build(build, st.BuildState.BUILDING)
            c.operation_progress(op, "building")
            log_path = Path(build.log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            return BuildSpec(
                build_name=build.name,
                source_zip=self.source_path(build.source_sha256),
                file_path=build.file_path,
                function_name=build.function_name,
                artifacts_dir=self.settings.artifacts_dir,
                log_path=log_path,
                timeout_s=self.settings.build_timeout_s,
                source_sha256=build.source_sha256,
                max_size_bytes=self.settings.build_max_bytes,
                no_cache=build.no_cache,
            )

    def _finish_build(self, job: JobRow, outcome: BuildOutcome) -> None:
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            build = repo.build_row(c.s, job.target)
            if build.state in (st.BuildState.BUILT.value, st.BuildState.FAILED.value):
                return
            op = repo.operation_row(c.s, job.operation)
            model = repo.model_row(c.s, job.model)
            dep = repo.maybe_deployment_row(c.s, op.deployment)
            if outcome.ok:
                c.build(
                    build,
                    st.BuildState.BUILT,
                    image=outcome.image,
                    artifact_path=outcome.artifact_path,
                    finish_time=now(),
                    runtime=outcome.runtime,
                    packages=codec.packages_to_json(
                        t.Package(p.name, p.version, p.sha256, p.requested)
                        for p in outcome.packages
                    ),
                    cache_hit=outcome.cache_hit,
                    size_bytes=outcome.size_bytes,
                )
                if op.cancel_requested:  # cancelled as it finished: built, but not deployed
                    rollouts.end_build_without_result(
                        c, model, op, build, f"cancelled before deploying ({op.name})"
                    )
                    return
                if dep is None:
                    c.operation_done(op, model, "built")
                    return
                start_deploying(c, model, dep)
                c.operation_progress(op, "deploying")
                c.enqueue(JOB_APPLY, model.name, op.name, dep.name)
                return
            c.build(build, st.BuildState.FAILED, error=outcome.error, finish_time=now())
            message = f"build {build.version} failed: {outcome.error}"
            if dep is not None:
                c.deployment(dep, st.DeploymentState.FAILED, message=message)
            if model.state == st.ModelState.PENDING.value:
                c.model(model, st.ModelState.FAILED, message=message)
            c.operation_done(
                op,
                model,
                "build failed",
                t.OperationError("FAILED_PRECONDITION", message, "BUILD_FAILED"),
            )

    # ---- apply -----------------------------------------------------------------------------

    async def _apply(self, job_id: int) -> None:
        job = self._job(job_id)
        # One apply at a time in this process, then across servers (PostgreSQL): each
        # applies the whole desired set, so an older set must never land after a newer one.
        async with self._apply_lock:
            release = await self._take_apply_lock()
            try:
                for attempt, pause in enumerate((*APPLY_RETRY_S, None)):
                    specs = await asyncio.to_thread(self._desired_apps)
                    failpoints.hit("apply.prepared")
                    try:
                        with tracing.span("backend apply", apps=len(specs), attempt=attempt + 1):
                            await asyncio.wait_for(self.backend.apply(specs), APPLY_TIMEOUT_S)
                        break
                    except Exception as e:
                        if pause is None or self._stopping:
                            raise
                        log.warning("job %s: apply attempt %d failed (%s)", job_id, attempt + 1, e)
                        await asyncio.sleep(pause)
                failpoints.hit("apply.applied")
                self._failed_applies = 0
                await asyncio.to_thread(self._mark_applied, job)
                failpoints.hit("apply.marked")
            finally:
                await asyncio.to_thread(release)

    async def _take_apply_lock(self) -> Callable[[], None]:
        """Waits for the cross-server apply lock without parking a thread on it."""
        while True:
            attempt = asyncio.ensure_future(asyncio.to_thread(self.db.try_lock, APPLY_LOCK))
            try:
                release = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                attempt.add_done_callback(_release_if_taken)
                raise
            if release is not None:
                return release
            await asyncio.sleep(0.05)

    def _desired_apps(self) -> list[AppSpec]:
        """The whole desired set, read fresh under the apply lock (what a rollout replaces
        was recorded when it started: ``service.start_deploying``)."""
        with self.db.read() as s:
            return desired.desired_apps(s, open_endpoints=self.settings.insecure_no_auth)

    def _mark_applied(self, job: JobRow) -> None:
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            if not job.model:
                return  # a full sync (at start, or after a failure) has no rollout to mark
            dep = repo.maybe_deployment_row(c.s, job.target)
            if dep is None:  # a stop targets the model: its active deployment stops
                model = repo.model_row(c.s, job.model)
                dep = repo.maybe_deployment_row(c.s, model.active_deployment)
            if (
                dep is not None
                and not dep.applied
                and dep.state
                in (st.DeploymentState.DEPLOYING.value, st.DeploymentState.STOPPING.value)
            ):
                c.deployment(dep, applied=True, apply_time=now())


def _release_if_taken(attempt: asyncio.Future[Callable[[], None] | None]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        release = attempt.result()
        if release is not None:
            release()


class SourcePath:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, sha256: str) -> Path:
        return self.root / f"{sha256}.zip"
