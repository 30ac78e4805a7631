"""Domain dataclasses <-> protobuf messages, both ways. Nothing else converts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from controlplane.api.convert_capacity import (
    autoscaling_from_pb,
    autoscaling_to_pb,
    plan_from_pb,
    plan_to_pb,
    scale_from_pb,
    scale_to_pb,
)
from controlplane.domain.access import AuditRecord, InvocationKey, Principal, Role, Token
from controlplane.domain.figures import (
    Figures,
    ModelMetrics,
    ModelSeries,
    Point,
    ReplicaSeries,
    Series,
)
from controlplane.domain.states import (
    BuildState,
    DeploymentState,
    EventType,
    ModelState,
    OperationKind,
    ReplicaState,
)
from controlplane.domain.traffic import (
    DEFAULT_MIN_REQUESTS,
    Gates,
    Phase,
    RolloutRecord,
    Split,
    StepFigures,
    Strategy,
    StrategyKind,
)
from controlplane.domain.types import (
    Build,
    Deployment,
    Event,
    LogLine,
    Model,
    Operation,
    OperationError,
    Package,
    Replica,
    Resource,
    Resources,
    Source,
)
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from workers import runtime

ERROR_DOMAIN = "modellifecycle.v1"

_MODEL_STATE = {s: getattr(pb, f"MODEL_STATE_{s.value}") for s in ModelState}
_BUILD_STATE = {s: getattr(pb, f"BUILD_STATE_{s.value}") for s in BuildState}
_DEPLOYMENT_STATE = {s: getattr(pb, f"DEPLOYMENT_STATE_{s.value}") for s in DeploymentState}
_REPLICA_STATE = {s: getattr(pb, f"REPLICA_STATE_{s.value}") for s in ReplicaState}
_OPERATION_KIND = {s: getattr(pb, f"OPERATION_KIND_{s.value}") for s in OperationKind}
_EVENT_TYPE = {s: getattr(pb, f"EVENT_TYPE_{s.value}") for s in EventType}


K = TypeVar("K")
V = TypeVar("V")


def _inverse(mapping: dict[K, V]) -> dict[V, K]:
    return {v: k for k, v in mapping.items()}


_MODEL_STATE_IN = _inverse(_MODEL_STATE)
_BUILD_STATE_IN = _inverse(_BUILD_STATE)
_DEPLOYMENT_STATE_IN = _inverse(_DEPLOYMENT_STATE)
_REPLICA_STATE_IN = _inverse(_REPLICA_STATE)
_OPERATION_KIND_IN = _inverse(_OPERATION_KIND)
_EVENT_TYPE_IN = _inverse(_EVENT_TYPE)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """``Timestamp.FromDatetime``'s result, in a third of its time (a page of a list
    converts hundreds)."""
    if value is None:
        return None
    since = value.astimezone(UTC) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def from_timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


# ---- domain -> protobuf -------------------------------------------------------------------


def model_to_pb(m: Model) -> pb.Model:
    return pb.Model(
        name=m.name,
        display_name=m.display_name,
        description=m.description,
        state=_MODEL_STATE[m.state],
        active_deployment=m.active_deployment,
        endpoint=m.endpoint,
        create_time=timestamp(m.create_time),
        update_time=timestamp(m.update_time),
        etag=m.etag,
        message=m.message,
        running_operation=m.running_operation,
        health=m.health,
        traffic=split_to_pb(m.traffic),
        scale=scale_to_pb(m.scale),
    )


def split_to_pb(s: Split | None) -> pb.TrafficSplit | None:
    if s is None:
        return None
    return pb.TrafficSplit(
        stable=pb.TrafficTarget(deployment=s.stable, build=s.stable_build, percent=100 - s.percent),
        candidate=pb.TrafficTarget(
            deployment=s.candidate, build=s.candidate_build, percent=s.percent
        ),
        shadow=s.shadow,
        sticky_header=s.sticky_header,
        promoting=s.promoting,
    )


def split_from_pb(m: pb.Model) -> Split | None:
    if not m.HasField("traffic"):
        return None
    s = m.traffic
    return Split(
        stable=s.stable.deployment,
        candidate=s.candidate.deployment,
        stable_build=s.stable.build,
        candidate_build=s.candidate.build,
        percent=s.candidate.percent,
        shadow=s.shadow,
        sticky_header=s.sticky_header,
        promoting=s.promoting,
    )


def gates_to_pb(g: Gates) -> pb.RolloutGates:
    gates = pb.RolloutGates(min_requests=g.min_requests)
    if g.max_error_rate is not None:
        gates.max_error_rate = g.max_error_rate
    if g.max_p99_ms is not None:
        gates.max_p99_ms = g.max_p99_ms
    if g.max_p99_ratio is not None:
        gates.max_p99_ratio = g.max_p99_ratio
    return gates


def gates_from_pb(g: pb.RolloutGates) -> Gates:
    return Gates(
        max_error_rate=g.max_error_rate if g.HasField("max_error_rate") else None,
        max_p99_ms=g.max_p99_ms if g.HasField("max_p99_ms") else None,
        max_p99_ratio=g.max_p99_ratio if g.HasField("max_p99_ratio") else None,
        min_requests=g.min_requests if g.HasField("min_requests") else DEFAULT_MIN_REQUESTS,
    )


def strategy_to_pb(s: Strategy) -> pb.RolloutStrategy:
    if s.kind is StrategyKind.CANARY:
        return pb.RolloutStrategy(
            canary=pb.CanaryRollout(
                steps=list(s.steps), bake_seconds=s.bake_s, gates=gates_to_pb(s.gates)
            )
        )
    if s.kind is StrategyKind.SHADOW:
        return pb.RolloutStrategy(
            shadow=pb.ShadowRollout(
                percent=s.steps[0] if s.steps else 0,
                duration_seconds=s.bake_s,
                gates=gates_to_pb(s.gates),
            )
        )
    return pb.RolloutStrategy(immediate=pb.ImmediateRollout())


def strategy_from_pb(s: pb.RolloutStrategy) -> Strategy:
    which = s.WhichOneof("strategy")
    if which == "canary":
        return Strategy(
            StrategyKind.CANARY,
            tuple(s.canary.steps),
            s.canary.bake_seconds,
            gates_from_pb(s.canary.gates),
        )
    if which == "shadow":
        return Strategy(
            StrategyKind.SHADOW,
            (s.shadow.percent,),
            s.shadow.duration_seconds,
            gates_from_pb(s.shadow.gates),
        )
    return Strategy()


_PHASE = {
    Phase.STARTING: pb.RolloutStatus.PHASE_STARTING,
    Phase.BAKING: pb.RolloutStatus.PHASE_BAKING,
    Phase.PROMOTING: pb.RolloutStatus.PHASE_PROMOTING,
}
_PHASE_IN = {v: k for k, v in _PHASE.items()}


def _figures_pb(f: StepFigures) -> pb.RolloutFigures:
    return pb.RolloutFigures(requests=f.requests, errors=f.errors, latency_p99_ms=f.p99_ms)


def rollout_to_pb(r: RolloutRecord | None) -> pb.RolloutStatus | None:
    if r is None:
        return None
    return pb.RolloutStatus(
        strategy=strategy_to_pb(r.strategy),
        phase=_PHASE[r.phase],
        step=r.step + 1,
        steps=len(r.strategy.steps),
        percent=r.percent,
        step_start_time=timestamp(r.step_start) if r.step_start else None,
        candidate=_figures_pb(r.candidate),
        current=_figures_pb(r.current),
    )


def rollout_from_pb(o: pb.Operation) -> RolloutRecord | None:
    if not o.HasField("rollout"):
        return None
    r = o.rollout

    def figures(f: pb.RolloutFigures) -> StepFigures:
        return StepFigures(f.requests, f.errors, f.latency_p99_ms)

    return RolloutRecord(
        strategy=strategy_from_pb(r.strategy),
        phase=_PHASE_IN.get(r.phase, Phase.STARTING),
        step=max(0, r.step - 1),
        step_start=_time(r, "step_start_time"),
        candidate=figures(r.candidate),
        current=figures(r.current),
    )


def build_to_pb(b: Build) -> pb.Build:
    return pb.Build(
        name=b.name,
        version=b.version,
        source_sha256=b.source_sha256,
        file_path=b.file_path,
        function_name=b.function_name,
        comment=b.comment,
        state=_BUILD_STATE[b.state],
        image=b.image,
        error=b.error,
        create_time=timestamp(b.create_time),
        finish_time=timestamp(b.finish_time),
        runtime=runtime_to_pb(b.runtime),
        packages=[
            pb.ResolvedPackage(
                name=p.name, version=p.version, sha256=p.sha256, requested=p.requested
            )
            for p in b.packages
        ],
        cache_hit=b.cache_hit,
        image_size_bytes=b.size_bytes,
    )


def runtime_to_pb(text: str) -> pb.Runtime | None:
    rt = runtime.parse(text)
    if rt is None:
        return None
    return pb.Runtime(
        implementation=rt.implementation, python_version=rt.python_version, platform=rt.platform
    )


def runtime_from_pb(r: pb.Runtime) -> str:
    if not r.python_version:
        return ""
    return runtime.Runtime(r.implementation, r.python_version, r.platform).text()


def resources_to_pb(r: Resources) -> pb.Resources:
    return pb.Resources(
        replicas=r.replicas,
        cpus=r.cpus,
        memory_mib=r.memory_mib,
        gpus=r.gpus,
        autoscaling=autoscaling_to_pb(r.autoscaling),
    )


def replica_to_pb(r: Replica) -> pb.Replica:
    return pb.Replica(
        id=r.id,
        state=_REPLICA_STATE[r.state],
        pid=r.pid,
        node=r.node,
        start_time=timestamp(r.start_time),
    )


def deployment_to_pb(d: Deployment) -> pb.Deployment:
    return pb.Deployment(
        name=d.name,
        build=d.build,
        resources=resources_to_pb(d.resources),
        environment=dict(d.environment),
        state=_DEPLOYMENT_STATE[d.state],
        replicas=[replica_to_pb(r) for r in d.replicas],
        message=d.message,
        create_time=timestamp(d.create_time),
        update_time=timestamp(d.update_time),
        secret_environment_keys=list(d.secret_environment_keys),
        creator=d.creator,
    )


def operation_to_pb(o: Operation) -> pb.Operation:
    error = None
    if o.error is not None:
        error = status_pb2.Status(code=code_pb2.Code.Value(o.error.code), message=o.error.message)
        if o.error.reason:  # the same ErrorInfo detail an RPC error carries
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason=o.error.reason, domain=ERROR_DOMAIN))
            error.details.append(info)
    return pb.Operation(
        name=o.name,
        kind=_OPERATION_KIND[o.kind],
        target=o.target,
        done=o.done,
        error=error,
        create_time=timestamp(o.create_time),
        update_time=timestamp(o.update_time),
        model=o.model,
        progress=o.progress,
        deployment=o.deployment,
        rollout=rollout_to_pb(o.rollout),
        plan=plan_to_pb(o.plan),
    )


def source_to_pb(s: Source) -> pb.Source:
    return pb.Source(sha256=s.sha256, size_bytes=s.size_bytes)


def event_to_pb(e: Event) -> pb.ModelEvent:
    out = pb.ModelEvent(revision=e.revision, time=timestamp(e.time), type=_EVENT_TYPE[e.type])
    r = e.resource
    if isinstance(r, Model):
        out.model.CopyFrom(model_to_pb(r))
    elif isinstance(r, Build):
        out.build.CopyFrom(build_to_pb(r))
    elif isinstance(r, Deployment):
        out.deployment.CopyFrom(deployment_to_pb(r))
    elif isinstance(r, Operation):
        out.operation.CopyFrom(operation_to_pb(r))
    return out


# ---- protobuf -> domain (clients, and request fields) --------------------------------------


def resources_from_pb(r: pb.Resources) -> Resources:
    return Resources(
        replicas=r.replicas,
        cpus=r.cpus,
        memory_mib=r.memory_mib,
        gpus=r.gpus,
        autoscaling=autoscaling_from_pb(r),
    )


def _time(
    msg: pb.Model | pb.Build | pb.Deployment | pb.Operation | pb.Replica | pb.RolloutStatus,
    field: str,
) -> datetime | None:
    if not msg.HasField(field):  # type: ignore[arg-type]
        return None
    return from_timestamp(getattr(msg, field))


def _required_time(msg: pb.Model | pb.Build | pb.Deployment | pb.Operation, field: str) -> datetime:
    return _time(msg, field) or datetime.fromtimestamp(0, UTC)


def model_from_pb(m: pb.Model) -> Model:
    return Model(
        name=m.name,
        display_name=m.display_name,
        description=m.description,
        state=_MODEL_STATE_IN.get(m.state, ModelState.NOT_DEPLOYED),
        active_deployment=m.active_deployment,
        endpoint=m.endpoint,
        create_time=_required_time(m, "create_time"),
        update_time=_required_time(m, "update_time"),
        etag=m.etag,
        message=m.message,
        running_operation=m.running_operation,
        health=m.health,
        traffic=split_from_pb(m),
        scale=scale_from_pb(m),
    )


def build_from_pb(b: pb.Build) -> Build:
    return Build(
        name=b.name,
        version=b.version,
        source_sha256=b.source_sha256,
        file_path=b.file_path,
        function_name=b.function_name,
        comment=b.comment,
        state=_BUILD_STATE_IN.get(b.state, BuildState.QUEUED),
        image=b.image,
        error=b.error,
        create_time=_required_time(b, "create_time"),
        finish_time=_time(b, "finish_time"),
        runtime=runtime_from_pb(b.runtime),
        packages=tuple(Package(p.name, p.version, p.sha256, p.requested) for p in b.packages),
        cache_hit=b.cache_hit,
        size_bytes=b.image_size_bytes,
    )


def replica_from_pb(r: pb.Replica) -> Replica:
    return Replica(
        id=r.id,
        state=_REPLICA_STATE_IN.get(r.state, ReplicaState.STARTING),
        pid=r.pid,
        node=r.node,
        start_time=_time(r, "start_time"),
    )


def deployment_from_pb(d: pb.Deployment) -> Deployment:
    return Deployment(
        name=d.name,
        build=d.build,
        resources=resources_from_pb(d.resources),
        environment=dict(d.environment),
        state=_DEPLOYMENT_STATE_IN.get(d.state, DeploymentState.PENDING),
        replicas=tuple(replica_from_pb(r) for r in d.replicas),
        message=d.message,
        create_time=_required_time(d, "create_time"),
        update_time=_required_time(d, "update_time"),
        secret_environment_keys=tuple(d.secret_environment_keys),
        creator=d.creator,
    )


def operation_from_pb(o: pb.Operation) -> Operation:
    error = None
    if o.HasField("error"):
        error = OperationError(
            code=code_pb2.Code.Name(o.error.code),
            message=o.error.message,
            reason=_reason(o.error),
        )
    return Operation(
        name=o.name,
        kind=_OPERATION_KIND_IN.get(o.kind, OperationKind.CREATE_BUILD),
        target=o.target,
        done=o.done,
        error=error,
        create_time=_required_time(o, "create_time"),
        update_time=_required_time(o, "update_time"),
        model=o.model,
        progress=o.progress,
        deployment=o.deployment,
        rollout=rollout_from_pb(o),
        plan=plan_from_pb(o),
    )


def source_from_pb(s: pb.Source) -> Source:
    return Source(sha256=s.sha256, size_bytes=s.size_bytes)


def event_from_pb(e: pb.ModelEvent) -> Event:
    which = e.WhichOneof("resource")
    resource: Resource | None = None
    if which == "model":
        resource = model_from_pb(e.model)
    elif which == "build":
        resource = build_from_pb(e.build)
    elif which == "deployment":
        resource = deployment_from_pb(e.deployment)
    elif which == "operation":
        resource = operation_from_pb(e.operation)
    return Event(
        revision=e.revision,
        time=_required_time_event(e),
        type=_EVENT_TYPE_IN.get(e.type, EventType.UPDATED),
        resource=resource,
        model=getattr(resource, "model", "") if isinstance(resource, Operation) else "",
    )


def _required_time_event(e: pb.ModelEvent) -> datetime:
    return from_timestamp(e.time) if e.HasField("time") else datetime.fromtimestamp(0, UTC)


def _reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def token_to_pb(tok: Token) -> pb.Token:
    return pb.Token(
        name=tok.name,
        role=pb.Role.ValueType(int(tok.role)),
        description=tok.description,
        create_time=timestamp(tok.create_time),
        expire_time=timestamp(tok.expire_time),
        revoked=tok.revoked,
        creator=tok.creator,
    )


def audit_to_pb(r: AuditRecord) -> pb.AuditRecord:
    return pb.AuditRecord(
        id=r.id,
        time=timestamp(r.time),
        principal=r.principal,
        method=r.method,
        resource=r.resource,
        project=r.project,
        code=r.code,
        peer=r.peer,
        operation=r.operation,
    )


def caller_to_pb(who: Principal) -> rpc.Caller:
    return rpc.Caller(
        principal=who.name, project=who.project, role=pb.Role.ValueType(int(who.role))
    )


def caller_from_pb(msg: rpc.Caller) -> Principal:
    return Principal(msg.principal, msg.project, Role(int(msg.role)))


def token_from_pb(tok: pb.Token) -> Token:
    return Token(
        name=tok.name,
        role=Role(int(tok.role)),
        description=tok.description,
        create_time=from_timestamp(tok.create_time),
        expire_time=from_timestamp(tok.expire_time) if tok.HasField("expire_time") else None,
        revoked=tok.revoked,
        creator=tok.creator,
    )


def audit_from_pb(r: pb.AuditRecord) -> AuditRecord:
    return AuditRecord(
        id=r.id,
        time=from_timestamp(r.time),
        principal=r.principal,
        method=r.method,
        resource=r.resource,
        project=r.project,
        code=r.code,
        peer=r.peer,
        operation=r.operation,
    )


def key_to_pb(k: InvocationKey) -> pb.InvocationKey:
    return pb.InvocationKey(
        name=k.name,
        description=k.description,
        create_time=timestamp(k.create_time),
        revoked=k.revoked,
        creator=k.creator,
    )


def key_from_pb(k: pb.InvocationKey) -> InvocationKey:
    return InvocationKey(
        name=k.name,
        description=k.description,
        create_time=from_timestamp(k.create_time),
        revoked=k.revoked,
        creator=k.creator,
    )


# ---- signals ---------------------------------------------------------------------------------


def _figures_to_pb(f: Figures) -> rpc.MetricFigures:
    # Figures and MetricFigures have the same fields, by name (both ways).
    return rpc.MetricFigures(**{k: getattr(f, k) for k in Figures.__dataclass_fields__})


def _points_to_pb(s: Series) -> list[rpc.MetricPoint]:
    return [
        rpc.MetricPoint(
            time=timestamp(datetime.fromtimestamp(p.time, UTC)), figures=_figures_to_pb(p.figures)
        )
        for p in s.points
    ]


def metrics_to_pb(name: str, m: ModelSeries, health: str) -> rpc.ModelMetrics:
    return rpc.ModelMetrics(
        name=name,
        start_time=timestamp(datetime.fromtimestamp(m.start, UTC)),
        end_time=timestamp(datetime.fromtimestamp(m.end, UTC)),
        step=duration_pb2.Duration(seconds=m.step_s),
        totals=_figures_to_pb(m.model.totals),
        points=_points_to_pb(m.model),
        builds=[
            rpc.BuildMetrics(build=b, totals=_figures_to_pb(s.totals), points=_points_to_pb(s))
            for b, s in m.builds.items()
        ],
        replicas=[
            rpc.ReplicaMetrics(
                replica_id=r.replica,
                build=r.build,
                node=r.node,
                pid=r.pid,
                running=r.running,
                totals=_figures_to_pb(r.series.totals),
                points=_points_to_pb(r.series),
            )
            for r in m.replicas
        ],
        health=health,
    )


def log_line_to_pb(line: LogLine) -> rpc.ModelLogLine:
    return rpc.ModelLogLine(
        time=timestamp(line.time),
        replica_id=line.replica,
        build=line.build,
        node=line.node,
        stream=line.stream,
        text=line.text,
        request_id=line.request_id,
        number=line.id,
    )


def _figures_from_pb(f: rpc.MetricFigures) -> Figures:
    return Figures(**{k: getattr(f, k) for k in Figures.__dataclass_fields__})


def _series_from_pb(totals: rpc.MetricFigures, points: Sequence[rpc.MetricPoint]) -> Series:
    return Series(
        _figures_from_pb(totals),
        tuple(Point(p.time.ToSeconds(), _figures_from_pb(p.figures)) for p in points),
    )


def metrics_from_pb(m: rpc.ModelMetrics) -> ModelMetrics:
    return ModelMetrics(
        name=m.name,
        health=m.health,
        series=ModelSeries(
            app="",
            start=m.start_time.ToSeconds(),
            end=m.end_time.ToSeconds(),
            step_s=int(m.step.ToSeconds()),
            model=_series_from_pb(m.totals, m.points),
            builds={b.build: _series_from_pb(b.totals, b.points) for b in m.builds},
            replicas=tuple(
                ReplicaSeries(
                    replica=r.replica_id,
                    build=r.build,
                    node=r.node,
                    pid=r.pid,
                    running=r.running,
                    series=_series_from_pb(r.totals, r.points),
                )
                for r in m.replicas
            ),
        ),
    )


def log_line_from_pb(m: rpc.ModelLogLine, model: str) -> LogLine:
    return LogLine(
        id=m.number,
        model=model,
        replica=m.replica_id,
        seq=0,
        build=m.build,
        node=m.node,
        time=from_timestamp(m.time),
        stream=m.stream,
        request_id=m.request_id,
        text=m.text,
    )
