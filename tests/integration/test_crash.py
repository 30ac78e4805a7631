"""Crash consistency: `kill -9` of the server at every step of every operation.

Each test runs real `modelctl serve` processes (the fake backend, whose simulated
cluster outlives the server as a Ray cluster would) on SQLite and on PostgreSQL.
For every fail point an operation passes, it arms the point, starts the operation
(with a request_id, so a client whose reply was lost in the crash retries safely),
watches the server die there, starts it again, and checks what a user would:

- the operation completes exactly once, without error, and its retry returns it;
- records match what runs: the cluster holds exactly the models that should serve,
  with the active deployment's spec and replicas (no orphan application);
- a watcher that followed the first server and resumes on the second from its last
  revision sees every event exactly once, in order;
- no job is left pending or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from controlplane import failpoints
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, resources, upload, wait, zip_bytes
from tests.helpers.servers import Cluster, channel, metric

pytestmark = pytest.mark.slow  # server processes killed and started again, many times

MODEL = "def predict(body):\n    return {'echo': body}\n"

BUILD_STEPS = ("job.claimed", "build.started", "build.finished", "build.recorded", "job.done")
APPLY_STEPS = (
    "job.claimed",
    "apply.prepared",
    "apply.applied",
    "apply.marked",
    "reconcile.writing",
    "job.done",
)
BUILD_DEPLOY_STEPS = BUILD_STEPS[:-1] + APPLY_STEPS[1:]


def test_the_matrix_covers_every_fail_point() -> None:
    covered = set(BUILD_STEPS) | set(APPLY_STEPS) | set(BUILD_DEPLOY_STEPS)
    assert covered | {"rpc.committed"} == set(failpoints.STEPS)  # and the audit test below


@pytest.fixture
async def cluster(tmp_path: Path, fresh_db: str) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path / "data", fresh_db, extra=["--metrics-port=0"])  # its watchers
    c.start()
    yield c
    c.kill()


async def follow(stub: Stub, model: str, since: int, seen: list[pb.ModelEvent]) -> None:
    """Appends every event (not BOOKMARKs) until the stream ends (the server died)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for event in stub.WatchModel(rpc.WatchModelRequest(name=model, since_revision=since)):
            if event.type != pb.EVENT_TYPE_BOOKMARK:
                seen.append(event)


async def head_revision(stub: Stub, model: str) -> int:
    """The latest revision: the BOOKMARK that ends a watch's snapshot carries it."""
    call = stub.WatchModel(rpc.WatchModelRequest(name=model))
    try:
        async for event in call:
            if event.type == pb.EVENT_TYPE_BOOKMARK:
                return int(event.revision)
    finally:
        call.cancel()
    raise AssertionError("the watch ended before its snapshot's BOOKMARK")


async def watchers(c: Cluster) -> float:
    """Watch streams open on the server (its modelctl_watchers gauge)."""
    return await metric(c.metrics, "modelctl_watchers")


Change = Callable[[Stub, str], Awaitable[pb.Operation]]


async def crash_at(c: Cluster, model: str, step: str, change: Change) -> pb.Operation:
    """Arms ``step``, makes ``change``, watches the server die there, starts it again;
    returns the operation once the new server has finished it."""
    async with channel(c) as stub:
        since = await head_revision(stub, model)

        async def none_open() -> bool:  # the watches before this one closed
            return await watchers(c) == 0

        await eventually("every earlier watch closed", none_open)
        seen: list[pb.ModelEvent] = []
        watcher = asyncio.create_task(follow(stub, model, since, seen))
        await eventually("the watch open", lambda: watchers(c))
        c.arm(step)
        with contextlib.suppress(grpc.aio.AioRpcError):  # the reply may die with the server
            await change(stub, model)
        assert await c.died() == -9, f"the server did not die at {step}"
        await watcher
    c.start()
    async with channel(c) as stub:
        op = await change(stub, model)  # the retry: same request_id, the same operation
        op = await wait(stub, op, 60)
        assert not op.HasField("error"), f"{step}: {op.error}"
        # Resume the watch from the last revision the first watcher saw.
        last = seen[-1].revision if seen else since
        resumed: list[pb.ModelEvent] = []
        head = await head_revision(stub, model)
        rest = asyncio.create_task(follow(stub, model, last, resumed))
        await eventually(
            "the resumed watch up to the head",
            lambda: last >= head or (resumed and resumed[-1].revision >= head),
        )
        rest.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rest
        replay: list[pb.ModelEvent] = []
        full = asyncio.create_task(follow(stub, model, since, replay))
        await eventually(
            "the full replay up to the head", lambda: replay and replay[-1].revision >= head
        )
        full.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await full
        got = [e.revision for e in seen + resumed if e.revision <= head]
        assert got == [e.revision for e in replay if e.revision <= head], step
        assert len(got) == len(set(got)), f"{step}: an event was delivered twice"
        done = [
            e
            for e in replay
            if e.WhichOneof("resource") == "operation"
            and e.operation.name == op.name
            and e.operation.done
        ]
        assert len(done) == 1, f"{step}: the operation finished {len(done)} times"
    return op


