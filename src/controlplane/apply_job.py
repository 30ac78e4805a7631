"""The apply handler: puts the whole desired Serve config on the cluster.

Each apply reads the desired set fresh and sends all of it (``desired.desired_apps``),
so a repeat is harmless and an older set must never land after a newer one: applies
run one at a time in this process, then across servers (a PostgreSQL advisory lock).
Whether the rollout it carries then finishes is the reconciler's to judge.

Since an apply carries every change committed before it read the desired set, the
applies waiting for the lock behind it need not go to the cluster again: a job that was
claimed before a successful apply began reading is landed by it (100 concurrent changes
make a handful of applies, not 100 whole configs one after another). Before reading, an
apply waits while the cluster still builds applications it would hand over again (Serve
would start those builds over): the changes committed meanwhile go with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from controlplane import desired, failpoints, lifecycle, tracing
from controlplane.config import Settings
from controlplane.files import Files
from controlplane.storage.changes import Changes
from controlplane.storage.db import Database
from controlplane.storage.jobs import Job
from workers.backend import AppSpec, Backend, ClusterUnavailable

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serializes applies of the Serve config.
APPLY_LOCK = 0x6D6F64656C  # "model"
# An apply the cluster refuses (its connection lost for a moment) is tried again: it
# sends the whole desired set, so a repeat is harmless. Waits between attempts:
APPLY_RETRY_S = (0.25, 0.5, 1.0, 2.0)
APPLY_TIMEOUT_S = 60.0  # an apply that hangs (a cluster that stopped answering) fails
# An apply that failed for good leaves the desired set (a revoked key, a last good
# deployment to go back to) not applied: a whole-set apply is queued to try again after a
# pause that doubles with each failure in a row, from the first to the last.
RESYNC_AFTER_S = (5.0, 60.0)


class ApplyJobs:
    def __init__(
        self, db: Database, backend: Backend, settings: Settings, http_base: str, files: Files
    ) -> None:
        self.db = db
        self.backend = backend
        self.settings = settings
        self.http_base = http_base
        self.files = files
        self.stopping = False  # set by the dispatcher: no more retries
        self._lock = asyncio.Lock()
        self._failed_in_a_row = 0  # how long the next whole-set retry waits
        # When the last apply that reached the cluster began reading the desired set.
        self._landed_read_from = -1.0
        self.coalesced = 0  # jobs landed by an apply made for another (tests, benchmarks)

    async def run(self, job: Job) -> None:
        came = time.monotonic()  # the job committed before it was claimed, so before this
        async with self._lock:
            if self._landed_read_from > came:  # an apply that read after it has landed
                self.coalesced += 1
                await asyncio.to_thread(self._landed, job)
                return
            release = await self._take_cluster_lock()
            try:
                await self._until_built()
                read_from = time.monotonic()
                await self._apply_with_retries(job)
                self._landed_read_from = read_from
                failpoints.hit("apply.applied")
                self._failed_in_a_row = 0
                await asyncio.to_thread(self._landed, job)
                failpoints.hit("apply.marked")
            finally:
                await asyncio.to_thread(release)

    def crashed(self, job: Job, error: str) -> None:
        """The apply failed for good: its operation fails with the reason, and the whole
        desired set is applied again later (or sooner, by an apply queued already)."""
        with self.db.write() as tx:
            lifecycle.apply_failed(Changes(tx, self.http_base), job, error)
        self._failed_in_a_row += 1
        first, most = RESYNC_AFTER_S
        delay = min(most, first * 2 ** (self._failed_in_a_row - 1))
        log.warning("the desired Serve config is applied again within %.0f s", delay)
        with self.db.write() as tx:
            Changes(tx, self.http_base).resync(delay)

    def cancelled(self, job: Job) -> None:
        """Applies are never cancelled one by one (a rollout is cancelled by its records)."""

    async def _apply_with_retries(self, job: Job) -> None:
        for attempt, pause in enumerate((*APPLY_RETRY_S, None)):
            specs = await asyncio.to_thread(self._desired)
            failpoints.hit("apply.prepared")
            try:
                with tracing.span("backend apply", apps=len(specs), attempt=attempt + 1):
                    await asyncio.wait_for(self.backend.apply(specs), APPLY_TIMEOUT_S)
                return
            except Exception as e:
                if pause is None or self.stopping or isinstance(e, ClusterUnavailable):
                    raise  # the cluster gone: the job waits for it (dispatcher)
                log.warning("job %s: apply attempt %d failed (%s)", job.id, attempt + 1, e)
                await asyncio.sleep(pause)

    async def _until_built(self) -> None:
        """Waits while the cluster builds applications this apply would hand over again
        (that would restart their builds), before the desired set is read: what is
        committed meanwhile goes in this apply. A cluster that cannot say is the
        apply's own to find out."""
        try:
            await asyncio.wait_for(self.backend.until_built(), APPLY_TIMEOUT_S)
        except Exception as e:
            log.debug("not known whether the cluster builds applications (%s)", e)

    async def _take_cluster_lock(self) -> Callable[[], None]:
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

    def _desired(self) -> list[AppSpec]:
        """The whole desired set, read fresh under the apply lock (what a rollout replaces
        was recorded when it started: ``lifecycle._start_rollout``)."""
        with self.db.read() as s:
            specs = desired.desired_apps(
                s, self.db.secrets, open_endpoints=self.settings.insecure_no_auth
            )
        return [self._here(a) for a in specs]

    def _here(self, a: AppSpec) -> AppSpec:
        """The application with its artifact on this server's disk, by digest: where the
        build recorded it, or fetched from the database when another server built it."""
        folder = self.files.artifact(a.artifact_path)
        if folder is None:  # collected: its replicas cannot load it, and say so
            log.error("%s: the artifact of %s is on no disk any more", a.app_name, a.build_name)
            folder = self.files.artifact_dir(a.artifact_path)
        return replace(a, artifact_path=str(folder))

    def _landed(self, job: Job) -> None:
        with self.db.write() as tx:
            lifecycle.apply_landed(Changes(tx, self.http_base), job)


def _release_if_taken(attempt: asyncio.Future[Callable[[], None] | None]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        release = attempt.result()
        if release is not None:
            release()
