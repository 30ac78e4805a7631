"""Plans before changes: the records and the cluster's nodes, read into ``domain.plan``.

``plan_for`` is called inside the transaction of the change it plans (after the change's
own checks, with the rows as the change leaves them), so that a plan says exactly what
the change would do; ``refuse_unless_fits`` turns a plan that does not fit into
FAILED_PRECONDITION / INSUFFICIENT_CAPACITY with the numbers, unless the caller asked to
wait for capacity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controlplane.domain import plan as p
from controlplane.domain import scaling
from controlplane.domain.errors import FailedPrecondition
from controlplane.domain.states import ModelState, ReplicaState
from controlplane.storage import repo
from controlplane.storage.tables import DeploymentRow, ModelRow
from workers.backend import NodeResources

SERVING_MODELS = (ModelState.DEPLOYING.value, ModelState.DEPLOYED.value)
_LIVE = (ReplicaState.STARTING, ReplicaState.RUNNING)


@dataclass(frozen=True)
class Cluster:
    """The nodes as the cluster reported them when the change was asked for; ``nodes``
    is None when it could not be asked (``error`` says why): no fit is judged then."""

    nodes: tuple[p.Node, ...] | None
    error: str = ""


def read_cluster(ask: Callable[[], Sequence[NodeResources]] | None) -> Cluster:
    if ask is None:
        return Cluster(None, "no cluster")
    try:
        found = ask()
    except Exception as e:  # the cluster is unreachable: plans say so, changes go on
        return Cluster(None, f"the cluster's nodes could not be read: {type(e).__name__}: {e}")
    return Cluster(
        tuple(
            p.Node(
                n.node,
                n.cpus_total,
                n.cpus_free,
                n.gpus_total,
                n.gpus_free,
                n.memory_total_mib,
                n.memory_free_mib,
            )
            for n in found
        )
    )


def side_of(dep: DeploymentRow) -> p.Side:
    return p.Side(
        build=dep.build,
        replicas=dep.replicas,
        need=p.Need(dep.cpus, dep.gpus, dep.memory_mib),
        autoscaling=scaling.autoscaling_from_json(dep.autoscaling),
        environment=repo.environment_of(dep),
        secrets=repo.secret_ids(dep),
        restart_generation=dep.restart_generation,
    )


def running(model: ModelRow, dep: DeploymentRow | None) -> p.Running | None:
    """The deployment serving now and its live replicas, if the model serves."""
    if dep is None or model.state not in SERVING_MODELS:
        return None
    live = tuple((r.id, r.node) for r in repo.replicas_of(dep) if r.state in _LIVE)
    return p.Running(side_of(dep), live)


def plan_for(
    cluster: Cluster,
    model: ModelRow,
    before: DeploymentRow | None,
    after: DeploymentRow | None,
    restart: bool = False,
    rebuild: bool = False,
    candidate: bool = False,
) -> p.Plan:
    """``before``: the model's active deployment before the change; ``after``: the one it
    runs (None: a stop)."""
    return p.plan(
        running(model, before),
        side_of(after) if after is not None else None,
        cluster.nodes,
        restart=restart,
        rebuild=rebuild,
        candidate=candidate,
    )


def refuse_unless_fits(plan: p.Plan, model: str, wait_for_capacity: bool) -> None:
    fit = plan.fit
    if fit is None or fit.fits or wait_for_capacity:
        return
    raise FailedPrecondition(
        message=f"{model}: the cluster has no room for this change: {fit.reason} (ask with "
        "wait_for_capacity to start it anyway: its replicas then wait for room until the "
        "placement deadline)",
        reason="INSUFFICIENT_CAPACITY",
        metadata={
            "model": model,
            "replicas_to_place": str(fit.to_place),
            "replicas_placed": str(fit.placed),
            "need_per_replica": fit.need.words(),
        },
    )
