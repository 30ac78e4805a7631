"""Every plan held against what real Serve then does, on a Ray cluster of two nodes.

A head (2 CPUs, no GPU) and a second node (2 CPUs, 2 logical GPUs) on this machine, and
a `modelctl serve` joining them, serving the iris classifier (examples/iris-v1, then
iris-v2). For each change class (START, IN_PLACE, ROLLING, RESTART, REBUILD, STOP) the
plan asked with validate_only is compared with the replicas before and after the change
(ids and pids kept, replaced or added, the node of each); GPU replicas go to the node with
GPUs; a change whose replicas fit in the cluster's free CPUs in total but on no single
node is refused up front; autoscaling bounds change in place, and an idle model scales to
zero and answers its next request."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import EXAMPLES, eventually, ray_nodes
from tests.helpers.api import Stub, error_info, resources, upload, wait
from tests.helpers.ray_cluster import IRIS
from tests.helpers.servers import Cluster, free_port

pytestmark = [pytest.mark.ray]

SECOND = "127.0.0.2"  # the node with GPUs; the head's address is the machine's own


def head(plan: pb.Plan) -> str:
    (found,) = {n.node for n in plan.capacity.nodes} - {SECOND}
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with ray_nodes.two_nodes(cpus=2, second_gpus=2) as address:
        yield address


@dataclass
class World:
    stub: Stub
    http: httpx.AsyncClient
    model: str


@pytest.fixture(scope="module")
async def w(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    data = tmp_path_factory.mktemp("cp-capacity")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # the server's driver joins that head
        server = Cluster(
            data / "data",
            f"sqlite:///{data}/cp.db",
            "capacity",
            backend="ray",
            extra=[
                f"--ray-address={cluster}",
                f"--http-port={free_port()}",
                "--deploy-timeout=120",
            ],
        )
        server.start()
    try:
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            httpx.AsyncClient(timeout=60) as http,
        ):
            stub = Stub(channel)
            m = await stub.CreateModel(
                rpc.CreateModelRequest(parent="projects/cap", model_id="iris")
            )
            yield World(stub, http, m.name)
    finally:
        server.kill()


def example(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted((EXAMPLES / name).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, f.relative_to(EXAMPLES / name).as_posix())
    return buf.getvalue()


def build_request(
    w: World, sha: str, res: pb.Resources, validate_only: bool = False, function: str = "predict"
) -> rpc.CreateBuildRequest:
    return rpc.CreateBuildRequest(
        parent=w.model,
        source_sha256=sha,
        file_path="model.py",
        function_name=function,
        deploy=rpc.DeployOptions(resources=res),
        validate_only=validate_only,
    )


@dataclass(frozen=True)
class Seen:
    """The serving deployment's replicas: id -> (pid, node)."""

    deployment: str
    replicas: dict[str, tuple[int, str]]


async def seen(w: World) -> Seen:
    m = await w.stub.GetModel(rpc.GetModelRequest(name=w.model))
    if not m.active_deployment:
        return Seen("", {})
    d = await w.stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    live = (pb.REPLICA_STATE_RUNNING, pb.REPLICA_STATE_STARTING)
    return Seen(d.name, {r.id: (r.pid, r.node) for r in d.replicas if r.state in live})


async def settled(w: World, n: int) -> Seen:
    """Once the serving deployment lists exactly ``n`` replicas, all running."""

    async def check() -> Seen:
        m = await w.stub.GetModel(rpc.GetModelRequest(name=w.model))
        d = await w.stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
        running = [r for r in d.replicas if r.state == pb.REPLICA_STATE_RUNNING]
        assert len(d.replicas) == n == len(running), d.replicas
        assert m.state == pb.MODEL_STATE_DEPLOYED, m
        return await seen(w)

    return await eventually(f"{n} replicas running", check, 120)


def holds(plan: pb.Plan, before: Seen, after: Seen) -> None:
    """The plan's counts are what happened to the replicas (ids, with their pids)."""
    assert sorted(plan.current_replicas) == sorted(before.replicas)
    kept = {i for i in before.replicas if after.replicas.get(i) == before.replicas[i]}
    gone = set(before.replicas) - set(after.replicas)
    new = set(after.replicas) - set(before.replicas)
    assert len(kept) == plan.replicas_kept, (plan, before, after)
    assert len(gone) == plan.replicas_replaced + plan.replicas_removed, (plan, before, after)
    assert len(new) == plan.replicas_replaced + plan.replicas_added, (plan, before, after)
    assert len(after.replicas) == plan.replicas_after
    if plan.HasField("capacity"):
        assert plan.capacity.fits, plan.capacity.reason
        placed = {n.node: n.new_replicas for n in plan.capacity.nodes}
        assert len(plan.capacity.nodes) == 2 and SECOND in placed
        assert sum(placed.values()) == len(new)


