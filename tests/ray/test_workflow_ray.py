"""The whole workflow on a real local Ray Serve, through gRPC and real HTTP calls.

A client that knows only the contract: build and deploy the iris classifier with 2
replicas, call it, scale in place (pids kept), deploy a new build with a renamed
function, roll back, restart under steady load (zero failed requests), stop.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import EXAMPLES
from tests.helpers.api import Stub, build, resources, upload, wait
from tests.helpers.ray_cluster import IRIS, call, ray_server, under_load
from workers.backend import Backend

pytestmark = pytest.mark.ray


def zip_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(path.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, f.relative_to(path).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="module")
async def workflow_server(
    ray_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with ray_server(ray_backend, tmp_path_factory.mktemp("cp")) as server:
        yield server


@pytest.fixture(scope="module")
async def rstub(workflow_server: Server) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(workflow_server.grpc_address) as channel:
        yield Stub(channel)


async def replicas(stub: Stub, model: str) -> list[pb.Replica]:
    m = await stub.GetModel(rpc.GetModelRequest(name=model))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.state == pb.DEPLOYMENT_STATE_DEPLOYED, dep
    return list(dep.replicas)


async def new_build(
    stub: Stub, model: str, example: str, function: str, deploy: rpc.DeployOptions | None
) -> pb.Operation:
    src = await upload(stub, model, zip_dir(EXAMPLES / example), chunk=64 * 1024)
    op = await stub.CreateBuild(
        rpc.CreateBuildRequest(
            parent=model,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name=function,
            deploy=deploy,
        )
    )
    return await wait(stub, op, 240)


async def test_whole_workflow_on_ray_serve(rstub: Stub) -> None:
    stub = rstub
    model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/demo", model_id="iris"))
    op = await new_build(
        stub,
        model.name,
        "iris-v1",
        "predict",
        rpc.DeployOptions(resources=resources(2, cpus=0.5, gpus=0.5)),
    )
    assert not op.HasField("error"), op.error
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_DEPLOYED

    r = await call(m.endpoint)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["build"] == f"{model.name}/builds/1"
    assert body["response"]["classes"] == ["setosa", "virginica"]
    two = await replicas(stub, model.name)
    assert len(two) == 2 and body["replica_id"] in {x.id for x in two}
    assert all(x.pid > 0 and x.node for x in two)
    # Every answer carries an X-Request-Id: the caller's when it sent one.
    assert r.headers.get("x-request-id")
    async with httpx.AsyncClient(timeout=30) as http:
        mine = await http.post(m.endpoint, json=IRIS, headers={"X-Request-Id": "trace-me-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-me-42"

    # Scale in place: 2 -> 3, the first two keep their ids and pids.
    op = await wait(
        stub,
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name,
                build=f"{model.name}/builds/1",
                resources=resources(3, cpus=0.5, gpus=0.5),
            )
        ),
        120,
    )
    assert not op.HasField("error"), op.error
    three = await replicas(stub, model.name)
    assert len(three) == 3
    assert {(x.id, x.pid) for x in two} <= {(x.id, x.pid) for x in three}

    # A new build with a renamed entry function, rolled out under steady load.
    new = new_build(
        stub, model.name, "iris-v2", "classify", rpc.DeployOptions(resources=resources(2, cpus=0.5))
    )
    op, failures, total = await under_load(m.endpoint, new)
    assert not op.HasField("error"), op.error
    assert total > 20 and failures == [], failures[:5]
    body = (await call(m.endpoint)).json()
    assert body["build"] == f"{model.name}/builds/2" and body["response"]["version"] == 2
    v2 = await replicas(stub, model.name)
    assert not {x.pid for x in v2} & {x.pid for x in three}

    # Roll back to build 1 under steady load: the old code serves again.
    async def rollback() -> pb.Operation:
        return await wait(
            stub,
            await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(parent=model.name, build=f"{model.name}/builds/1")
            ),
            120,
        )

    op, failures, total = await under_load(m.endpoint, rollback())
    assert not op.HasField("error"), op.error
    assert total > 20 and failures == [], failures[:5]
    body = (await call(m.endpoint)).json()
    assert body["build"] == f"{model.name}/builds/1" and body["response"]["version"] == 1

    # Restart under steady load: every replica replaced, no request fails.
    before = await replicas(stub, model.name)

    async def restart() -> pb.Operation:
        return await wait(
            stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)), 120
        )

    op, failures, total = await under_load(m.endpoint, restart())
    assert not op.HasField("error"), op.error
    after = await replicas(stub, model.name)
    assert len(after) == len(before) == 2
    assert not {x.pid for x in after} & {x.pid for x in before}
    assert not {x.id for x in after} & {x.id for x in before}
    assert total > 20 and failures == [], failures[:5]

    # User code that raises: HTTP 500 with the error, and the replica stays up.
    r = await call(m.endpoint, {"features": "not a matrix"})
    assert r.status_code == 500 and r.json()["success"] is False and r.json()["error"]
    assert (await call(m.endpoint)).status_code == 200

    # Stop: the endpoint stops answering; records and history stay.
    op = await wait(stub, await stub.StopModel(rpc.StopModelRequest(name=model.name)), 120)
    assert not op.HasField("error"), op.error
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_STOPPED
    r = await call(m.endpoint)
    assert r.status_code >= 400
    deps = await stub.ListDeployments(rpc.ListDeploymentsRequest(parent=model.name))
    assert len(deps.deployments) == 4

    # Restart a stopped model: its last deployment serves again.
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)), 120)
    assert not op.HasField("error"), op.error
    body = (await call(m.endpoint)).json()
    assert body["build"] == f"{model.name}/builds/1" and body["success"] is True
    assert len(await replicas(stub, model.name)) == 2
    op = await wait(stub, await stub.StopModel(rpc.StopModelRequest(name=model.name)), 120)
    assert not op.HasField("error"), op.error


async def test_user_code_failing_at_start_fails_the_deployment(rstub: Stub) -> None:
    stub = rstub
    model = await stub.CreateModel(
        rpc.CreateModelRequest(parent="projects/demo", model_id="broken")
    )
    bad = (
        "import os\nif os.environ.get('CP_RESTART_GENERATION') is not None:\n"
        "    raise RuntimeError('cannot reach the feature store')\n"
        "def predict(body):\n    return body\n"
    )
    op = await build(
        stub, model.name, bad, deploy=rpc.DeployOptions(resources=resources(1)), seconds=240
    )
    assert op.HasField("error"), op
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/1"))
    assert dep.state == pb.DEPLOYMENT_STATE_FAILED
    assert "cannot reach the feature store" in dep.message
