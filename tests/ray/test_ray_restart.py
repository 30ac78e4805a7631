"""After the whole Ray cluster restarts, every model that should serve serves again: the
server and the local Ray it owns stopped and started again on the same data dir; an
external cluster stopped and started again under a running server; the server's own
local Ray killed under it. In the last two the server process, its gRPC port and its
watchers' streams stay (its Ray driver, a process of its own, is replaced)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, ray_nodes
from tests.helpers.api import (
    MODEL_V1,
    MODEL_V2,
    Stub,
    build,
    error_info,
    resources,
    start_build,
    wait,
)
from tests.helpers.embedded import Serve, answers
from tests.helpers.servers import free_port

pytestmark = pytest.mark.ray


async def deployed(stub: Stub, project: str) -> tuple[pb.Model, pb.Operation]:
    """A model of ``project`` built and deployed (1 replica), answering."""
    model = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="x"))
    deploy = rpc.DeployOptions(resources=resources(1, cpus=0.25))
    op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=240)
    assert not op.HasField("error"), op.error
    assert (await answers(stub, model.name, 60))["success"] is True
    return model, op


async def scale_refused_while_gone(stub: Stub, model: str, build_name: str) -> None:
    """A change that needs the cluster answers UNAVAILABLE with a retry hint."""
    req = rpc.CreateDeploymentRequest(parent=model, build=build_name, resources=resources(2))

    async def refused() -> str:
        try:
            await stub.CreateDeployment(req)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            return error_info(e)[0]
        raise AssertionError("accepted while the cluster is gone")

    assert await eventually("changes refused", refused, 60, 0.5) == "CLUSTER_UNAVAILABLE"


class Watching:
    """A WatchModel stream of its own, its events kept: it must stay open throughout."""

    def __init__(self, stub: Stub, model: str) -> None:
        self.events: list[pb.ModelEvent] = []
        self._task = asyncio.ensure_future(self._read(stub, model))

    async def _read(self, stub: Stub, model: str) -> None:
        async for event in stub.WatchModel(rpc.WatchModelRequest(name=model)):
            self.events.append(event)

    def running(self, since: int = 0, until: int | None = None) -> set[str]:
        """The replicas deployment events ``since`` to ``until`` showed RUNNING."""
        return {
            r.id
            for e in self.events[since:until]
            if e.HasField("deployment")
            for r in e.deployment.replicas
            if r.state == pb.REPLICA_STATE_RUNNING
        }

    async def still_open(self) -> None:
        assert not self._task.done(), f"the watch ended: {self._task.exception()!r}"
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def new_replicas_seen(watch: Watching, outage_from: int) -> None:
    """The watcher saw replicas other than those running before the outage run after it."""
    lost = watch.running(0, outage_from)

    async def seen() -> bool:
        assert watch.running(outage_from) - lost, [
            e.WhichOneof("resource") for e in watch.events[outage_from:]
        ]
        return True

    await eventually("the watcher sees new replicas run", seen, 60, 0.5)


async def through_an_outage(
    stub: Stub, project: str, kill: Callable[[], None], back: Callable[[], None]
) -> tuple[pb.Model, pb.Operation]:
    """A model deployed, a watch on it, a build accepted; the cluster killed (``kill``):
    changes refused with a retry hint, reads answer; ``back`` (an external cluster
    started again, or nothing: the server starts its own) and the same build serves
    again, the watch, still open, having seen new replicas run, and the build accepted
    before the outage done (neither lost nor left hanging)."""
    model, op = await deployed(stub, project)
    watch = Watching(stub, model.name)
    await eventually("the watch started", lambda: bool(watch.events), 10)
    before = len(watch.events)
    accepted = await start_build(stub, model.name, {"model.py": MODEL_V2}, "classify")

    kill()
    await scale_refused_while_gone(stub, model.name, op.target)
    read = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert read.name == model.name, "reads keep working"

    back()
    body = await answers(stub, model.name, 240)
    assert body["build"] == op.target, "the same build serves again"
    await new_replicas_seen(watch, before)
    await watch.still_open()
    built = await wait(stub, accepted, 300)
    assert built.done and not built.HasField("error"), built.error
    return model, op


async def test_the_server_reconnects_when_its_ray_cluster_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ray start --head` stopped under a running `modelctl serve --ray-address`, then
    started again at the same address: while it is gone, changes are refused with a
    retry hint and reads answer; once it is back the same server process (a new Ray
    driver of its) re-applies every model, and each serves again; a watch opened before
    the outage stays open and sees it all."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="cprr", dir="/tmp")
    port = free_port()
    ray_nodes.start_head(port, temp)
    server = Serve(tmp_path / "data", f"--ray-address=127.0.0.1:{port}")
    try:
        await asyncio.to_thread(server.start)
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            stub = Stub(ch)
            model, op = await through_an_outage(
                stub,
                "projects/rr",
                lambda: ray_nodes.kill_all(temp),  # the whole cluster, at once
                lambda: ray_nodes.start_head(port, temp),  # the same address, a new one
            )
            scaled = await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(
                    parent=model.name, build=op.target, resources=resources(2, cpus=0.25)
                )
            )
            done = await wait(stub, scaled, 180)
            assert not done.HasField("error"), done.error
        assert await asyncio.to_thread(server.stop) == 0
    finally:
        server.kill()
        ray_nodes.kill_all(temp)
        shutil.rmtree(temp, ignore_errors=True)


async def test_a_local_ray_that_died_is_started_again_by_the_running_server(
    tmp_path: Path,
) -> None:
    """Every process of the server's own local Ray killed: changes are refused with a
    retry hint, reads answer, and the same server starts a new local Ray, applies every
    model (each serves again, a watch opened before sees it) and still stops in order.
    Then the server and its Ray stop and start again on the same data dir: a new Ray,
    nothing on it, and the model serves again."""
    data = Path(tempfile.mkdtemp(prefix="cpl", dir="/tmp")) / "d"  # Ray's sockets in it
    server = Serve(data)
    try:
        await asyncio.to_thread(server.start)
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            model, op = await through_an_outage(
                Stub(ch),
                "projects/rl",
                lambda: ray_nodes.kill_all(str(data / "ray")),  # its GCS, raylet, workers
                lambda: None,  # the server starts a new local Ray by itself
            )
        assert await asyncio.to_thread(server.stop) == 0

        await asyncio.to_thread(server.start)  # a new local Ray, the same records
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            body = await answers(Stub(ch), model.name, 240)
            assert body["build"] == op.target
        assert await asyncio.to_thread(server.stop) == 0
    finally:
        server.kill()
        ray_nodes.kill_all(str(data / "ray"))
        shutil.rmtree(data.parent, ignore_errors=True)
