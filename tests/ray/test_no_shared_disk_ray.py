"""A Ray node that shares no disk with the control plane: the second node runs in a mount
namespace of its own where the server's data dir is an empty tmpfs (and so is its temp
dir). It is the only node with CPUs and the only one with a GPU, so every build runs
there (its source sent through Ray, its artifact and log sent back) and a GPU model's
replicas run there; the server serves builds by digest (--artifact-port) and the
replicas fetch theirs. The model's workflow goes through on that node: build and deploy,
scale in place, a new build, a rollback, a restart, a stop."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, ray_nodes
from tests.helpers.api import MODEL_V1, MODEL_V2, Stub, build, resources, wait
from tests.helpers.embedded import Serve, answers
from tests.helpers.servers import free_port

pytestmark = pytest.mark.ray

HIDDEN = "127.0.0.2"


def answer(version: int) -> dict[str, object]:
    return {"echo": {"x": 1}, "version": version}


async def replica_nodes(stub: Stub, model: str, count: int) -> set[str]:
    """The nodes of the model's ``count`` running replicas, once that many run."""

    async def running() -> set[str]:
        m = await stub.GetModel(rpc.GetModelRequest(name=model))
        d = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
        up = [r for r in d.replicas if r.state == pb.REPLICA_STATE_RUNNING]
        assert len(up) == count, [(r.id, pb.ReplicaState.Name(r.state)) for r in d.replicas]
        return {r.node for r in up}

    return await eventually(f"{count} replicas of {model} running", running, 120, 1)


async def deploy(stub: Stub, model: str, build_name: str, replicas: int) -> None:
    op = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=model, build=build_name, resources=resources(replicas, cpus=0, gpus=0.5)
        )
    )
    done = await wait(stub, op, 240)
    assert not done.HasField("error"), done.error


async def test_replicas_on_a_node_without_the_data_dir_fetch_their_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="cpns", dir="/tmp"))  # short: Ray's sockets
    hidden_from_node = root / "cp"
    (hidden_from_node / "d").mkdir(parents=True)
    head = str(root / "head")
    port = free_port()
    ray_nodes.start_head(port, head, cpus=0)  # builds and replicas go to the other node
    hidden = ray_nodes.start_hidden_node(f"127.0.0.1:{port}", hidden_from_node, cpus=2, gpus=2)
    server = Serve(hidden_from_node / "d", f"--ray-address=127.0.0.1:{port}", "--artifact-port=0")
    try:
        assert ray_nodes.seen_by_node(hidden, hidden_from_node) == [], "the data dir is hidden"
        await asyncio.to_thread(server.start)
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            stub = Stub(ch)
            model = await stub.CreateModel(
                rpc.CreateModelRequest(parent="projects/ns", model_id="gpu")
            )
            deploy_opts = rpc.DeployOptions(resources=resources(1, cpus=0, gpus=0.5))
            first = await build(stub, model.name, MODEL_V1, deploy=deploy_opts, seconds=300)
            assert not first.HasField("error"), first.error
            built = await stub.GetBuild(rpc.GetBuildRequest(name=first.target))
            digest = built.image.removeprefix("artifact://sha256:")
            artifacts = hidden_from_node / "d" / "artifacts"
            assert (artifacts / digest / "model.py").is_file(), "the artifact came back"
            assert (artifacts / ".archives" / f"{digest}.tar").is_file()
            body = await answers(stub, model.name, 120)
            assert body["build"] == first.target and body["response"] == {
                "echo": {"x": 1},
                "version": 1,
            }
            assert await replica_nodes(stub, model.name, 1) == {HIDDEN}

            await deploy(stub, model.name, first.target, 2)  # in place: one more replica
            assert await replica_nodes(stub, model.name, 2) == {HIDDEN}

            second = await build(
                stub, model.name, MODEL_V2, "classify", deploy=deploy_opts, seconds=300
            )
            assert not second.HasField("error"), second.error
            lines = [
                line.text
                async for line in stub.StreamBuildLogs(
                    rpc.StreamBuildLogsRequest(name=second.target)
                )
            ]
            assert any("build succeeded" in text for text in lines), lines[-3:]
            body = await answers(stub, model.name, 120)
            assert body["build"] == second.target and body["response"] == {
                "echo": {"x": 1},
                "version": 2,
            }

            await deploy(stub, model.name, first.target, 1)  # a rollback to the first build
            body = await answers(stub, model.name, 120)
            assert body["build"] == first.target
            assert await replica_nodes(stub, model.name, 1) == {HIDDEN}

            restart = await stub.RestartModel(rpc.RestartModelRequest(name=model.name))
            done = await wait(stub, restart, 240)
            assert not done.HasField("error"), done.error
            assert (await answers(stub, model.name, 120))["build"] == first.target

            stop = await stub.StopModel(rpc.StopModelRequest(name=model.name))
            done = await wait(stub, stop, 240)
            assert not done.HasField("error"), done.error
        assert ray_nodes.seen_by_node(hidden, hidden_from_node) == [], "and stayed hidden"
        assert await asyncio.to_thread(server.stop) == 0
    finally:
        server.kill()
        ray_nodes.kill_all(hidden)
        ray_nodes.kill_all(head)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(hidden, ignore_errors=True)
