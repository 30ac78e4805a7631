"""Observes the backend and drives recorded states toward what actually runs.

States come from observation only: a deployment is DEPLOYED when every replica
of the rollout runs (judged by replica identities, not one status field), FAILED
when Serve says so or a deadline passes, STOPPED when its application is gone.
The loop never dies: an error on one model is recorded on that model and the
loop goes on (after Ray Serve's controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from sqlmodel import col, select

from controlplane import failpoints
from controlplane.config import Settings
from controlplane.domain import names
from controlplane.domain import states as st
from controlplane.domain import types as t
from controlplane.jobs import JOB_APPLY
from controlplane.rollouts import fail_rollout
from controlplane.storage import codec, repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.tables import DeploymentRow, JobRow, ModelRow, OperationRow
from workers.backend import AppObservation, AppStatus, Backend, ReplicaStatus, app_name_for

log = logging.getLogger(__name__)

MISSING_GRACE_S = 2.0
SERVE_REPORTS = "Serve reports the application "

WATCHED = (
    st.ModelState.DEPLOYING.value,
    st.ModelState.DEPLOYED.value,
    st.ModelState.STOPPING.value,
)

_REPLICA_STATE = {
    ReplicaStatus.STARTING: st.ReplicaState.STARTING,
    ReplicaStatus.RUNNING: st.ReplicaState.RUNNING,
    ReplicaStatus.STOPPING: st.ReplicaState.STOPPING,
    ReplicaStatus.FAILED: st.ReplicaState.FAILED,
}


def replicas_json(obs: AppObservation | None) -> str:
    if obs is None:
        return "[]"
    replicas = sorted(obs.replicas, key=lambda r: r.id)
    return json.dumps(
        [
            codec.replica_to_dict(
                t.Replica(
                    id=r.id,
                    state=_REPLICA_STATE[r.state],
                    pid=r.pid,
                    node=r.node,
                    start_time=r.start_time,
                )
            )
            for r in replicas
        ],
        sort_keys=True,
    )


class Reconciler:
    def __init__(self, db: Database, backend: Backend, settings: Settings, http_base: str) -> None:
        self.db = db
        self.backend = backend
        self.settings = settings
        self.http_base = http_base
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # model -> when its application was first seen missing while it should serve.
        self._missing_since: dict[str, float] = {}
        self._unreachable = ""  # why the backend could not be observed, while it cannot

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
            except Exception as e:  # the loop never dies (the cluster may be unreachable)
                why = f"{type(e).__name__}: {e}"
                if why != self._unreachable:  # once per outage, not every tick
                    log.exception("reconciler: observing the backend failed; retrying")
                self._unreachable = why
            else:
                if self._unreachable:
                    log.warning("reconciler: the backend answers again (%s)", self._unreachable)
                self._unreachable = ""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.reconcile_interval_s)

    async def tick(self) -> None:
        observed = await self.backend.observe()
        for model_name in await asyncio.to_thread(self._watched_models):
            n = names.parse_model(model_name)
            obs = observed.get(app_name_for(n.project, n.model))
            try:
                await asyncio.to_thread(self.reconcile, model_name, obs)
            except Exception as e:
                log.exception("reconciler: model %s", model_name)
                await asyncio.to_thread(self._record_error, model_name, f"{type(e).__name__}: {e}")

    def _watched_models(self) -> list[str]:
        with self.db.read() as s:
            return list(s.exec(select(ModelRow.name).where(col(ModelRow.state).in_(WATCHED))))

    def _record_error(self, model_name: str, message: str) -> None:
        with self.db.write() as tx:
            model = tx.session.exec(select(ModelRow).where(ModelRow.name == model_name)).first()
            if model is not None and model.message != f"reconcile error: {message}":
                Changes(tx, self.http_base).model(model, message=f"reconcile error: {message}")

    # ---- one model -------------------------------------------------------------------------

    def reconcile(self, model_name: str, obs: AppObservation | None) -> None:
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            model = c.s.exec(select(ModelRow).where(ModelRow.name == model_name)).first()
            if model is None:
                return
            dep = repo.maybe_deployment_row(c.s, model.active_deployment)
            if dep is None or not dep.applied:
                return  # its job has not applied it yet
            state = st.ModelState(model.state)
            if state in (st.ModelState.DEPLOYING, st.ModelState.STOPPING):
                failpoints.hit("reconcile.writing")
            if state in (st.ModelState.DEPLOYING, st.ModelState.DEPLOYED):
                if obs is None:
                    self._missing(c, model, dep)
                else:
                    self._missing_since.pop(model.name, None)
            if state is st.ModelState.DEPLOYING:
                self._deploying(c, model, dep, obs)
            elif state is st.ModelState.DEPLOYED and obs is not None:
                self._observe_replicas(c, dep, obs, notice_replaced=not model.running_operation)
                self._health(c, dep, obs)
            elif state is st.ModelState.STOPPING:
                self._stopping_model(c, model, dep, obs)

    def _observe_replicas(
        self,
        c: Changes,
        dep: DeploymentRow,
        obs: AppObservation | None,
        notice_replaced: bool = False,
    ) -> None:
        observed = replicas_json(obs)
        if observed == dep.observed_replicas:
            return
        fields: dict[str, Any] = {"observed_replicas": observed}
        if notice_replaced:  # no change of ours in flight: Serve replaced a replica that died
            why = replaced_replicas(dep.observed_replicas, observed)
            if why:
                fields["message"] = why
        c.deployment(dep, **fields)

    @staticmethod
    def _health(c: Changes, dep: DeploymentRow, obs: AppObservation) -> None:
        """A DEPLOYED model whose application Serve reports unhealthy stays DEPLOYED (its
        running replicas still answer, and Serve replaces failing ones), but says so."""
        if obs.status in (AppStatus.UNHEALTHY, AppStatus.DEPLOY_FAILED):
            why = f"{SERVE_REPORTS}{obs.status.value}" + (f": {obs.message}" if obs.message else "")
            if dep.message != why:
                c.deployment(dep, message=why)
        elif obs.status is AppStatus.RUNNING and dep.message.startswith(SERVE_REPORTS):
            c.deployment(dep, message=f"{SERVE_REPORTS}RUNNING again")

    def _missing(self, c: Changes, model: ModelRow, dep: DeploymentRow) -> None:
        """The application of a model that should serve is gone from Serve (deleted behind
        our back, or the cluster restarted): after a short grace (an app can vanish from
        the details for a moment while it rolls), apply the desired state again, once
        (not while an apply is queued)."""
        loop_time = time.monotonic()
        since = self._missing_since.setdefault(model.name, loop_time)
        if loop_time - since < MISSING_GRACE_S:
            return
        self._missing_since.pop(model.name, None)
        pending = c.s.exec(
            select(JobRow).where(JobRow.kind == JOB_APPLY, JobRow.state == "pending")
        ).first()
        if pending is None:
            c.enqueue(JOB_APPLY, "", "", "")
        c.deployment(
            dep,
            message="the application was missing from Serve (deleted, or the cluster "
            "restarted); re-applied",
            observed_replicas="[]",
        )

    def _deploying(
        self, c: Changes, model: ModelRow, dep: DeploymentRow, obs: AppObservation | None
    ) -> None:
        self._observe_replicas(c, dep, obs)
        if obs is not None and obs.status is AppStatus.DEPLOY_FAILED:
            self._fail(
                c,
                model,
                dep,
                obs.message or "Serve reported DEPLOY_FAILED",
                "FAILED_PRECONDITION",
                "DEPLOY_FAILED",
            )
            return
        running = [r for r in obs.replicas if r.state is ReplicaStatus.RUNNING] if obs else []
        previous = set(json.loads(dep.previous_replica_ids)) if dep.expect_roll else set()
        fresh = [r for r in running if r.id not in previous]
        if (
            obs is not None
            and obs.status is AppStatus.RUNNING
            and len(obs.replicas) == dep.replicas
            and len(fresh) == dep.replicas
        ):
            self._deployed(c, model, dep)
            return
        op = self._operation(c, model)
        if op is not None:
            c.operation_progress(op, f"{len(fresh)}/{dep.replicas} replicas running")
        started = dep.apply_time
        if started is None:
            return
        elapsed = (now() - codec.utc(started)).total_seconds()
        unplaceable = obs.unplaceable if obs is not None else ""
        if unplaceable and elapsed > self.settings.placement_timeout_s:
            self._fail(
                c,
                model,
                dep,
                f"{len(fresh)}/{dep.replicas} replicas running after "
                f"{self.settings.placement_timeout_s:g}s: {unplaceable}",
                "DEADLINE_EXCEEDED",
                "PLACEMENT_TIMEOUT",
            )
        elif elapsed > self.settings.deploy_timeout_s:
            detail = f": {obs.message}" if obs is not None and obs.message else ""
            self._fail(
                c,
                model,
                dep,
                f"{len(fresh)}/{dep.replicas} replicas running after "
                f"{self.settings.deploy_timeout_s:g}s (replicas could not be placed or never "
                f"became healthy){detail}",
                "DEADLINE_EXCEEDED",
                "STARTUP_TIMEOUT",
            )

    @staticmethod
    def _operation(c: Changes, model: ModelRow) -> OperationRow | None:
        if not model.running_operation:
            return None
        return repo.operation_row(c.s, model.running_operation)

    def _others(self, c: Changes, model: ModelRow, dep: DeploymentRow) -> list[DeploymentRow]:
        live = (
            st.DeploymentState.DEPLOYED.value,
            st.DeploymentState.STOPPED.value,
            st.DeploymentState.FAILED.value,
            st.DeploymentState.DEPLOYING.value,
        )
        return list(
            c.s.exec(
                select(DeploymentRow).where(
                    DeploymentRow.model == model.name,
                    DeploymentRow.id != dep.id,
                    col(DeploymentRow.state).in_(live),
                )
            ).all()
        )

    def _deployed(self, c: Changes, model: ModelRow, dep: DeploymentRow) -> None:
        c.deployment(dep, st.DeploymentState.DEPLOYED, message="")
        for other in self._others(c, model, dep):
            state = st.DeploymentState(other.state)
            if state is st.DeploymentState.DEPLOYING:  # never finished; superseded
                c.deployment(other, st.DeploymentState.FAILED, message=f"superseded by {dep.name}")
            c.deployment(
                other,
                st.DeploymentState.REPLACED,
                message=f"replaced by {dep.name}",
                observed_replicas="[]",
            )
        c.model(model, st.ModelState.DEPLOYED, message="")
        op = self._operation(c, model)
        if op is not None:
            c.operation_done(op, model, "deployed")

    def _fail(
        self, c: Changes, model: ModelRow, dep: DeploymentRow, message: str, code: str, reason: str
    ) -> None:
        fail_rollout(c, model, dep, self._operation(c, model), message, code, reason)

    def _stopping_model(
        self, c: Changes, model: ModelRow, dep: DeploymentRow, obs: AppObservation | None
    ) -> None:
        if obs is not None:
            self._observe_replicas(c, dep, obs)
            return
        if dep.state == st.DeploymentState.STOPPING.value:
            c.deployment(dep, st.DeploymentState.STOPPED, observed_replicas="[]")
        c.model(model, st.ModelState.STOPPED)
        op = self._operation(c, model)
        if op is not None:
            c.operation_done(op, model, "stopped")


def replaced_replicas(before_json: str, after_json: str) -> str:
    """Which replicas that had started went away and which came instead, in words ("" if
    none went). One still starting when it went (of a rollout that failed and went back to
    the replicas before it) did not stop unexpectedly."""
    before = {r["id"]: r for r in json.loads(before_json)}
    after = {r["id"]: r for r in json.loads(after_json)}
    gone = [
        before[i]
        for i in sorted(before.keys() - after.keys())
        if before[i].get("state") != st.ReplicaState.STARTING.value
    ]
    if not gone:
        return ""
    new = [after[i] for i in sorted(after.keys() - before.keys())]
    went = ", ".join(_replica_words(r) for r in gone)
    came = ", ".join(_replica_words(r) for r in new) or "none yet"
    return f"replica {went} stopped unexpectedly; Serve replaced it with {came}"


def _replica_words(r: dict[str, Any]) -> str:
    return f"{r['id']} (pid {r['pid']})" if r.get("pid") else f"{r['id']} (starting)"
