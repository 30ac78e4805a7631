"""Someone else's applications on the same Ray Serve: the control plane keeps to its own.
One deployed with a config (`serve deploy`) is handed back unchanged with every apply;
one deployed through Serve's Python API, which a whole config would delete, stops the
applies, saying which, and is left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from ray.serve._private.test_utils import GetPID
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from modellifecycle.v1 import service_pb2 as rpc
from ray import serve
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, Stub, build, resources, wait
from tests.helpers.ray_cluster import ray_server
from workers.backend import Backend

pytestmark = pytest.mark.ray

THEIRS = {
    "name": "someones-app",
    "route_prefix": "/someone",
    "import_path": "ray.serve._private.test_utils:get_pid_entrypoint",
    "deployments": [{"name": "GetPID", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}],
}


def deploy_theirs(http_port: int) -> None:
    """What `serve deploy` does: the whole config, every running config and theirs."""
    running = client().get_serve_details()["applications"]
    configs = [a["deployed_app_config"] for a in running.values() if a["deployed_app_config"]]
    client().deploy_apps(
        ServeDeploySchema.model_validate(
            {
                "http_options": {"host": "127.0.0.1", "port": http_port},
                "applications": [*configs, THEIRS],
            }
        )
    )


def client() -> Any:
    found = _get_global_client()
    assert found is not None, "Serve runs on the session's cluster"
    return found


def status_of(name: str) -> str:
    apps: dict[str, Any] = client().get_serve_details()["applications"]
    if name not in apps:
        return "gone"
    status = apps[name]["status"]
    return str(getattr(status, "value", status))


async def test_someone_elses_applications_are_kept_or_stop_the_applies(
    ray_backend: Backend, tmp_path: Path
) -> None:
    base = ray_backend.http_base
    port = int(base.rsplit(":", 1)[1])
    async with (
        ray_server(ray_backend, tmp_path / "data") as server,
        grpc.aio.insecure_channel(server.grpc_address) as ch,
        httpx.AsyncClient(timeout=30) as http,
    ):
        stub = Stub(ch)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/own", model_id="m"))
        deploy = rpc.DeployOptions(resources=resources(1, cpus=0.1))
        op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=180)
        assert not op.HasField("error"), op.error

        deploy_theirs(port)
        await eventually("their app running", lambda: status_of("someones-app") == "RUNNING", 120)
        pid = (await http.get(f"{base}/someone")).text
        scale = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model.name, build=op.target, resources=resources(2))
        )
        done = await wait(stub, scale, 120)
        assert not done.HasField("error"), done.error
        assert status_of("someones-app") == "RUNNING", "kept through our apply"
        assert (await http.get(f"{base}/someone")).text == pid, "not changed: same replica"

        imperative = GetPID.bind()  # type: ignore[attr-defined]
        serve.run(imperative, name="someones-imperative", route_prefix="/imperative")
        try:
            stop = await stub.StopModel(rpc.StopModelRequest(name=model.name))
            stopped = await wait(stub, stop, 120)
            assert stopped.HasField("error"), "an apply that would delete theirs stops"
            assert "someones-imperative" in stopped.error.message
            assert status_of("someones-imperative") == "RUNNING", "left alone"
            m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
            assert "someones-imperative" in m.message, "the model says why"
            answer = await http.post(m.endpoint, json={"x": 1})
            assert answer.status_code == 200, "nothing was deleted: ours answers still"
        finally:
            serve.delete("someones-imperative")
            serve.delete("someones-app")
