"""`modelctl serve --log-format json` on real Ray: every line the server writes to stderr
is a JSON object, Ray's and Serve's own log lines and the workers' output included
(docs/operators.md, Logs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, build, resources, wait
from tests.helpers.servers import free_port, serve
from workers.backend import Backend

pytestmark = pytest.mark.ray

# Writes to stdout and stderr and logs where it is imported (the build's import check, the
# replica) and where it answers: all of it would reach the driver with log_to_driver.
NOISY = """\
import logging, sys
print("noisy model: imported")
print("noisy model: imported (stderr)", file=sys.stderr)
logging.getLogger("noisy").warning("noisy model: a warning")

def predict(body):
    print("noisy model: answering", body)
    return {"echo": body}
"""


def session_ray_address() -> str:
    import ray  # the session's cluster runs in this process (tests/ray/conftest.py)

    address: str = ray.get_runtime_context().gcs_address
    return address


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def not_json(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            bad.append(line)
    return bad


@pytest.mark.parametrize("ray_mode", ["ray-address", "local"])
async def test_every_stderr_line_the_server_writes_is_json(
    ray_backend: Backend, tmp_path: Path, ray_mode: str
) -> None:
    """On the session's cluster (--ray-address), and on a local Ray the server starts."""
    if ray_mode == "ray-address":  # the session's Serve proxy listens on its port
        port = urlsplit(ray_backend.http_base).port
        ray = [f"--http-port={port}", f"--ray-address={session_ray_address()}"]
    else:
        ray = [f"--http-port={free_port()}", "--num-cpus=2"]
    stderr_path = tmp_path / "stderr.log"
    async with (
        serve(
            "--log-format=json",
            "--insecure-no-auth",
            "--grpc-port=0",
            "--host=127.0.0.1",
            f"--data-dir={tmp_path / 'data'}",
            "--server-id=json-logs",
            *ray,
            log=stderr_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the session cluster's token auth
            ready_s=120,
            stop_s=120,
        ) as (_, address),
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = Stub(channel)
        model = await stub.CreateModel(
            rpc.CreateModelRequest(parent="projects/jsonlogs", model_id="noisy")
        )
        deploy = rpc.DeployOptions(resources=resources(1, cpus=0.25))
        op = await build(stub, model.name, NOISY, deploy=deploy, seconds=240)
        assert not op.HasField("error"), op.error
        model = await stub.GetModel(rpc.GetModelRequest(name=model.name))
        assert model.state == pb.MODEL_STATE_DEPLOYED
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(model.endpoint, json={"x": 1})
        assert reply.status_code == 200, reply.text
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=model.active_deployment))
        pids = [r.pid for r in dep.replicas]
        op = await stub.StopModel(rpc.StopModelRequest(name=model.name))
        op = await wait(stub, op, 120)
        assert not op.HasField("error"), op.error
        # What the replicas print last comes before their processes end: nothing after.
        await eventually("the replicas' processes ended", lambda: not any(map(alive, pids)), 60)
    text = stderr_path.read_text()
    bad = not_json(text)
    assert not bad, "lines on stderr that are not JSON:\n" + "\n".join(bad[:40])
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(ln["logger"].startswith("controlplane.") for ln in lines), text[-3000:]
    assert any(ln["logger"].startswith("ray") for ln in lines), "Ray's lines are kept"
    assert all(ln["server"] == "json-logs" for ln in lines), text[-3000:]
