"""A backup taken while `modelctl serve` runs (tokens and invocation keys on), restored
onto a fresh data dir, comes back on a fresh local Ray: the same build serves, with its
secret value, to the same invocation key (and to no caller without it), and the same
admin token works."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import grpc
import httpx
import pytest

from controlplane.api.transport import bearer_interceptors
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import Stub, build, resources
from tests.helpers.embedded import Serve, answers
from tests.helpers.servers import MODELCTL, run

pytestmark = pytest.mark.ray

SECRET = "restored-s3cr3t"
READS_IT = "import os\n\ndef predict(body):\n    return {'key': os.environ.get('API_KEY')}\n"


async def test_a_backup_restored_on_a_fresh_data_dir_and_ray_serves_again() -> None:
    root = Path(tempfile.mkdtemp(prefix="cpb", dir="/tmp"))  # short: Ray's sockets in it
    first, second = Serve(root / "a" / "d", auth=True), Serve(root / "b" / "d", auth=True)
    try:
        await asyncio.to_thread(first.start)
        admin = bearer_interceptors(first.admin_token())
        async with grpc.aio.insecure_channel(first.grpc, interceptors=admin) as ch:
            stub = Stub(ch)
            model = await stub.CreateModel(
                rpc.CreateModelRequest(parent="projects/bk", model_id="m")
            )
            deploy = rpc.DeployOptions(
                resources=resources(1, cpus=0.25), secret_environment={"API_KEY": SECRET}
            )
            op = await build(stub, model.name, READS_IT, deploy=deploy, seconds=240)
            assert not op.HasField("error"), op.error
            made = await stub.CreateInvocationKey(
                rpc.CreateInvocationKeyRequest(parent=model.name, description="caller")
            )
            key = made.secret
            assert (await answers(stub, model.name, 60, key))["response"] == {"key": SECRET}
            code, out, err = await run(
                MODELCTL, "backup", str(root / "backup"), "--data-dir", str(first.data)
            )
            assert code == 0, out + err
        assert await asyncio.to_thread(first.stop) == 0  # the server and its Ray are gone

        code, out, err = await run(
            MODELCTL, "restore", str(root / "backup"), "--data-dir", str(second.data)
        )
        assert code == 0, out + err
        await asyncio.to_thread(second.start)  # a new data dir, a new Ray
        async with grpc.aio.insecure_channel(second.grpc, interceptors=admin) as ch:
            stub = Stub(ch)
            body = await answers(stub, model.name, 240, key)
            assert body["build"] == op.target and body["response"] == {"key": SECRET}
            endpoint = (await stub.GetModel(rpc.GetModelRequest(name=model.name))).endpoint
            async with httpx.AsyncClient(timeout=10) as http:
                assert (await http.post(endpoint, json={})).status_code == 401, "keys kept"
        assert await asyncio.to_thread(second.stop) == 0
    finally:
        first.kill()
        second.kill()
        shutil.rmtree(root, ignore_errors=True)
