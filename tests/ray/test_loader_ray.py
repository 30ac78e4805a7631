"""workers.loader on a real Ray Serve: replicas load a model as the build's check did.

A sibling import and a data file read by relative path build, deploy and answer over
HTTP; a package-relative import fails the build in one line; a model that fails to
load only on the replicas fails its deployment with that same kind of line, not Serve's
traceback of its own internals, which stays in the replica's log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, resources, start_build, wait
from tests.helpers.model_cases import BODY, DATA_FILE, FUNCTION, RELATIVE, SIBLING, Case
from tests.helpers.ray_cluster import call, ray_server
from workers.backend import Backend

pytestmark = pytest.mark.ray

# Imports fine in the build's check; on a replica (CP_RESTART_GENERATION is set in every
# replica's environment, never in the check's) it makes a package-relative import.
FAILS_ON_REPLICAS = {
    "serve/model.py": (
        "import os\n"
        "if os.environ.get('CP_RESTART_GENERATION') is not None:\n"
        "    from . import helper\n"
        "def predict(body):\n"
        "    return body\n"
    ),
    "serve/helper.py": "NAME = 'beside the model'\n",
}
REPLICA_ERROR = (
    "ImportError in serve/model.py line 3: attempted relative import with no known parent package"
)


@pytest.fixture(scope="module")
async def stub(
    ray_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stub]:
    async with (
        ray_server(ray_backend, tmp_path_factory.mktemp("loader")) as server,
        grpc.aio.insecure_channel(server.grpc_address) as channel,
    ):
        yield Stub(channel)


async def build_case(
    stub: Stub, model_id: str, files: dict[str, str], deploy: bool
) -> tuple[str, pb.Operation]:
    model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/ld", model_id=model_id))
    options = rpc.DeployOptions(resources=resources(1, cpus=0.1)) if deploy else None
    op = await start_build(
        stub, model.name, files, FUNCTION, file_path="serve/model.py", deploy=options
    )
    return model.name, await wait(stub, op, 120)


async def test_replicas_load_the_model_as_the_build_checked_it(stub: Stub) -> None:
    async def served(model_id: str, case: Case) -> None:
        model, op = await build_case(stub, model_id, case.files, deploy=True)
        assert not op.HasField("error"), op.error
        m = await stub.GetModel(rpc.GetModelRequest(name=model))
        reply = await call(m.endpoint, BODY)
        assert reply.status_code == 200, reply.text
        assert reply.json()["response"] == case.response, f"{case.name}: {reply.text}"
        stop = await stub.StopModel(rpc.StopModelRequest(name=model))
        assert not (await wait(stub, stop, 60)).HasField("error")

    await asyncio.gather(served("sibling", SIBLING), served("data", DATA_FILE))

    model, op = await build_case(stub, "relative", RELATIVE.files, deploy=False)
    assert op.error.message == f"build 1 failed: {RELATIVE.error}"
    b = await stub.GetBuild(rpc.GetBuildRequest(name=f"{model}/builds/1"))
    assert b.error == RELATIVE.error


async def test_a_model_that_cannot_load_on_its_replicas_fails_in_one_line(stub: Stub) -> None:
    started = time.time()
    model, op = await build_case(stub, "fails", FAILS_ON_REPLICAS, deploy=True)
    assert op.HasField("error"), op
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model}/deployments/1"))
    assert dep.state == pb.DEPLOYMENT_STATE_FAILED
    # Not Serve's message: "The deployment failed to start 3 times in a row. [...]
    # Error:" and 40 lines of traceback through Serve's internals, with machine paths.
    assert op.error.message == dep.message == REPLICA_ERROR

    # The whole traceback is in the replica's log.
    def logged() -> bool:
        for path in replica_logs(started):
            text = path.read_text(errors="replace")
            if "cannot load serve/model.py:predict" in text and "from . import helper" in text:
                return True
        return False

    await eventually("the replica logged the traceback", logged, timeout=30, interval=0.5)


def replica_logs(since: float) -> list[Path]:
    """The Ray session's log files written since ``since`` (the cluster is this process's)."""
    from ray._private import worker

    node = worker._global_node
    assert node is not None, "the session's Ray cluster runs in this process"
    logs = Path(node.get_logs_dir_path())
    return [p for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= since - 1]
