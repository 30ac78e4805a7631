"""How a rollout that cannot finish ends: the model goes back to what served before."""

from __future__ import annotations

import json

from sqlmodel import col, select

from controlplane.domain import states as st
from controlplane.domain import types as t
from controlplane.jobs import JOB_APPLY
from controlplane.storage.changes import Changes, now
from controlplane.storage.tables import BuildRow, DeploymentRow, ModelRow, OperationRow


def fail_rollout(
    c: Changes,
    model: ModelRow,
    dep: DeploymentRow,
    op: OperationRow | None,
    message: str,
    code: str,
    reason: str,
) -> None:
    """A rollout that failed (or was cancelled) ends; the model goes back to what served.

    - Another deployment still DEPLOYED (the rollout's replicas never took over): the
      model serves it again, and the desired config (applied at once) is that one.
    - A restart: the deployment goes back to its previous generation, whose replicas
      Serve keeps (or starts again): it stays the active deployment.
    - Nothing served before (a first deploy): the model is FAILED and its app removed.
    """
    last_good = _last_good(c, model, dep)
    restarted = op is not None and op.kind == st.OperationKind.RESTART_MODEL.value
    cancelled = code == "CANCELLED"  # ``message`` then says so ("cancelled on request ...")
    if last_good is not None:
        c.deployment(dep, st.DeploymentState.FAILED, message=message)
        what = f"{dep.name}: {message}" if cancelled else f"{dep.name} failed: {message}"
        c.model(
            model,
            st.ModelState.DEPLOYED,
            active_deployment=last_good.name,
            message=f"{what}; serving {last_good.name} again",
        )
    elif restarted and json.loads(dep.previous_replica_ids):
        before = set(json.loads(dep.previous_replica_ids))
        kept = [r for r in json.loads(dep.observed_replicas) if r["id"] in before]
        what = f"restart {message}" if cancelled else f"restart failed: {message}"
        c.deployment(
            dep,
            st.DeploymentState.DEPLOYED,
            restart_generation=dep.restart_generation - 1,
            message=f"{what}; the replicas from before it keep serving",
            observed_replicas=json.dumps(kept, sort_keys=True),
        )
        c.model(model, st.ModelState.DEPLOYED, message=what)
    else:
        c.deployment(dep, st.DeploymentState.FAILED, message=message)
        c.model(model, st.ModelState.FAILED, message=message)
    if op is not None:
        progress = "cancelled" if cancelled else "failed"
        c.operation_done(op, model, progress, t.OperationError(code, message, reason))
    # Apply the desired set now: the last good spec, or no app for a FAILED model.
    c.enqueue(JOB_APPLY, model.name, "", dep.name)


def _last_good(c: Changes, model: ModelRow, dep: DeploymentRow) -> DeploymentRow | None:
    """The newest other deployment of the model that is still DEPLOYED (still serving)."""
    return c.s.exec(
        select(DeploymentRow)
        .where(
            DeploymentRow.model == model.name,
            DeploymentRow.id != dep.id,
            DeploymentRow.state == st.DeploymentState.DEPLOYED.value,
        )
        .order_by(col(DeploymentRow.id).desc())
    ).first()


CANCELLED_REASON = "OPERATION_CANCELLED"


def cancelled_error(op: OperationRow) -> t.OperationError:
    return t.OperationError("CANCELLED", f"{op.name} was cancelled on request", CANCELLED_REASON)


def end_build_without_result(
    c: Changes, model: ModelRow, op: OperationRow, build: BuildRow, why: str
) -> None:
    """A queued or running build that will never finish (cancelled): the build FAILS with
    ``why``, its pending deployment with it, and a model that was only PENDING on it goes
    back to where it was."""
    if build.state not in (st.BuildState.BUILT.value, st.BuildState.FAILED.value):
        c.build(build, st.BuildState.FAILED, error=why, finish_time=now())
    dep = c.s.exec(select(DeploymentRow).where(DeploymentRow.name == op.deployment)).first()
    if dep is not None and dep.state == st.DeploymentState.PENDING.value:
        c.deployment(dep, st.DeploymentState.FAILED, message=why)
    if model.state == st.ModelState.PENDING.value:
        before = c.s.exec(
            select(DeploymentRow).where(DeploymentRow.name == model.active_deployment)
        ).first()
        if before is None:
            back = st.ModelState.NOT_DEPLOYED
        elif before.state == st.DeploymentState.STOPPED.value:
            back = st.ModelState.STOPPED
        else:
            back = st.ModelState.FAILED
        c.model(model, back, message=why)
    c.operation_done(op, model, "cancelled", cancelled_error(op))
