"""Capacity through gRPC on the fake backend, on SQLite and PostgreSQL records: plans
(validate_only) that write nothing and say what each change does, changes refused up
front when the cluster has no room (unless asked to wait), and autoscaling: bounds that
change in place, the scale a model shows, scale to zero, and bad bounds.
(tests/ray/test_capacity_ray.py holds each plan against what real Serve then does.)"""

from __future__ import annotations

import grpc
import pytest

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    MODEL_V1,
    Stub,
    build,
    create_model,
    error_info,
    resources,
    start_build,
    wait,
)
from workers.backend import app_name_for
from workers.fake_backend import FakeBackend


def autoscaled(
    lo: int, hi: int, replicas: int = 0, target: float = 2.0, cpus: float = 0.0
) -> pb.Resources:
    r = resources(replicas, cpus=cpus)
    r.autoscaling.CopyFrom(
        pb.Autoscaling(
            min_replicas=lo,
            max_replicas=hi,
            target_ongoing_requests=target,
            upscale_delay_s=0,
            downscale_delay_s=0,
        )
    )
    return r


async def serving(stub: Stub, project: str, res: pb.Resources) -> pb.Model:
    model = await create_model(stub, project)
    op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=res))
    assert not op.HasField("error"), op.error
    return await stub.GetModel(rpc.GetModelRequest(name=model.name))


async def replica_ids(stub: Stub, model: pb.Model) -> list[str]:
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    return sorted(r.id for r in dep.replicas)


async def records(stub: Stub, project: str, model: str) -> tuple[object, ...]:
    """Everything a change would write; the last item is the count of audit records."""
    m = await stub.GetModel(rpc.GetModelRequest(name=model))
    deps = await stub.ListDeployments(rpc.ListDeploymentsRequest(parent=model))
    builds = await stub.ListBuilds(rpc.ListBuildsRequest(parent=model))
    ops = await stub.ListOperations(rpc.ListOperationsRequest(parent=model))
    audit = await stub.ListAuditRecords(rpc.ListAuditRecordsRequest(parent=project))
    return (
        m.etag,
        m.active_deployment,
        [d.name for d in deps.deployments],
        [b.name for b in builds.builds],
        [o.name for o in ops.operations],
        len(audit.records),
    )


async def test_plans_say_what_each_change_does_and_write_nothing(stub: Stub, project: str) -> None:
    model = await serving(stub, project, resources(2, cpus=0.5))
    before = await records(stub, project, model.name)
    ids = await replica_ids(stub, model)
    b1 = f"{model.name}/builds/1"

    async def deploy_plan(res: pb.Resources, **more: object) -> pb.Operation:
        return await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name,
                build=b1,
                resources=res,
                validate_only=True,
                **more,  # type: ignore[arg-type]
            )
        )

    more = await deploy_plan(resources(3, cpus=0.5))
    assert more.name == "" and more.done and not more.HasField("error")
    p = more.plan
    assert p.change_class == pb.CHANGE_CLASS_IN_PLACE
    assert [(c.field, c.before, c.after) for c in p.causes] == [("resources.replicas", "2", "3")]
    assert sorted(p.current_replicas) == ids
    counts = (p.replicas_kept, p.replicas_replaced, p.replicas_added, p.replicas_after)
    assert counts == (2, 0, 1, 3)
    assert p.capacity.fits and p.capacity.replicas_to_place == 1
    assert [n.node for n in p.capacity.nodes] == ["fake-node"]
    assert p.capacity.nodes[0].new_replicas == 1 and p.capacity.cpus_per_replica == 0.5
    assert p.summary.startswith("in place: 2 kept, 1 added")

    cpu = (await deploy_plan(resources(2, cpus=1.0))).plan
    assert cpu.change_class == pb.CHANGE_CLASS_ROLLING
    assert [(c.field, c.before, c.after) for c in cpu.causes] == [("resources.cpus", "0.5", "1")]
    assert (cpu.replicas_replaced, cpu.replicas_kept) == (2, 0)

    env = (
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name,
                build=b1,
                environment={"MODE": "fast"},
                validate_only=True,
            )
        )
    ).plan
    assert env.change_class == pb.CHANGE_CLASS_ROLLING  # the same resources, kept
    assert [c.field for c in env.causes] == ["environment[MODE]"]

    restart = await stub.RestartModel(rpc.RestartModelRequest(name=model.name, validate_only=True))
    assert restart.plan.change_class == pb.CHANGE_CLASS_RESTART
    assert restart.plan.replicas_replaced == 2 and restart.kind == pb.OPERATION_KIND_RESTART_MODEL

    stop = await stub.StopModel(rpc.StopModelRequest(name=model.name, validate_only=True))
    assert stop.plan.change_class == pb.CHANGE_CLASS_STOP and stop.plan.replicas_removed == 2

    src = await start_build(
        stub,
        model.name,
        {"model.py": MODEL_V1},
        deploy=rpc.DeployOptions(resources=resources(2, cpus=0.5)),
        validate_only=True,
    )
    assert src.plan.change_class == pb.CHANGE_CLASS_REBUILD and src.plan.replicas_replaced == 2

    after = await records(stub, project, model.name)
    assert after[:5] == before[:5]
    assert after[5] == int(str(before[5])) + 1  # the upload's record; no plan leaves one
    assert await replica_ids(stub, model) == ids