async def settle(c: Cluster, model: str) -> pb.Model:
    async with channel(c) as stub:
        await eventually("every job finished", lambda: c.unfinished_jobs() == 0)
        m: pb.Model = await stub.GetModel(rpc.GetModelRequest(name=model))
        apps = c.running_apps()
        app = apps.get(model.split("/")[1] + "." + model.split("/")[3])
        if m.state == pb.MODEL_STATE_DEPLOYED:
            dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
            assert app is not None, "a DEPLOYED model has no application"
            spec = app["spec"]
            assert isinstance(spec, dict) and spec["deployment_name"] == dep.name
            assert spec["replicas"] == dep.resources.replicas
            assert spec["cpus"] == dep.resources.cpus
            replicas = app["replicas"]
            assert isinstance(replicas, list)
            assert sorted(r["id"] for r in replicas) == sorted(r.id for r in dep.replicas)
        else:
            assert app is None, f"orphan application for a {pb.ModelState.Name(m.state)} model"
        return m


async def setup_model(c: Cluster, deploy: bool) -> tuple[str, str]:
    async with channel(c) as stub:
        model = await stub.CreateModel(
            rpc.CreateModelRequest(parent="projects/crash", model_id="m")
        )
        src = await upload(stub, model.name, zip_bytes({"model.py": MODEL}))
        if deploy:
            op = await stub.CreateBuild(
                rpc.CreateBuildRequest(
                    parent=model.name,
                    source_sha256=src.sha256,
                    file_path="model.py",
                    function_name="predict",
                    deploy=rpc.DeployOptions(resources=resources(2, cpus=0.5)),
                )
            )
            op = await wait(stub, op)
            assert not op.HasField("error"), op.error
        return model.name, src.sha256


def request_id() -> str:
    return uuid.uuid4().hex


async def test_build_survives_a_crash_at_every_step(cluster: Cluster) -> None:
    model, sha = await setup_model(cluster, deploy=False)
    for i, step in enumerate(BUILD_STEPS, start=1):
        rid = request_id()

        async def change(stub: Stub, model: str, rid: str = rid) -> pb.Operation:
            op: pb.Operation = await stub.CreateBuild(
                rpc.CreateBuildRequest(
                    parent=model,
                    source_sha256=sha,
                    file_path="model.py",
                    function_name="predict",
                    request_id=rid,
                )
            )
            return op

        op = await crash_at(cluster, model, step, change)
        assert op.target == f"{model}/builds/{i}", step
        await settle(cluster, model)
        async with channel(cluster) as stub:
            build = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
            assert build.state == pb.BUILD_STATE_BUILT and build.image, step
            builds = await stub.ListBuilds(rpc.ListBuildsRequest(parent=model))
            assert len(builds.builds) == i, f"{step}: a build ran twice or was lost"


