"""A build whose requirement comes from the package index, served on real Ray Serve.

The requirement resolves and installs at build time, inside the artifact (a Ray task
builds it); the replica imports it from there, so starting it resolves nothing. An
unchanged rebuild is a cache hit that never reaches the cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import Stub, resources, start_build, upload, wait, zip_bytes
from tests.helpers.ray_cluster import ray_server
from workers.backend import Backend

pytestmark = [pytest.mark.ray, pytest.mark.network]

MODEL = """\
import tabulate

def predict(body):
    rows = body["rows"]
    return {
        "table": tabulate.tabulate(rows, headers=["name", "score"], tablefmt="plain"),
        "tabulate": tabulate.__version__,
        "from": tabulate.__file__,
    }
"""
FILES = {"model.py": MODEL, "requirements.txt": "tabulate==0.9.0\n"}


@pytest.fixture
async def server(
    ray_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with ray_server(ray_backend, tmp_path_factory.mktemp("deps")) as srv:
        yield srv


async def test_requirement_resolved_at_build_time_is_used_by_the_served_model(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = Stub(channel)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/deps", model_id="t"))
        src = await upload(stub, model.name, zip_bytes(FILES))
        request = rpc.CreateBuildRequest(
            parent=model.name,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name="predict",
            deploy=rpc.DeployOptions(resources=resources(1, cpus=0.1)),
        )
        op = await wait(stub, await stub.CreateBuild(request), 240)
        assert not op.HasField("error"), op
        b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
        (pkg,) = b.packages
        assert (pkg.name, pkg.version, pkg.requested) == ("tabulate", "0.9.0", True)
        assert len(pkg.sha256) == 64 and not b.cache_hit
        artifact = b.image.removeprefix("artifact://sha256:")

        m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(m.endpoint, json={"rows": [["a", 1], ["b", 22]]})
        assert reply.status_code == 200, reply.text
        body = reply.json()["response"]
        assert body["tabulate"] == "0.9.0"
        assert body["table"].splitlines()[0].split() == ["name", "score"]
        assert f"/artifacts/{artifact}/.cp_site/tabulate" in body["from"], (
            "the replica imports the copy installed into the artifact at build time"
        )

        request.ClearField("deploy")
        again = await wait(stub, await stub.CreateBuild(request), 60)
        cached = await stub.GetBuild(rpc.GetBuildRequest(name=again.target))
        assert cached.state == pb.BUILD_STATE_BUILT and cached.cache_hit
        assert cached.image == b.image and list(cached.packages) == list(b.packages)


# An import that takes a while (what is tested: two builds overlap, their lines live).
SLOW = (
    "import time\n"
    "print('loading weights', flush=True)\n"
    "time.sleep(3)\n"
    "print('weights loaded', flush=True)\n"
    "def predict(body):\n    return body\n"
)


async def test_builds_of_two_models_run_at_once_as_ray_tasks_with_live_logs(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = Stub(channel)
        ops = []
        for name in ("a", "b"):
            model = await stub.CreateModel(
                rpc.CreateModelRequest(parent="projects/par", model_id=name)
            )
            files = {"model.py": SLOW + f"# {name}\n"}
            ops.append(await start_build(stub, model.name, files))
        live: list[tuple[str, int]] = []
        follow = rpc.StreamBuildLogsRequest(name=ops[0].target, follow=True)
        async for line in stub.StreamBuildLogs(follow):
            state = (await stub.GetBuild(rpc.GetBuildRequest(name=ops[0].target))).state
            live.append((line.text, state))
        assert ("import | loading weights", pb.BUILD_STATE_BUILDING) in live
        spans = []
        for op in ops:
            assert not (await wait(stub, op, 120)).HasField("error")
            lines = [
                x async for x in stub.StreamBuildLogs(rpc.StreamBuildLogsRequest(name=op.target))
            ]
            loading = next(x for x in lines if x.text == "import | loading weights")
            loaded = next(x for x in lines if x.text == "import | weights loaded")
            spans.append((loading.time.ToDatetime(), loaded.time.ToDatetime()))
        (a0, a1), (b0, b1) = spans
        assert a0 < b1 and b0 < a1, f"both builds were importing at once: {spans}"
