"""A Ray node, and then a second control-plane server, that share no disk with the first
server. The second node runs in a mount namespace of its own where the server's data dir
is an empty tmpfs (and so is its temp dir). It is the only node with CPUs, so every build
runs there (its source sent through Ray, its log streamed back as it is written, its
artifact sent back at the end). Replicas take one (logical) GPU each: the head has one
and the hidden node two, so three replicas run on both nodes, and wherever the head's
GPU is taken, the replicas run on the hidden node; the server serves builds by digest
(--artifact-port) and the replicas fetch theirs. Server A (PostgreSQL,
--artifact-store database) takes the model through build and deploy, scale in place to
both nodes and back, a new build (its log followed live) and a rollback; then A is gone,
and server B, in a mount namespace of its own where A's data dir is hidden (and given
another --http-port: it answers with the cluster's one Serve proxy), rolls back again
(replicas on the hidden node fetch the build from B, which had it from the
database), reads a log and exports a build A made, restarts and stops."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from controlplane.api.client import Client
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, gated, ray_nodes
from tests.helpers.api import MODEL_V1, MODEL_V2, Stub, build, resources, start_build, wait
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
            parent=model, build=build_name, resources=resources(replicas, cpus=0, gpus=1)
        )
    )
    done = await wait(stub, op, 240)
    assert not done.HasField("error"), done.error


async def test_replicas_and_a_second_server_without_the_data_dir_carry_on(
    monkeypatch: pytest.MonkeyPatch, fresh_postgres: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="cpns", dir="/tmp"))  # short: Ray's sockets
    gate = root / "gate"  # outside the hidden folder: the hidden node sees it
    hidden_from_node = root / "cp"
    (hidden_from_node / "d").mkdir(parents=True)
    head = str(root / "head")
    port = free_port()
    ray_nodes.start_head(port, head, cpus=0, gpus=1)  # builds go to the other node
    hidden = ray_nodes.start_hidden_node(f"127.0.0.1:{port}", hidden_from_node, cpus=2, gpus=2)
    shared = (
        f"--ray-address=127.0.0.1:{port}",
        "--artifact-port=0",
        "--artifact-store=database",
        f"--database-url={fresh_postgres}",
    )
    server = Serve(hidden_from_node / "d", *shared, f"--http-port={free_port()}")
    b_temp = tempfile.mkdtemp(prefix="cp-server-b-", dir="/tmp")
    other = Serve(  # another --http-port: Serve has one proxy per cluster, and B uses it
        hidden_from_node / "b" / "d",
        *shared,
        f"--http-port={free_port()}",
        prefix=ray_nodes.sharing_no_disk(hidden_from_node, b_temp),
    )
    try:
        assert ray_nodes.seen_by_node(hidden, hidden_from_node) == [], "the data dir is hidden"
        await asyncio.to_thread(server.start)
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            stub = Stub(ch)
            model = await stub.CreateModel(
                rpc.CreateModelRequest(parent="projects/ns", model_id="gpu")
            )
            deploy_opts = rpc.DeployOptions(resources=resources(1, cpus=0, gpus=1))
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
            await replica_nodes(stub, model.name, 1)

            await deploy(stub, model.name, first.target, 3)  # in place: on both nodes
            both = await replica_nodes(stub, model.name, 3)
            assert len(both) == 2 and HIDDEN in both, both
            assert (await answers(stub, model.name, 60))["build"] == first.target
            await deploy(stub, model.name, first.target, 1)  # and back, in place
            await replica_nodes(stub, model.name, 1)

            # V2's import waits for a gate (in /tmp, which the hidden node sees) that opens
            # once the server streamed its import-check line: seen while it still builds.
            v2 = gated(gate, MODEL_V2)
            op = await start_build(
                stub, model.name, {"model.py": v2}, "classify", deploy=deploy_opts
            )
            while_building = []
            async with asyncio.timeout(300):  # loudly, if the line never comes
                async for line in stub.StreamBuildLogs(
                    rpc.StreamBuildLogsRequest(name=op.target, follow=True)
                ):
                    state = (await stub.GetBuild(rpc.GetBuildRequest(name=op.target))).state
                    if state == pb.BUILD_STATE_BUILDING:
                        while_building.append(line.text)
                    if "step 3/4" in line.text:
                        gate.touch()
            assert any("step 3/4" in text for text in while_building), (
                "the hidden node's build streamed its log as it ran",
                while_building,
            )
            second = await wait(stub, op, 300)
            assert not second.HasField("error"), second.error
            body = await answers(stub, model.name, 120)
            assert body["build"] == second.target and body["response"] == {
                "echo": {"x": 1},
                "version": 2,
            }

            await deploy(stub, model.name, first.target, 1)  # a rollback to the first build
            body = await answers(stub, model.name, 120)
            assert body["build"] == first.target
            await replica_nodes(stub, model.name, 1)

        assert await asyncio.to_thread(server.stop) == 0

        # Server A is gone; B never saw its disk, nor has the node kept its builds.
        await asyncio.to_thread(other.start)
        assert other.popen is not None
        assert ray_nodes.seen_by(other.popen.pid, hidden_from_node) == ["b"]
        cache = f"{hidden}/modelctl-artifacts-0"
        ray_nodes.in_namespace_of(ray_nodes.raylet_pid(hidden), "rm", "-rf", cache)
        assert not ray_nodes.in_namespace_of(ray_nodes.raylet_pid(hidden), "ls", "-d", cache)
        async with grpc.aio.insecure_channel(other.grpc) as ch:
            stub = Stub(ch)
            # Back to the second build: two new replicas beside the old one take all three
            # GPUs, so at least one runs on the hidden node, whose cache is empty.
            await deploy(stub, model.name, second.target, 2)
            body = await answers(stub, model.name, 120)
            assert body["build"] == second.target
            assert HIDDEN in await replica_nodes(stub, model.name, 2)
            again = (await stub.GetBuild(rpc.GetBuildRequest(name=second.target))).image
            cached = [n for n in ray_nodes.seen_by_node(hidden, Path(cache)) if n[0] != "."]
            assert cached == [again.removeprefix("artifact://sha256:")], (
                "fetched again (from B: A is gone), and only the build that runs"
            )
            lines = [
                line.text
                async for line in stub.StreamBuildLogs(
                    rpc.StreamBuildLogsRequest(name=first.target)
                )
            ]
            assert any("build succeeded" in text for text in lines), lines[-3:]

            restart = await stub.RestartModel(rpc.RestartModelRequest(name=model.name))
            done = await wait(stub, restart, 240)
            assert not done.HasField("error"), done.error
            assert (await answers(stub, model.name, 120))["build"] == second.target

            stop = await stub.StopModel(rpc.StopModelRequest(name=model.name))
            done = await wait(stub, stop, 240)
            assert not done.HasField("error"), done.error
        async with Client(other.grpc) as c:
            manifest = await c.export_build(
                first.target, tmp_path / "layout", base_image="scratch", tag="v1"
            )
        assert manifest.startswith("sha256:")
        assert ray_nodes.seen_by_node(hidden, hidden_from_node) == [], "and stayed hidden"
        assert await asyncio.to_thread(other.stop) == 0
    finally:
        gate.touch()
        server.kill()
        other.kill()
        shutil.rmtree(b_temp, ignore_errors=True)
        ray_nodes.kill_all(hidden)
        ray_nodes.kill_all(head)
        if not os.environ.get("CP_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(hidden, ignore_errors=True)