async def deploy(
    w: World, res: pb.Resources, build: str = "1", validate_only: bool = False
) -> pb.Operation:
    op: pb.Operation = await w.stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=w.model,
            build=f"{w.model}/builds/{build}",
            resources=res,
            validate_only=validate_only,
        )
    )
    return op


async def changed(w: World, op: pb.Operation) -> None:
    done = await wait(w.stub, op, 180)
    assert not done.HasField("error"), done.error


async def test_each_plan_is_what_serve_then_does(w: World) -> None:
    v1 = await upload(w.stub, w.model, example("iris-v1"))
    # START: nothing serves; two replicas of 0.5 CPU.
    first = await w.stub.CreateBuild(
        build_request(w, v1.sha256, resources(2, cpus=0.5), validate_only=True)
    )
    assert first.plan.change_class == pb.CHANGE_CLASS_REBUILD and first.plan.replicas_added == 2
    await changed(w, await w.stub.CreateBuild(build_request(w, v1.sha256, resources(2, cpus=0.5))))
    before = await settled(w, 2)
    holds(first.plan, Seen("", {}), before)

    # IN_PLACE: one more replica; the two keep their ids and pids.
    plan = (await deploy(w, resources(3, cpus=0.5), validate_only=True)).plan
    assert plan.change_class == pb.CHANGE_CLASS_IN_PLACE and plan.replicas_added == 1
    await changed(w, await deploy(w, resources(3, cpus=0.5)))
    after = await settled(w, 3)
    holds(plan, before, after)

    # ROLLING: less CPU each, every replica replaced.
    before = after
    plan = (await deploy(w, resources(3, cpus=0.25), validate_only=True)).plan
    assert plan.change_class == pb.CHANGE_CLASS_ROLLING
    assert [c.field for c in plan.causes] == ["resources.cpus"] and plan.replicas_replaced == 3
    await changed(w, await deploy(w, resources(3, cpus=0.25)))
    after = await settled(w, 3)
    holds(plan, before, after)

    # RESTART: the same replicas re-initialized.
    before = after
    plan = (
        await w.stub.RestartModel(rpc.RestartModelRequest(name=w.model, validate_only=True))
    ).plan
    assert plan.change_class == pb.CHANGE_CLASS_RESTART and plan.replicas_replaced == 3
    await changed(w, await w.stub.RestartModel(rpc.RestartModelRequest(name=w.model)))
    after = await settled(w, 3)
    holds(plan, before, after)

    # REBUILD: iris-v2 (its entry function renamed `classify`) built and rolled out.
    before = after
    v2 = await upload(w.stub, w.model, example("iris-v2"))
    plan = (
        await w.stub.CreateBuild(
            build_request(w, v2.sha256, resources(3, cpus=0.25), True, "classify")
        )
    ).plan
    assert plan.change_class == pb.CHANGE_CLASS_REBUILD and plan.replicas_replaced == 3
    v2_build = build_request(w, v2.sha256, resources(3, cpus=0.25), function="classify")
    await changed(w, await w.stub.CreateBuild(v2_build))
    after = await settled(w, 3)
    holds(plan, before, after)


