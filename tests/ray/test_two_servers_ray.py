"""Two `modelctl serve` processes on one PostgreSQL and one real Ray cluster (`ray start`):
each serves the models the other deployed, and when one dies mid-deploy the other
finishes its work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import MODEL_V1, Stub, resources, upload, wait, zip_bytes
from tests.helpers.servers import Cluster, free_port

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A Ray head of its own (not the session's in-process one), as operators run it. Its
    temp dir is short (Unix socket paths are limited) and names its processes, so that
    stopping it leaves the session's cluster alone (`ray stop` would stop every cluster)."""
    temp = tempfile.mkdtemp(prefix="cp-ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=1",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)


async def test_two_servers_share_one_ray_cluster(
    tmp_path: Path, fresh_postgres: str, ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the servers' drivers join that head
    http = free_port()
    extra = [f"--ray-address={ray_cluster}", f"--http-port={http}"]
    data = tmp_path / "data"
    a = Cluster(data, fresh_postgres, "ray-a", job_lease_s=3, backend="ray", extra=extra)
    b = Cluster(data, fresh_postgres, "ray-b", job_lease_s=3, backend="ray", extra=extra)
    a.start()
    b.start()
    try:
        async with (
            grpc.aio.insecure_channel(a.address) as ca,
            grpc.aio.insecure_channel(b.address) as cb,
        ):
            sa, sb = Stub(ca), Stub(cb)
            m = await sa.CreateModel(rpc.CreateModelRequest(parent="projects/two", model_id="m"))
            src = await upload(sa, m.name, zip_bytes({"model.py": MODEL_V1}))
            # B stops taking jobs: A claims the build and dies once the build is recorded.
            b.kill()
            a.arm("build.recorded")
            op = await sa.CreateBuild(
                rpc.CreateBuildRequest(
                    parent=m.name,
                    source_sha256=src.sha256,
                    file_path="model.py",
                    function_name="predict",
                    deploy=rpc.DeployOptions(resources=resources(2, cpus=0.25)),
                )
            )
        assert await a.died() == -9
        b.start()
        async with grpc.aio.insecure_channel(b.address) as cb:
            sb = Stub(cb)
            op = await wait(sb, op, 240)
            assert not op.HasField("error"), op.error
            model = await sb.GetModel(rpc.GetModelRequest(name=m.name))
            assert model.state == pb.MODEL_STATE_DEPLOYED
            async with httpx.AsyncClient(timeout=30) as client:
                body = (await client.post(model.endpoint, json={"x": 1})).json()
            assert body["success"] and body["build"] == f"{m.name}/builds/1"
            dep = await sb.GetDeployment(rpc.GetDeploymentRequest(name=model.active_deployment))
            assert len(dep.replicas) == 2
    finally:
        a.kill()
        b.kill()