async def test_a_plan_is_checked_like_the_change(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    with pytest.raises(grpc.aio.AioRpcError) as e:  # never deployed: nothing to restart
        await stub.RestartModel(rpc.RestartModelRequest(name=model.name, validate_only=True))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await start_build(stub, model.name, {"model.py": MODEL_V1}, validate_only=True)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(e.value)[0] == "NOTHING_TO_PLAN"
    op = await build(stub, model.name)  # built, not deployed
    first = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=model.name, build=op.target, resources=resources(2), validate_only=True
        )
    )
    assert first.plan.change_class == pb.CHANGE_CLASS_START
    assert (first.plan.replicas_added, first.plan.replicas_after) == (2, 2)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name, build=op.target, resources=resources(0), validate_only=True
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_change_with_no_room_is_refused_up_front_unless_it_may_wait(
    stub: Stub, project: str
) -> None:
    model = await serving(stub, project, resources(1))
    before = await records(stub, project, model.name)
    big = resources(2, gpus=1.5)  # the fake cluster has 2 GPUs: one replica fits
    request = rpc.CreateDeploymentRequest(
        parent=model.name, build=f"{model.name}/builds/1", resources=big
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateDeployment(request)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, meta, _ = error_info(e.value)
    assert reason == "INSUFFICIENT_CAPACITY"
    assert meta["replicas_to_place"] == "2" and meta["replicas_placed"] == "1"
    assert "1 of 2 new replicas (0 CPU, 1.5 GPU each) fit on no node" in str(e.value.details())
    assert "fake-node 8/8 CPU 2/2 GPU" in str(e.value.details())
    after = await records(stub, project, model.name)
    assert after[:5] == before[:5]  # only the refusal's audit record is new

    plan = (await stub.CreateDeployment(_with(request, validate_only=True))).plan
    assert not plan.capacity.fits and plan.capacity.replicas_placed == 1
    assert "does not fit" in plan.summary

    op = await stub.CreateDeployment(_with(request, wait_for_capacity=True))
    assert op.name  # started: its replicas wait for room until the placement deadline
    op = await wait(stub, op)
    assert op.HasField("error") and "GPU" in op.error.message


def _with(req: rpc.CreateDeploymentRequest, **fields: bool) -> rpc.CreateDeploymentRequest:
    out = rpc.CreateDeploymentRequest()
    out.CopyFrom(req)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


async def test_autoscaling_changes_in_place_and_the_model_shows_its_scale(
    stub: Stub, project: str, server: Server
) -> None:
    fake = server.backend
    assert isinstance(fake, FakeBackend)
    model = await serving(stub, project, resources(2))
    ids = await replica_ids(stub, model)
    app = app_name_for(project.split("/")[1], "iris")
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert (m.scale.desired_replicas, m.scale.running_replicas) == (2, 2)
    assert not m.scale.autoscaled
    assert m.scale.last_decision.reason == "deployment 1: fixed at 2 replicas"

    plan = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=model.name,
            build=f"{model.name}/builds/1",
            resources=autoscaled(1, 4),
            validate_only=True,
        )
    )
    assert plan.plan.change_class == pb.CHANGE_CLASS_IN_PLACE
    assert plan.plan.replicas_kept == 2 and plan.plan.capacity.room_for_replicas == 4
    op = await wait(
        stub,
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name, build=f"{model.name}/builds/1", resources=autoscaled(1, 4)
            )
        ),
    )
    assert not op.HasField("error"), op.error
    assert await replica_ids(stub, model) == ids  # switched to autoscaling in place
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert dep.resources.autoscaling.max_replicas == 4
    assert dep.resources.autoscaling.downscale_delay_s == 0

    fake.load[app] = 7.0  # 7 in flight at a target of 2: 4 replicas

    async def scaled_to(n: int) -> pb.Model:
        m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
        assert (m.scale.desired_replicas, m.scale.running_replicas) == (n, n), m.scale
        return m

    m = await eventually("the autoscaler's 4 replicas", lambda: scaled_to(4))
    assert m.scale.autoscaled and m.state == pb.MODEL_STATE_DEPLOYED
    d = m.scale.last_decision
    assert (d.from_replicas, d.to_replicas) == (2, 4)
    assert d.reason.startswith("autoscaler:") and "above the target of 2" in d.reason
    after = await replica_ids(stub, model)
    assert set(ids) <= set(after) and len(after) == 4
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert "unexpectedly" not in dep.message

    fake.load[app] = 0.0  # idle: down to its minimum, and no replica "stopped unexpectedly"
    m = await eventually("back to 1 replica", lambda: scaled_to(1))
    assert m.scale.last_decision.reason.startswith("autoscaler:")
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert "unexpectedly" not in dep.message and len(dep.replicas) == 1

    # Back to a fixed count: in place too.
    kept = await replica_ids(stub, model)
    op = await wait(
        stub,
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name, build=f"{model.name}/builds/1", resources=resources(1)
            )
        ),
    )
    assert not op.HasField("error") and await replica_ids(stub, model) == kept


