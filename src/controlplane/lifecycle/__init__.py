"""The lifecycle of a model, in one place: every change of state of a model, a build, a
deployment or an operation is made here, in the order things happen to a model.

1. A client asks (``service``): ``begin_build``, ``begin_deploy``, ``begin_stop``,
   ``begin_restart``, ``cancel``. Each writes the new state, its operation and the job
   that carries it out, in the caller's transaction.
2. A build job runs (``build_job``): ``build_started``, then ``build_finished`` (built:
   a deploy that waited on it starts; failed: it fails with it), or ``build_cancelled``.
3. An apply job puts the desired set on Serve (``apply_job``): ``apply_landed`` (the
   reconciler judges the rollout from then on), or ``apply_failed``.
4. The reconciler looks (``reconciler``): ``rollout_observed`` (progress, deployed, or
   failed), ``serving_observed`` (replicas Serve replaced, its health reports),
   ``stopping_observed`` (stopped once the application is gone), ``app_missing``.
5. The signals say how it serves (``signals``): ``health_observed``.
6. Two builds live (``lifecycle/traffic.py``): a canary's or shadow's start, steps,
   promotion and roll back, a split set by hand, and both applications observed.

A rollout that fails or is cancelled falls back (``fail_rollout``) to what served before:
another deployment still DEPLOYED serves again; a failed restart keeps the replicas from
before it; a first deploy leaves the model FAILED. Every rule of which state may follow
which is checked by the storage layer against ``domain.transitions``; what each verb
needs is ``domain.transitions.VERBS``; the judgement of what Serve reports is
``domain.decisions`` (pure). "What happens when a restart fails?" is answered here:
``fail_rollout``, with ``choose_fallback``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlmodel import col, select

from controlplane import desired
from controlplane.domain import decisions, scaling
from controlplane.domain.decisions import (
    Deployed,
    Failed,
    FallbackKind,
    InProgress,
    Limits,
    Observation,
    Rollout,
    ServingRecord,
)
from controlplane.domain.errors import FailedPrecondition
from controlplane.domain.states import (
    BuildState,
    DeploymentState,
    ModelState,
    OperationKind,
    ReplicaState,
)
from controlplane.domain.traffic import split_from_json
from controlplane.domain.transitions import Verb, check_verb
from controlplane.domain.types import OperationError, Package, Replica
from controlplane.storage import codec, repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.jobs import Job, JobKind
from controlplane.storage.tables import BuildRow, DeploymentRow, ModelRow, OperationRow
from workers.backend import BuildOutcome, rolls

CANCELLED_REASON = "OPERATION_CANCELLED"
FINISHED_BUILD = (BuildState.BUILT.value, BuildState.FAILED.value)
_IN_FLIGHT = (DeploymentState.DEPLOYING.value, DeploymentState.STOPPING.value)


# ---- 1. a client asks ------------------------------------------------------------------------


def new_operation(
    c: Changes,
    model: ModelRow,
    kind: OperationKind,
    target: str,
    deployment: str = "",
    progress: str = "queued",
) -> OperationRow:
    """The operation that carries out a change; the model runs one at a time."""
    ts = now()
    op = OperationRow(
        name=f"operations/{uuid.uuid4()}",
        model=model.name,
        kind=kind.value,
        target=target,
        deployment=deployment,
        progress=progress,
        create_time=ts,
        update_time=ts,
    )
    c.created(op)
    c.model(model, running_operation=op.name)
    return op


def begin_build(
    c: Changes, model: ModelRow, build: BuildRow, deployment: DeploymentRow | None
) -> OperationRow:
    """A build is queued; with a deployment to follow, a model that serves nothing yet
    is PENDING on it (an active one serves on until the new build rolls out)."""
    check_verb(Verb.BUILD, model.name, ModelState(model.state))
    if deployment is not None and not ModelState(model.state).active:
        c.model(model, ModelState.PENDING)
    op = new_operation(
        c,
        model,
        OperationKind.CREATE_BUILD,
        build.name,
        deployment=deployment.name if deployment is not None else "",
    )
    c.enqueue(JobKind.BUILD, model.name, op.name, build.name)
    return op


def begin_deploy(c: Changes, model: ModelRow, dep: DeploymentRow) -> OperationRow:
    """Re-deploy an existing build: the new deployment rolls out at once."""
    check_verb(Verb.DEPLOY, model.name, ModelState(model.state))
    op = new_operation(
        c,
        model,
        OperationKind.CREATE_DEPLOYMENT,
        dep.name,
        deployment=dep.name,
        progress="deploying",
    )
    start_rollout(c, model, dep)
    c.enqueue(JobKind.APPLY, model.name, op.name, dep.name)
    return op


def begin_stop(c: Changes, model: ModelRow) -> OperationRow:
    """Every replica stops: STOPPING now, STOPPED once Serve no longer has the app."""
    check_verb(Verb.STOP, model.name, ModelState(model.state))
    dep = repo.maybe_deployment_row(c.session, model.active_deployment)
    op = new_operation(
        c,
        model,
        OperationKind.STOP_MODEL,
        model.name,
        deployment=model.active_deployment,
        progress="stopping",
    )
    if dep is None:  # its first deploy failed before anything ran: nothing to stop
        c.model(model, ModelState.STOPPED)
        c.operation_done(op, model, "stopped")
        return op
    c.model(model, ModelState.STOPPING)
    if dep.state != DeploymentState.STOPPED.value:
        c.deployment(dep, DeploymentState.STOPPING, applied=False)
    candidate = candidate_of(c, model)  # two builds live: both stop
    if candidate is not None and candidate.state in repo.SERVING_DEPLOYMENTS:
        c.deployment(candidate, DeploymentState.STOPPING, applied=False)
    c.enqueue(JobKind.APPLY, model.name, op.name, model.name)
    return op


def begin_restart(c: Changes, model: ModelRow, dep: DeploymentRow) -> OperationRow:
    """Every replica of the active deployment is replaced (a new restart generation);
    a stopped model starts again with it."""
    check_verb(Verb.RESTART, model.name, ModelState(model.state))
    op = new_operation(
        c,
        model,
        OperationKind.RESTART_MODEL,
        model.name,
        deployment=dep.name,
        progress="restarting",
    )
    c.deployment(dep, restart_generation=dep.restart_generation + 1)
    start_rollout(c, model, dep)
    candidate = candidate_of(c, model)
    if candidate is not None and candidate.state != DeploymentState.FAILED.value:
        # Two builds live: both are re-initialized (the split's own path judges the second).
        previous = [r.id for r in repo.replicas_of(candidate)]
        c.deployment(
            candidate,
            DeploymentState.DEPLOYING,
            restart_generation=candidate.restart_generation + 1,
            applied=False,
            expect_roll=bool(previous),
            previous_replica_ids=json.dumps(previous),
            **_note(""),
        )
    c.enqueue(JobKind.APPLY, model.name, op.name, dep.name)
    return op


def candidate_of(c: Changes, model: ModelRow) -> DeploymentRow | None:
    """The second live deployment of a model whose traffic is split, if any."""
    split = split_from_json(model.traffic)
    return repo.maybe_deployment_row(c.session, split.candidate) if split else None


def start_rollout(c: Changes, model: ModelRow, dep: DeploymentRow) -> None:
    """The deployment and its model go DEPLOYING at once; the job applies it.

    What the rollout must replace is fixed here, from the records, not at apply time:
    any apply (another job's, a repair, another server's) may put the new spec on Serve
    before this rollout's own job runs, and replicas of the new spec must never count
    as the old ones. Replaced: the replicas last observed for the deployment serving
    now, when the change rolls (another build, resources, environment, or a restart).
    """
    before = repo.maybe_deployment_row(c.session, model.active_deployment)
    previous: list[str] = []
    roll = False
    if before is not None and before.state == DeploymentState.DEPLOYED.value:
        previous = [r.id for r in repo.replicas_of(before)]
        after_spec = desired.app_spec(model, dep, repo.build_row(c.session, dep.build))
        roll = before is dep or rolls(
            desired.app_spec(model, before, repo.build_row(c.session, before.build)), after_spec
        )
    c.deployment(
        dep,
        DeploymentState.DEPLOYING,
        applied=False,
        expect_roll=bool(previous) and roll,
        previous_replica_ids=json.dumps(previous if roll else []),
        **_note(""),
    )
    c.model(model, ModelState.DEPLOYING, active_deployment=dep.name, message="")


def cancel(c: Changes, model: ModelRow, op: OperationRow) -> None:
    """Stops a build or a rollout cleanly. A queued build ends at once; a running build
    is marked, and the server running its job stops it (``build_cancelled``); a rollout
    ends at once and the model falls back to what served before it."""
    if op.done:
        raise _refuse(f"operation {op.name} is already done", "OPERATION_DONE", op)
    if op.kind == OperationKind.STOP_MODEL.value:
        raise _refuse(
            f"operation {op.name} stops a model, which cannot be undone halfway; "
            "restart the model once it is STOPPED",
            "NOT_CANCELLABLE",
            op,
            kind=op.kind,
        )
    build = c.session.exec(select(BuildRow).where(BuildRow.name == op.target)).first()
    if build is not None and build.state not in FINISHED_BUILD:
        if c.cancel_pending_builds(op.name):  # no server runs it now: it ends here
            started = build.state == BuildState.BUILDING.value
            why = "cancelled while building" if started else "cancelled before it started"
            build_ended_unfinished(c, model, op, build, f"{why} ({op.name})")
        else:
            c.cancel_requested(op)  # the server running its job stops it
        return
    dep = repo.maybe_deployment_row(c.session, op.deployment)
    if dep is None or dep.state != DeploymentState.DEPLOYING.value:
        raise _refuse(
            f"operation {op.name} has nothing running to cancel right now",
            "NOTHING_TO_CANCEL",
            op,
        )
    fail_rollout(
        c, model, dep, op, f"cancelled on request ({op.name})", "CANCELLED", CANCELLED_REASON
    )


def _refuse(message: str, reason: str, op: OperationRow, **metadata: str) -> Exception:
    return FailedPrecondition(
        message=message, reason=reason, metadata={"operation": op.name, **metadata}
    )


# ---- 2. a build job runs ---------------------------------------------------------------------


def build_started(c: Changes, job: Job) -> BuildRow | None:
    """The build goes BUILDING; None when there is nothing to build (it finished before
    a restart of the server, or it was cancelled while no server ran it)."""
    build = repo.build_row(c.session, job.target)
    if build.state in FINISHED_BUILD:
        return None
    op = repo.operation_row(c.session, job.operation)
    if op.cancel_requested:
        model = repo.model_row(c.session, job.model)
        build_ended_unfinished(c, model, op, build, f"cancelled while building ({op.name})")
        return None
    c.build(build, BuildState.BUILDING)
    c.operation_progress(op, "building")
    return build


def build_finished(c: Changes, job: Job, outcome: BuildOutcome) -> None:
    """Built: a deployment that waited on it starts rolling out (or the operation ends
    here). Failed: so does the deployment that waited, and a model PENDING on it."""
    build = repo.build_row(c.session, job.target)
    if build.state in FINISHED_BUILD:
        return
    op = repo.operation_row(c.session, job.operation)
    model = repo.model_row(c.session, job.model)
    dep = repo.maybe_deployment_row(c.session, op.deployment)
    if not outcome.ok:
        c.build(build, BuildState.FAILED, error=outcome.error, finish_time=now())
        message = f"build {build.version} failed: {outcome.error}"
        if dep is not None:
            c.deployment(dep, DeploymentState.FAILED, **_note(message))
        if model.state == ModelState.PENDING.value:
            c.model(model, ModelState.FAILED, message=message)
        error = (
            OperationError("RESOURCE_EXHAUSTED", message, "DISK_FULL")
            if outcome.disk_full
            else OperationError("FAILED_PRECONDITION", message, "BUILD_FAILED")
        )
        c.operation_done(op, model, "build failed", error)
        return
    c.build(
        build,
        BuildState.BUILT,
        image=outcome.image,
        artifact_path=outcome.artifact_path,
        finish_time=now(),
        runtime=outcome.runtime,
        packages=codec.packages_to_json(
            Package(p.name, p.version, p.sha256, p.requested) for p in outcome.packages
        ),
        cache_hit=outcome.cache_hit,
        size_bytes=outcome.size_bytes,
    )
    if op.cancel_requested:  # cancelled as it finished: built, but not deployed
        build_ended_unfinished(c, model, op, build, f"cancelled before deploying ({op.name})")
        return
    if dep is None:
        c.operation_done(op, model, "built")
        return
    start_rollout(c, model, dep)
    c.operation_progress(op, "deploying")
    c.enqueue(JobKind.APPLY, model.name, op.name, dep.name)


def build_cancelled(c: Changes, job: Job) -> None:
    """The server running the build stopped it because its operation was cancelled."""
    op = repo.operation_row(c.session, job.operation)
    if op.done:
        return
    model = repo.model_row(c.session, job.model)
    build = repo.build_row(c.session, job.target)
    build_ended_unfinished(c, model, op, build, f"cancelled while building ({op.name})")


def build_ended_unfinished(
    c: Changes, model: ModelRow, op: OperationRow, build: BuildRow, why: str
) -> None:
    """A queued or running build that will never finish (cancelled): the build FAILS with
    ``why``, its pending deployment with it, and a model that was only PENDING on it goes
    back to where it was."""
    if build.state not in FINISHED_BUILD:
        c.build(build, BuildState.FAILED, error=why, finish_time=now())
    dep = repo.maybe_deployment_row(c.session, op.deployment)
    if dep is not None and dep.state == DeploymentState.PENDING.value:
        c.deployment(dep, DeploymentState.FAILED, **_note(why))
    if model.state == ModelState.PENDING.value:
        before = repo.maybe_deployment_row(c.session, model.active_deployment)
        back = decisions.state_before_pending(
            before.name if before is not None else None,
            before is not None and before.state == DeploymentState.STOPPED.value,
        )
        c.model(model, back, message=why)
    error = OperationError("CANCELLED", f"{op.name} was cancelled on request", CANCELLED_REASON)
    c.operation_done(op, model, "cancelled", error)


# ---- 3. an apply job puts the desired set on Serve -------------------------------------------


def apply_landed(c: Changes, job: Job) -> None:
    """Serve has the rollout (or the stop): the reconciler judges it from now on."""
    if not job.model:
        return  # a whole-set apply (at start, or after a failure) has no rollout to mark
    model = repo.maybe_model_row(c.session, job.model)
    if model is None:
        return
    dep = repo.maybe_deployment_row(c.session, job.target)
    if dep is None:  # a stop targets the model: its active deployment stops
        dep = repo.maybe_deployment_row(c.session, model.active_deployment)
    # Two builds live: the second one's application went with the same apply.
    candidate = candidate_of(c, model)
    for d in (dep, candidate):
        if d is not None and not d.applied and d.state in _IN_FLIGHT:
            c.deployment(d, applied=True, apply_time=now())
    op = repo.maybe_operation_row(c.session, job.operation)
    if (  # SetTraffic: Serve has the weights, and both builds' replicas run
        op is not None
        and op.kind == OperationKind.SET_TRAFFIC.value
        and candidate is not None
        and dep is not None
        and candidate.state == dep.state == DeploymentState.DEPLOYED.value
    ):
        if model.state == ModelState.DEPLOYING.value:
            c.model(model, ModelState.DEPLOYED)
        c.operation_done(op, model, op.progress)


def apply_failed(c: Changes, job: Job, error: str) -> None:
    """An apply that failed for good fails its operation with the reason: a rollout that
    never reached Serve falls back to what served before it; a stop fails the model."""
    if not job.operation:
        return
    op = repo.operation_row(c.session, job.operation)
    model = repo.model_row(c.session, job.model)
    message = f"applying the change failed: {error}"
    dep = repo.maybe_deployment_row(c.session, model.active_deployment)
    if (
        not op.done
        and dep is not None
        and dep.state == DeploymentState.DEPLOYING.value
        and model.state == ModelState.DEPLOYING.value
    ):
        fail_rollout(c, model, dep, op, message, "UNAVAILABLE", "APPLY_FAILED")
        return
    if dep is not None and not dep.applied and dep.state in _IN_FLIGHT:
        c.deployment(dep, DeploymentState.FAILED, **_note(message))
    if model.state in _IN_FLIGHT:
        c.model(model, ModelState.FAILED, message=message)
    c.operation_done(op, model, "failed", OperationError("INTERNAL", message, "JOB_FAILED"))


# ---- 4. the reconciler looks -----------------------------------------------------------------


def rollout_observed(
    c: Changes,
    model: ModelRow,
    dep: DeploymentRow,
    obs: Observation | None,
    at: datetime,
    limits: Limits,
) -> None:
    """A DEPLOYING model: its replicas are recorded, and the rollout judged."""
    verdict = judge(c, dep, obs, at, limits)
    op = running_operation(c, model)
    if isinstance(verdict, Deployed):
        _deployed(c, model, dep, op)
    elif isinstance(verdict, Failed):
        fail_rollout(c, model, dep, op, verdict.message, verdict.code, verdict.reason)
    elif isinstance(verdict, InProgress) and op is not None:
        c.operation_progress(op, verdict.progress)


def judge(
    c: Changes, dep: DeploymentRow, obs: Observation | None, at: datetime, limits: Limits
) -> decisions.Verdict:
    """A deployment on its way: its replicas as ``obs`` lists them are recorded, and its
    rollout judged (``decisions.judge_rollout``)."""
    if obs is not None:
        _write_serving(c, dep, decisions.observe_replicas(serving_record(dep), obs))
    rollout = Rollout(
        wanted=dep.replicas,
        autoscaled=bool(dep.autoscaling),
        replaced=frozenset(json.loads(dep.previous_replica_ids))
        if dep.expect_roll
        else frozenset(),
        applied_at=codec.utc(dep.apply_time) if dep.apply_time is not None else None,
    )
    return decisions.judge_rollout(rollout, obs, at, limits)


def serving_observed(c: Changes, model: ModelRow, dep: DeploymentRow, obs: Observation) -> None:
    """A DEPLOYED model: replicas Serve replaced on its own, and Serve's health, are
    recorded (the model stays DEPLOYED: its running replicas still answer)."""
    before = serving_record(dep)
    record = decisions.judge_serving(before, obs, notice_replaced=not model.running_operation)
    _write_serving(c, dep, record)
    if not model.running_operation and record.message != before.message:
        c.model(model, message=record.message)  # GetModel says what happened too


def scale_observed(
    c: Changes,
    model: ModelRow,
    dep: DeploymentRow,
    obs: Observation,
    at: datetime,
    load: Callable[[], float | None],
    coalesce_s: float,
) -> None:
    """The serving deployment's replicas wanted and running, and the last decision on how
    many (``domain.scaling.judge_scale``), written on the model when they change, at most
    every ``coalesce_s``. ``load``: the model's requests in flight, asked only when there
    is a new decision to give a reason to."""
    running = sum(1 for r in obs.replicas if r.state is ReplicaState.RUNNING)
    desired = obs.target if obs.target is not None else dep.replicas
    before = scaling.scale_from_json(model.scale)
    decided = before is None or before.deployment != dep.name or before.desired != desired
    looked = scaling.Looked(
        deployment=dep.name,
        number=dep.number,
        desired=desired,
        running=running,
        autoscaling=scaling.autoscaling_from_json(dep.autoscaling),
        in_flight=load() if decided else None,
    )
    after = scaling.judge_scale(before, looked, at, coalesce_s)
    if after is not None:
        c.model(model, scale=scaling.scale_to_json(after) or "")


def stopping_observed(
    c: Changes, model: ModelRow, dep: DeploymentRow, obs: Observation | None
) -> None:
    """A STOPPING model is STOPPED once Serve no longer has its application."""
    if obs is not None:
        _write_serving(c, dep, decisions.observe_replicas(serving_record(dep), obs))
        return
    if dep.state == DeploymentState.STOPPING.value:
        c.deployment(dep, DeploymentState.STOPPED, awaiting_replacement="[]", **_no_replicas())
    c.model(model, ModelState.STOPPED)
    op = running_operation(c, model)
    if op is not None:
        c.operation_done(op, model, "stopped")


def app_missing(c: Changes, dep: DeploymentRow) -> None:
    """The application of a model that should serve is gone from Serve (deleted behind
    our back, or the cluster restarted): the desired set is applied again."""
    c.resync()
    why = "the application was missing from Serve (deleted, or the cluster restarted); re-applied"
    c.deployment(dep, **_note(why), **_no_replicas())


def health_observed(c: Changes, model: ModelRow, health: str) -> None:
    """What the model's signals say now (``domain.health``); written only when it changes,
    so that watchers see each change once and nothing else."""
    if model.health != health:
        c.model(model, health=health)


def reconcile_failed(c: Changes, model: ModelRow, why: str) -> None:
    """Reconciling the model raised: the model says so (the loop goes on)."""
    if model.message != f"reconcile error: {why}":
        c.model(model, message=f"reconcile error: {why}")


def _deployed(c: Changes, model: ModelRow, dep: DeploymentRow, op: OperationRow | None) -> None:
    """Every replica of the rollout runs: it serves, and every other deployment of the
    model is REPLACED (one that never finished FAILED first: superseded)."""
    c.deployment(dep, DeploymentState.DEPLOYED, **_note(""))
    live = (
        DeploymentState.DEPLOYED.value,
        DeploymentState.STOPPED.value,
        DeploymentState.FAILED.value,
        DeploymentState.DEPLOYING.value,
    )
    others = c.session.exec(
        select(DeploymentRow).where(
            DeploymentRow.model == model.name,
            DeploymentRow.id != dep.id,
            col(DeploymentRow.state).in_(live),
        )
    ).all()
    for other in others:
        if other.state == DeploymentState.DEPLOYING.value:  # never finished; superseded
            c.deployment(other, DeploymentState.FAILED, **_note(f"superseded by {dep.name}"))
        c.deployment(
            other, DeploymentState.REPLACED, **_note(f"replaced by {dep.name}"), **_no_replicas()
        )
    c.model(model, ModelState.DEPLOYED, message="")
    if model.traffic:  # two builds were live: the second one's application goes
        c.model(model, traffic="")
        c.enqueue(JobKind.APPLY, model.name, "", dep.name)
    if op is not None:
        c.operation_done(op, model, "deployed")


# ---- a rollout that cannot finish ------------------------------------------------------------


def fail_rollout(
    c: Changes,
    model: ModelRow,
    dep: DeploymentRow,
    op: OperationRow | None,
    message: str,
    code: str,
    reason: str,
) -> None:
    """A rollout that failed (or was cancelled) ends; the model goes back to what served
    (``decisions.choose_fallback``), and the desired set is applied at once."""
    split = split_from_json(model.traffic)
    last_good = c.session.exec(
        select(DeploymentRow)
        .where(
            DeploymentRow.model == model.name,
            DeploymentRow.id != dep.id,
            DeploymentRow.state == DeploymentState.DEPLOYED.value,
        )
        .where(*([DeploymentRow.name == split.stable] if split is not None else []))
        .order_by(col(DeploymentRow.id).desc())
    ).first()
    if split is not None and dep.name == split.candidate:  # its promotion failed
        c.model(model, traffic="")
    cancelled = code == "CANCELLED"
    fallback = decisions.choose_fallback(
        deployment=dep.name,
        why=message,
        cancelled=cancelled,
        last_good=last_good.name if last_good is not None else "",
        restart=op is not None and op.kind == OperationKind.RESTART_MODEL.value,
        replaced=frozenset(json.loads(dep.previous_replica_ids)),
        observed=repo.replicas_of(dep),
    )
    if fallback.kind is FallbackKind.SERVE_LAST_GOOD:
        assert last_good is not None
        c.deployment(dep, DeploymentState.FAILED, **_note(fallback.deployment_note))
        c.model(
            model,
            ModelState.DEPLOYED,
            active_deployment=last_good.name,
            message=fallback.model_note,
        )
    elif fallback.kind is FallbackKind.KEEP_PREVIOUS_REPLICAS:
        kept = ServingRecord(
            replicas=fallback.kept,
            ran=frozenset(r.id for r in fallback.kept) & frozenset(json.loads(dep.ran_replica_ids)),
            note=fallback.deployment_note,
        )
        c.deployment(
            dep,
            DeploymentState.DEPLOYED,
            restart_generation=dep.restart_generation - 1,
            **_serving_fields(kept),
        )
        c.model(model, ModelState.DEPLOYED, message=fallback.model_note)
    else:
        c.deployment(dep, DeploymentState.FAILED, **_note(fallback.deployment_note))
        c.model(model, ModelState.FAILED, message=fallback.model_note)
    if op is not None:
        error = OperationError(code, message, reason)
        c.operation_done(op, model, "cancelled" if cancelled else "failed", error)
    # Apply the desired set now: the last good spec, or no app for a FAILED model.
    c.enqueue(JobKind.APPLY, model.name, "", dep.name)


# ---- the serving record, typed ---------------------------------------------------------------


def serving_record(dep: DeploymentRow) -> ServingRecord:
    return ServingRecord(
        replicas=repo.replicas_of(dep),
        ran=frozenset(json.loads(dep.ran_replica_ids)),
        awaiting=tuple(codec.replica_from_dict(r) for r in json.loads(dep.awaiting_replacement)),
        note=dep.message,
        health=dep.serve_health,
    )


def _serving_fields(record: ServingRecord) -> dict[str, Any]:
    return {
        "observed_replicas": _replicas_json(record.replicas),
        "ran_replica_ids": json.dumps(sorted(record.ran)),
        "awaiting_replacement": _replicas_json(record.awaiting),
        "message": record.note,
        "serve_health": record.health,
    }


def _write_serving(c: Changes, dep: DeploymentRow, record: ServingRecord) -> None:
    fields = _serving_fields(record)
    if any(getattr(dep, key) != value for key, value in fields.items()):
        c.deployment(dep, **fields)


def _replicas_json(replicas: tuple[Replica, ...]) -> str:
    return json.dumps([codec.replica_to_dict(r) for r in replicas], sort_keys=True)


def _note(message: str) -> dict[str, Any]:
    """A new note for people: what Serve said of the deployment before goes with it."""
    return {"message": message, "serve_health": "", "awaiting_replacement": "[]"}


def _no_replicas() -> dict[str, Any]:
    return {"observed_replicas": "[]", "ran_replica_ids": "[]"}


def running_operation(c: Changes, model: ModelRow) -> OperationRow | None:
    if not model.running_operation:
        return None
    return repo.operation_row(c.session, model.running_operation)
