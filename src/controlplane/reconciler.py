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
from collections.abc import Mapping
from typing import Any

from sqlmodel import col, select

from controlplane import failpoints, logs
from controlplane.config import Settings
from controlplane.domain import names
from controlplane.domain import states as st
from controlplane.domain import types as t
from controlplane.rollouts import fail_rollout
from controlplane.storage import codec, repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.tables import DeploymentRow, ModelRow, OperationRow
from workers.backend import AppObservation, AppStatus, Backend, ReplicaStatus, app_name_for

log = logging.getLogger(__name__)

MISSING_GRACE_S = 2.0
OBSERVE_TIMEOUT_S = 30.0
SERVE_REPORTS = "Serve reports the application "

WATCHED = (
    st.ModelState.DEPLOYING.value,
    st.ModelState.DEPLOYED.value,
    st.ModelState.STOPPING.value,
)
CHANGING = (st.ModelState.DEPLOYING.value, st.ModelState.STOPPING.value)

_REPLICA_STATE = {
    ReplicaStatus.STARTING: st.ReplicaState.STARTING,
    ReplicaStatus.RUNNING: st.ReplicaState.RUNNING,
    ReplicaStatus.STOPPING: st.ReplicaState.STOPPING,
    ReplicaStatus.FAILED: st.ReplicaState.FAILED,
}


def replicas_json(obs: AppObservation | None, before_json: str = "[]") -> str:
    """The replicas as recorded. Each also says whether it ever ran (``"ran"``, kept from
    ``before_json``; not part of the API): only one that ran can stop unexpectedly."""
    if obs is None:
        return "[]"
    ran = {r["id"] for r in json.loads(before_json) if r.get("ran")}
    replicas = sorted(obs.replicas, key=lambda r: r.id)
    out = []
    for r in replicas:
        d = codec.replica_to_dict(
            t.Replica(
                id=r.id,
                state=_REPLICA_STATE[r.state],
                pid=r.pid,
                node=r.node,
                start_time=r.start_time,
            )
        )
        if r.id in ran or r.state is ReplicaStatus.RUNNING:
            d["ran"] = True
        out.append(d)
    return json.dumps(out, sort_keys=True)


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
        self._observing: asyncio.Future[Mapping[str, AppObservation]] | None = None
        self._busy = False  # a model is changing: look again soon

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
                    # What failed to apply meanwhile (a revoked key) is not left waiting.
                    await asyncio.to_thread(self._resync)
                self._unreachable = ""
            # Quick looks while a change is under way (how soon a rollout is seen to end
            # is how long a deploy takes), a slow pace when everything is settled.
            interval = (
                self.settings.reconcile_busy_interval_s
                if self._busy
                else self.settings.reconcile_interval_s
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def tick(self) -> None:
        observed = await self._observe()
        watched = await asyncio.to_thread(self._watched_models)
        self._busy = any(state in CHANGING or operation for _, state, operation in watched)
        for model_name, _, operation in watched:
            n = names.parse_model(model_name)
            obs = observed.get(app_name_for(n.project, n.model))
            with logs.about(model=model_name, operation=operation):
                try:
                    await asyncio.to_thread(self.reconcile, model_name, obs)
                except Exception as e:
                    log.exception("reconciler: model %s", model_name)
                    why = f"{type(e).__name__}: {e}"
                    await asyncio.to_thread(self._record_error, model_name, why)

    async def _observe(self) -> Mapping[str, AppObservation]:
        """The backend's view. A look that hangs (a cluster that stopped answering) fails
        this tick after ``OBSERVE_TIMEOUT_S`` and is waited on again by the next ticks,
        never started twice: hung looks never pile up in worker threads."""
        if self._observing is None or self._observing.done():
            self._observing = asyncio.ensure_future(self.backend.observe())
            self._observing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self._observing), OBSERVE_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(
                f"the backend did not answer within {OBSERVE_TIMEOUT_S:g}s"
            ) from None

    def _watched_models(self) -> list[tuple[str, str, str]]:
        """(name, state, running operation) of every model the cluster should reflect."""
        query = select(ModelRow.name, ModelRow.state, ModelRow.running_operation).where(
            col(ModelRow.state).in_(WATCHED)
        )
        with self.db.read() as s:
            return [(name, state, op) for name, state, op in s.exec(query)]

    def _resync(self) -> None:
        with self.db.write() as tx:
            Changes(tx, self.http_base).resync()

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
        if notice_replaced and obs is not None and not obs.replicas:
            # Serve's details leave a deployment out for a moment while it updates it (its
            # replicas serve on): nothing to conclude from that look.
            return
        observed = replicas_json(obs, dep.observed_replicas)
        if observed == dep.observed_replicas:
            return
        fields: dict[str, Any] = {"observed_replicas": observed}
        if notice_replaced:  # no change of ours in flight: Serve replaced a replica that died
            why = replaced_replicas(
                dep.observed_replicas, observed, without_health_note(dep.message)
            )
            if why:
                fields["message"] = why
        c.deployment(dep, **fields)

    @staticmethod
    def _health(c: Changes, dep: DeploymentRow, obs: AppObservation) -> None:
        """A DEPLOYED model whose application Serve reports unhealthy stays DEPLOYED (its
        running replicas still answer, and Serve replaces failing ones), but its deployment
        says so after what it said before (e.g. which replica died); once Serve reports it
        RUNNING again, that note goes."""
        base = without_health_note(dep.message)
        if obs.status in (AppStatus.UNHEALTHY, AppStatus.DEPLOY_FAILED):
            note = f"{SERVE_REPORTS}{obs.status.value}"
            if obs.message:
                note = f"{note}: {obs.message}"
            message = f"{base}; {note}" if base else note
        elif obs.status is AppStatus.RUNNING and SERVE_REPORTS in dep.message:
            message = base or f"{SERVE_REPORTS}RUNNING again"
        else:
            return
        if message != dep.message:
            c.deployment(dep, message=message)

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
        c.resync()
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


