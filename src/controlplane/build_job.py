"""The build handler: runs one build job on the backend and records how it ended.

Whether a build (and a deploy waiting on it) moves on is decided by ``lifecycle``; this
module only turns the job into a ``BuildSpec``, asks the build cache first (an unchanged
rebuild never goes to the cluster), runs it under a deadline and hands the outcome back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from controlplane import failpoints, lifecycle, tracing
from controlplane.config import Settings
from controlplane.domain.errors import is_disk_full
from controlplane.files import Files, LiveLog
from controlplane.sources import SourceStore
from controlplane.storage.changes import Changes
from controlplane.storage.db import Database
from controlplane.storage.jobs import Job
from workers.backend import Backend, BuildOutcome, BuildSpec
from workers.builder import cached_build

log = logging.getLogger(__name__)

# The control plane's own build deadline is the builder's plus this much (at most twice
# the builder's): it also covers a build task that never starts (the cluster has no free
# CPU for it) or that never ends.
BUILD_DEADLINE_MARGIN_S = 10.0
LIVE_LOG_S = 0.5  # how often a running build's log goes to other servers' readers


class BuildJobs:
    def __init__(
        self,
        db: Database,
        backend: Backend,
        settings: Settings,
        http_base: str,
        sources: SourceStore,
        files: Files,
    ) -> None:
        self.db = db
        self.backend = backend
        self.settings = settings
        self.http_base = http_base
        self.sources = sources
        self.files = files

    async def run(self, job: Job) -> None:
        spec = await asyncio.to_thread(self._start, job)
        if spec is None:
            return
        failpoints.hit("build.started")
        limit = spec.timeout_s + min(BUILD_DEADLINE_MARGIN_S, spec.timeout_s)
        try:
            await asyncio.to_thread(self.sources.path, spec.source_sha256)  # another server's
            cached = await self._cached(spec)
            async with self._log_shared(spec):
                outcome = (
                    cached
                    if cached is not None
                    else await asyncio.wait_for(self._build(spec), limit)
                )
        except TimeoutError:  # the build task was stopped (as a cancelled one is)
            outcome = BuildOutcome(
                ok=False,
                error=f"build timed out after {spec.timeout_s:g} s (its task did not finish; "
                "it may have waited for a free CPU on the cluster)",
            )
        failpoints.hit("build.finished")
        outcome = await asyncio.to_thread(self._publish, spec, outcome)
        await asyncio.to_thread(self._finish, job, outcome)
        failpoints.hit("build.recorded")

    def _publish(self, spec: BuildSpec, outcome: BuildOutcome) -> BuildOutcome:
        """The artifact and log where every server finds them, before the build is recorded
        (with ``--artifact-store database``): a build that could not be put there failed."""
        try:
            self.files.publish_build(spec.build_name, outcome, spec.log_path)
        except Exception as e:
            log.exception("%s: storing the build for the other servers failed", spec.build_name)
            return BuildOutcome(
                ok=False,
                error=f"the build could not be stored in the database for the other servers: {e}",
                runtime=outcome.runtime,
                disk_full=is_disk_full(e),
            )
        return outcome

    @contextlib.asynccontextmanager
    async def _log_shared(self, spec: BuildSpec) -> AsyncIterator[None]:
        """While the build runs, its log goes to the other servers' readers every
        ``LIVE_LOG_S`` (``files.LiveLog``; nothing without a shared store). Best effort:
        the whole log is stored when the build ends whatever happens here."""
        live = await asyncio.to_thread(self.files.live_log, spec.build_name, spec.log_path)
        if live is None:
            yield
            return

        async def pump(live: LiveLog) -> None:
            while True:
                await asyncio.sleep(LIVE_LOG_S)
                try:
                    await asyncio.to_thread(live.flush)
                except Exception as e:  # the database is away: readers wait for the end
                    log.warning("%s: sharing the running log failed: %s", spec.build_name, e)

        task = asyncio.create_task(pump(live))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def crashed(self, job: Job, error: str) -> None:
        """The job raised: the build failed with the reason, never left hanging."""
        self._finish(job, BuildOutcome(ok=False, error=f"build crashed: {error}"))

    def cancelled(self, job: Job) -> None:
        with self.db.write() as tx:
            lifecycle.build_cancelled(Changes(tx, self.http_base), job)

    async def _build(self, spec: BuildSpec) -> BuildOutcome:
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

    def _start(self, job: Job) -> BuildSpec | None:
        with self.db.write() as tx:
            build = lifecycle.build_started(Changes(tx, self.http_base), job)
            if build is None:
                return None
            log_path = Path(build.log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            return BuildSpec(
                build_name=build.name,
                source_zip=self.sources.local(build.source_sha256),
                file_path=build.file_path,
                function_name=build.function_name,
                artifacts_dir=self.settings.artifacts_dir,
                log_path=log_path,
                timeout_s=self.settings.build_timeout_s,
                source_sha256=build.source_sha256,
                max_size_bytes=self.settings.build_max_bytes,
                no_cache=build.no_cache,
            )

    def _finish(self, job: Job, outcome: BuildOutcome) -> None:
        with self.db.write() as tx:
            lifecycle.build_finished(Changes(tx, self.http_base), job, outcome)