async def test_build_and_deploy_survives_a_crash_at_every_step(cluster: Cluster) -> None:
    model, sha = await setup_model(cluster, deploy=False)
    for i, step in enumerate(BUILD_DEPLOY_STEPS, start=1):
        rid = request_id()

        async def change(stub: Stub, model: str, rid: str = rid, i: int = i) -> pb.Operation:
            op: pb.Operation = await stub.CreateBuild(
                rpc.CreateBuildRequest(
                    parent=model,
                    source_sha256=sha,
                    file_path="model.py",
                    function_name="predict",
                    request_id=rid,
                    deploy=rpc.DeployOptions(resources=resources(1 + i % 3, cpus=0.5)),
                )
            )
            return op

        op = await crash_at(cluster, model, step, change)
        m = await settle(cluster, model)
        assert m.state == pb.MODEL_STATE_DEPLOYED, step
        assert m.active_deployment == op.deployment, step


async def test_redeploy_survives_a_crash_at_every_step(cluster: Cluster) -> None:
    model, _ = await setup_model(cluster, deploy=True)
    for i, step in enumerate(APPLY_STEPS, start=1):
        rid = request_id()

        async def change(stub: Stub, model: str, rid: str = rid, i: int = i) -> pb.Operation:
            op: pb.Operation = await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(
                    parent=model,
                    build=f"{model}/builds/1",
                    resources=resources(2, cpus=0.25 * (i % 2 + 1)),
                    request_id=rid,
                )
            )
            return op

        op = await crash_at(cluster, model, step, change)
        m = await settle(cluster, model)
        assert m.state == pb.MODEL_STATE_DEPLOYED and m.active_deployment == op.deployment


async def test_restart_survives_a_crash_at_every_step(cluster: Cluster) -> None:
    model, _ = await setup_model(cluster, deploy=True)
    for step in APPLY_STEPS:
        rid = request_id()
        before = {r.id for r in await replicas(cluster, model)}

        async def change(stub: Stub, model: str, rid: str = rid) -> pb.Operation:
            op: pb.Operation = await stub.RestartModel(
                rpc.RestartModelRequest(name=model, request_id=rid)
            )
            return op

        await crash_at(cluster, model, step, change)
        m = await settle(cluster, model)
        assert m.state == pb.MODEL_STATE_DEPLOYED, step
        after = {r.id for r in await replicas(cluster, model)}
        assert len(after) == 2 and not after & before, f"{step}: not every replica restarted"


async def test_stop_survives_a_crash_at_every_step(cluster: Cluster) -> None:
    model, _ = await setup_model(cluster, deploy=True)
    for step in APPLY_STEPS:
        rid = request_id()

        async def change(stub: Stub, model: str, rid: str = rid) -> pb.Operation:
            op: pb.Operation = await stub.StopModel(
                rpc.StopModelRequest(name=model, request_id=rid)
            )
            return op

        await crash_at(cluster, model, step, change)
        m = await settle(cluster, model)
        assert m.state == pb.MODEL_STATE_STOPPED, step
        async with channel(cluster) as stub:  # serve again for the next step
            op = await stub.RestartModel(rpc.RestartModelRequest(name=model))
            op = await wait(stub, op)
            assert not op.HasField("error"), op.error
        await settle(cluster, model)


async def replicas(c: Cluster, model: str) -> list[pb.Replica]:
    async with channel(c) as stub:
        m = await stub.GetModel(rpc.GetModelRequest(name=model))
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
        return list(dep.replicas)


async def test_a_change_and_its_audit_record_are_kept_together_by_a_crash(
    cluster: Cluster,
) -> None:
    """Killed right after a mutation committed, before it answered: the change and its
    audit record are both there when the server starts again (one transaction)."""
    model_id = f"m{uuid.uuid4().hex[:8]}"
    cluster.arm("rpc.committed")
    async with channel(cluster) as stub:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.CreateModel(rpc.CreateModelRequest(parent="projects/a", model_id=model_id))
    await cluster.died()
    cluster.start()
    async with channel(cluster) as stub:
        model = await stub.GetModel(rpc.GetModelRequest(name=f"projects/a/models/{model_id}"))
        records = await stub.ListAuditRecords(rpc.ListAuditRecordsRequest(parent="projects/a"))
    made = [r for r in records.records if r.resource == model.name]
    assert [(r.method.rsplit("/", 1)[1], r.code) for r in made] == [("CreateModel", "OK")]