REPLACING = "Serve is starting a replacement"


def without_health_note(message: str) -> str:
    """A deployment's message without the note on Serve's status that ``_health`` adds."""
    at = message.find(SERVE_REPORTS)
    return message if at < 0 else message[:at].removesuffix("; ")


_DOWN = (st.ReplicaState.STOPPING.value, st.ReplicaState.FAILED.value)


def replaced_replicas(before_json: str, after_json: str, message: str = "") -> str:
    """The deployment's new message when replicas that ran stopped (gone, or stopping)
    without a change of ours, naming them and the replicas Serve started instead; "" when
    there is nothing new to say. Serve may list the replacement only on a later look: the
    message then says a replacement is starting (``message``, the current one, tells) and
    names it when it appears. A replica that never ran (of a rollout that failed and went
    back to the replicas before it) did not stop unexpectedly."""
    before = {r["id"]: r for r in json.loads(before_json)}
    after = {r["id"]: r for r in json.loads(after_json)}
    lost = [
        r
        for i, r in sorted(before.items())
        if r.get("ran")
        and r["state"] not in _DOWN
        and (i not in after or after[i]["state"] in _DOWN)
    ]
    new = [after[i] for i in sorted(after.keys() - before.keys())]
    came = ", ".join(_replica_words(r) for r in new)
    if lost:
        went = ", ".join(_replica_words(r) for r in lost)
        instead = f"Serve replaced it with {came}" if new else REPLACING
        return f"replica {went} stopped unexpectedly; {instead}"
    if new and message.endswith(REPLACING):
        return f"{message.removesuffix(REPLACING)}Serve replaced it with {came}"
    return ""


def _replica_words(r: dict[str, Any]) -> str:
    return f"{r['id']} (pid {r['pid']})" if r.get("pid") else f"{r['id']} (starting)"
