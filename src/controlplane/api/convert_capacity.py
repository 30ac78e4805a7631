"""Protobuf <-> domain for capacity: autoscaling bounds, a model's scale, and plans."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from controlplane.domain import plan as p
from controlplane.domain import scaling
from controlplane.domain.scaling import Autoscaling, Scale, ScaleDecision
from modellifecycle.v1 import resources_pb2 as pb

_CLASS = {
    p.ChangeClass.IN_PLACE: pb.CHANGE_CLASS_IN_PLACE,
    p.ChangeClass.ROLLING: pb.CHANGE_CLASS_ROLLING,
    p.ChangeClass.RESTART: pb.CHANGE_CLASS_RESTART,
    p.ChangeClass.REBUILD: pb.CHANGE_CLASS_REBUILD,
    p.ChangeClass.STOP: pb.CHANGE_CLASS_STOP,
    p.ChangeClass.START: pb.CHANGE_CLASS_START,
}
_CLASS_IN = {v: k for k, v in _CLASS.items()}


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _dt(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def autoscaling_to_pb(a: Autoscaling | None) -> pb.Autoscaling | None:
    if a is None:
        return None
    return pb.Autoscaling(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_ongoing_requests=a.target_ongoing_requests,
        upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s,
    )


def autoscaling_from_pb(r: pb.Resources) -> Autoscaling | None:
    if not r.HasField("autoscaling"):
        return None
    a = r.autoscaling
    return Autoscaling(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_ongoing_requests=a.target_ongoing_requests
        if a.HasField("target_ongoing_requests")
        else scaling.DEFAULT_TARGET,
        upscale_delay_s=a.upscale_delay_s
        if a.HasField("upscale_delay_s")
        else scaling.DEFAULT_UPSCALE_DELAY_S,
        downscale_delay_s=a.downscale_delay_s
        if a.HasField("downscale_delay_s")
        else scaling.DEFAULT_DOWNSCALE_DELAY_S,
    )


def scale_to_pb(s: Scale | None) -> pb.ScaleStatus | None:
    if s is None:
        return None
    last = None
    if s.last is not None:
        last = pb.ScaleDecision(
            time=_ts(s.last.time),
            from_replicas=s.last.from_replicas,
            to_replicas=s.last.to_replicas,
            reason=s.last.reason,
        )
    return pb.ScaleStatus(
        desired_replicas=s.desired,
        running_replicas=s.running,
        autoscaled=s.autoscaled,
        last_decision=last,
    )


def scale_from_pb(m: pb.Model) -> Scale | None:
    if not m.HasField("scale"):
        return None
    s = m.scale
    last = None
    if s.HasField("last_decision"):
        d = s.last_decision
        last = ScaleDecision(_dt(d.time), d.from_replicas, d.to_replicas, d.reason)
    return Scale(
        deployment=m.active_deployment,
        desired=s.desired_replicas,
        running=s.running_replicas,
        autoscaled=s.autoscaled,
        last=last,
    )


def plan_to_pb(plan: p.Plan | None) -> pb.Plan | None:
    if plan is None:
        return None
    fit = plan.fit
    return pb.Plan(
        change_class=_CLASS[plan.change_class],
        causes=[pb.PlanCause(field=c.field, before=c.before, after=c.after) for c in plan.causes],
        current_replicas=list(plan.current),
        replicas_kept=plan.kept,
        replicas_replaced=plan.replaced,
        replicas_removed=plan.removed,
        replicas_added=plan.added,
        replicas_after=plan.after,
        summary=plan.summary,
        capacity=None
        if fit is None
        else pb.Capacity(
            fits=fit.fits,
            reason=fit.reason,
            cpus_per_replica=fit.need.cpus,
            gpus_per_replica=fit.need.gpus,
            memory_mib_per_replica=fit.need.memory_mib,
            replicas_to_place=fit.to_place,
            replicas_placed=fit.placed,
            room_for_replicas=fit.room_for,
            nodes=[
                pb.NodeCapacity(
                    node=n.node.node,
                    cpus_free=n.node.cpus_free,
                    cpus_total=n.node.cpus_total,
                    gpus_free=n.node.gpus_free,
                    gpus_total=n.node.gpus_total,
                    memory_free_mib=n.node.memory_free_mib,
                    memory_total_mib=n.node.memory_total_mib,
                    new_replicas=n.new_replicas,
                )
                for n in fit.nodes
            ],
        ),
    )


def plan_from_pb(o: pb.Operation) -> p.Plan | None:
    if not o.HasField("plan"):
        return None
    m = o.plan
    fit = None
    if m.HasField("capacity"):
        c = m.capacity
        fit = p.Fit(
            fits=c.fits,
            reason=c.reason,
            need=p.Need(c.cpus_per_replica, c.gpus_per_replica, c.memory_mib_per_replica),
            to_place=c.replicas_to_place,
            placed=c.replicas_placed,
            nodes=tuple(
                p.NodeFit(
                    p.Node(
                        n.node,
                        n.cpus_total,
                        n.cpus_free,
                        n.gpus_total,
                        n.gpus_free,
                        n.memory_total_mib,
                        n.memory_free_mib,
                    ),
                    n.new_replicas,
                )
                for n in c.nodes
            ),
            room_for=c.room_for_replicas,
        )
    return p.Plan(
        change_class=_CLASS_IN.get(m.change_class, p.ChangeClass.IN_PLACE),
        causes=tuple(p.Cause(c.field, c.before, c.after) for c in m.causes),
        current=tuple(m.current_replicas),
        kept=m.replicas_kept,
        replaced=m.replicas_replaced,
        removed=m.replicas_removed,
        added=m.replicas_added,
        after=m.replicas_after,
        fit=fit,
        summary=m.summary,
    )
