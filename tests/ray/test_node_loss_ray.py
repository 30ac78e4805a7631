"""A node of a two-node cluster is lost (its raylet killed): replicas that fit come back
on the node left, one that cannot (it needs the lost node's GPU) leaves its model with
reduced capacity, and GetModel says what happened, naming the node."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import grpc
import httpx
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, ray_nodes
from tests.helpers.api import MODEL_V1, Stub, build, resources
from tests.helpers.servers import Cluster, free_port

pytestmark = pytest.mark.ray

LOST = "127.0.0.2"  # the second node's address


async def replicas_of(stub: Stub, model: str) -> list[pb.Replica]:
    m = await stub.GetModel(rpc.GetModelRequest(name=model))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    return list(dep.replicas)


async def lose_a_node(stub: Stub, http: httpx.AsyncClient, second_temp: str) -> None:
    made = {}
    for model_id, need in (("g", resources(1, cpus=0.25, gpus=1)), ("c", resources(2, cpus=0.5))):
        m = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/nl", model_id=model_id))
        deploy = rpc.DeployOptions(resources=need)
        op = await build(stub, m.name, MODEL_V1, deploy=deploy, seconds=240)
        assert not op.HasField("error"), op.error
        made[model_id] = m.name
    gpu, cpu = made["g"], made["c"]
    before = await replicas_of(stub, gpu)
    assert [r.node for r in before] == [LOST], "the GPU replica runs on the GPU node"

    ray_nodes.kill_raylet(second_temp)  # the second node is lost

    async def said_lost() -> pb.Model:
        m = await stub.GetModel(rpc.GetModelRequest(name=gpu))
        assert f"was lost with its node {LOST}" in m.message, m.message
        return m

    m = await eventually("the GPU model says its node was lost", said_lost, 120, 0.5)
    assert m.scale.running_replicas < m.scale.desired_replicas, "reduced capacity, shown"

    async def all_on_the_head() -> list[pb.Replica]:
        live = [r for r in await replicas_of(stub, cpu) if r.state == pb.REPLICA_STATE_RUNNING]
        assert len(live) == 2 and LOST not in {r.node for r in live}, live
        return live

    await eventually("the CPU model's replicas all on the head", all_on_the_head, 180, 1)
    endpoint = (await stub.GetModel(rpc.GetModelRequest(name=cpu))).endpoint
    assert (await http.post(endpoint, json={"x": 1})).status_code == 200


async def test_a_lost_node_s_replicas_come_back_where_they_fit_and_models_say_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = Path(tempfile.mkdtemp(prefix="cpnl", dir="/tmp"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the server's driver joins that head
    with ray_nodes.nodes(cpus=2, second_gpus=1) as (address, temps):
        server = Cluster(
            data / "data",
            f"sqlite:///{data}/cp.db",
            "node-loss",
            backend="ray",
            extra=[
                f"--ray-address={address}",
                f"--http-port={free_port()}",
                "--deploy-timeout=180",
            ],
        )
        server.start()
        try:
            async with (
                grpc.aio.insecure_channel(server.address) as ch,
                httpx.AsyncClient(timeout=30) as http,
            ):
                await lose_a_node(Stub(ch), http, temps[1])
        finally:
            server.kill()
            shutil.rmtree(data, ignore_errors=True)