async def test_gpu_replicas_go_to_the_node_with_gpus_and_none_is_split(w: World) -> None:
    before = await settled(w, 3)
    gpus = resources(2, cpus=0.25, gpus=1)
    plan = (await deploy(w, gpus, build="2", validate_only=True)).plan
    assert plan.change_class == pb.CHANGE_CLASS_ROLLING
    placed = {n.node: n.new_replicas for n in plan.capacity.nodes}
    assert placed == {head(plan): 0, SECOND: 2}, plan.capacity
    await changed(w, await deploy(w, gpus, build="2"))
    after = await settled(w, 2)
    holds(plan, before, after)
    assert {node for _, node in after.replicas.values()} == {SECOND}

    # A third of 1 GPU (in place: one more): the cluster's 2 GPUs are taken.
    async def refused() -> bool:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await deploy(w, resources(3, cpus=0.25, gpus=1), build="2")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(e.value)[0] == "INSUFFICIENT_CAPACITY"
        said = str(e.value.details())
        assert "1 of 1 new replicas (0.25 CPU, 1 GPU each) fit on no node" in said
        # What each node has free is Ray's view, which lags a moment behind the replicas
        # that just stopped (refused: nothing changes, so asking again is harmless).
        assert f"{SECOND} 1.5/2 CPU 0/2 GPU" in said, said
        return True

    await eventually("refused, with what each node has free", refused, 30)

    # Three of 1.2 CPU: 4 CPUs are free in all once the GPU replicas go, but a replica is
    # never split over nodes: one fits on each node.
    plan = (await deploy(w, resources(3, cpus=1.2), build="2", validate_only=True)).plan
    assert not plan.capacity.fits and plan.capacity.replicas_placed == 2
    assert "1 of 3 new replicas (1.2 CPU each) fit on no node" in plan.capacity.reason
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await deploy(w, resources(3, cpus=1.2), build="2")
    assert error_info(e.value)[0] == "INSUFFICIENT_CAPACITY"
    assert await seen(w) == after  # refused: nothing changed

    # Two of 1.2 CPU fit, one on each node.
    before = after
    plan = (await deploy(w, resources(2, cpus=1.2), build="2", validate_only=True)).plan
    assert plan.capacity.fits
    assert {n.node: n.new_replicas for n in plan.capacity.nodes} == {head(plan): 1, SECOND: 1}
    await changed(w, await deploy(w, resources(2, cpus=1.2), build="2"))
    after = await settled(w, 2)
    holds(plan, before, after)
    assert sorted(node for _, node in after.replicas.values()) == sorted([head(plan), SECOND])


async def test_autoscaling_in_place_scale_to_zero_and_stop(w: World) -> None:
    before = await settled(w, 2)
    auto = resources(0, cpus=0.25)
    auto.autoscaling.CopyFrom(
        pb.Autoscaling(
            min_replicas=1, max_replicas=3, target_ongoing_requests=2, downscale_delay_s=600
        )
    )
    # Less CPU each: a rolling change; then autoscaling bounds and target, in place.
    await changed(w, await deploy(w, resources(2, cpus=0.25), build="2"))
    before = await settled(w, 2)
    plan = (await deploy(w, auto, build="2", validate_only=True)).plan
    assert plan.change_class == pb.CHANGE_CLASS_IN_PLACE and plan.replicas_kept == 2
    await changed(w, await deploy(w, auto, build="2"))
    after = await settled(w, 2)
    holds(plan, before, after)
    auto.autoscaling.target_ongoing_requests = 4
    await changed(w, await deploy(w, auto, build="2"))
    assert (await settled(w, 2)).replicas == after.replicas  # a new target: the same replicas

    # Scale to zero: min 0, a short downscale delay.
    auto.autoscaling.min_replicas = 0
    auto.autoscaling.downscale_delay_s = 1
    await changed(w, await deploy(w, auto, build="2"))

    async def at_zero() -> pb.Model:
        m = await w.stub.GetModel(rpc.GetModelRequest(name=w.model))
        assert (m.scale.running_replicas, m.scale.desired_replicas) == (0, 0), m.scale
        return m

    m = await eventually("scaled to zero", at_zero, 120)
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert "idle for the downscale delay (1s)" in m.scale.last_decision.reason
    answer = await w.http.post(m.endpoint, json=IRIS)  # waits for a replica to start
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"]["classes"] == ["setosa", "virginica"]

    async def one_again() -> pb.Model:
        m = await w.stub.GetModel(rpc.GetModelRequest(name=w.model))
        assert m.scale.running_replicas >= 1, m.scale
        return m

    m = await eventually("a replica after the first request", one_again, 60)
    assert m.scale.last_decision.from_replicas == 0

    # Back to a fixed count, in place; then stop: every replica goes.
    before = await seen(w)
    await changed(w, await deploy(w, resources(len(before.replicas), cpus=0.25), build="2"))
    kept = await settled(w, len(before.replicas))
    assert {i: v for i, v in kept.replicas.items() if i in before.replicas} == before.replicas
    stop = await w.stub.StopModel(rpc.StopModelRequest(name=w.model, validate_only=True))
    assert stop.plan.change_class == pb.CHANGE_CLASS_STOP
    assert stop.plan.replicas_removed == len(kept.replicas)
    await changed(w, await w.stub.StopModel(rpc.StopModelRequest(name=w.model)))
    m = await w.stub.GetModel(rpc.GetModelRequest(name=w.model))
    assert m.state == pb.MODEL_STATE_STOPPED