async def test_an_idle_model_scales_to_zero_and_stays_deployed(
    stub: Stub, project: str, server: Server
) -> None:
    fake = server.backend
    assert isinstance(fake, FakeBackend)
    model = await serving(stub, project, autoscaled(0, 2))
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.scale.desired_replicas == 1  # a deploy starts one, proving the build loads
    fake.load[app_name_for(project.split("/")[1], "iris")] = 0.0

    async def at_zero() -> pb.Model:
        m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
        assert (m.scale.running_replicas, m.scale.desired_replicas) == (0, 0), m.scale
        return m

    m = await eventually("scaled to zero", at_zero)
    assert m.state == pb.MODEL_STATE_DEPLOYED and m.endpoint
    assert m.scale.last_decision.reason == "autoscaler: idle for the downscale delay (0s)"
    # Stop and restart keep their meaning at zero.
    plan = await stub.RestartModel(rpc.RestartModelRequest(name=model.name, validate_only=True))
    assert plan.plan.change_class == pb.CHANGE_CLASS_RESTART and plan.plan.replicas_replaced == 0
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
    assert not op.HasField("error"), op.error
    op = await wait(stub, await stub.StopModel(rpc.StopModelRequest(name=model.name)))
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_STOPPED and not m.HasField("scale")


@pytest.mark.parametrize(
    ("res", "field"),
    [
        (autoscaled(3, 2), "resources.autoscaling.max_replicas"),
        (autoscaled(0, 0), "resources.autoscaling.max_replicas"),
        (autoscaled(1, 2, target=0), "resources.autoscaling.target_ongoing_requests"),
        (autoscaled(1, 2, replicas=5), "resources.replicas"),
    ],
)
async def test_bad_bounds_are_invalid_arguments(
    stub: Stub, project: str, res: pb.Resources, field: str
) -> None:
    model = await create_model(stub, project)
    op = await build(stub, model.name)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model.name, build=op.target, resources=res)
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, meta, violations = error_info(e.value)
    assert meta["field"] == field and field in violations
