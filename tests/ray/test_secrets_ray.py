"""Secret values reach their replicas and nowhere else on a real Ray: not Ray's logs (Ray's
files are in the data dir, private to this user), not Serve's config as any model's code
can read it, and not another project's model that asks the broker for them."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import Stub, build, resources
from tests.helpers.embedded import Serve, serving
from workers.backend import app_name_for

pytestmark = pytest.mark.ray

SECRET = "s3cr3t-only-for-the-replica"

VICTIM = """
import os

def predict(body):
    return {"API_KEY": os.environ.get("API_KEY")}
"""

# Another project's model, as curious as model code can be on the same cluster.
PRYING = """
import json, os
import ray

def predict(body):
    from ray.serve.context import _get_global_client

    details = json.dumps(_get_global_client().get_serve_details(), default=str)
    app = body["app"]
    version = ""
    for name, a in json.loads(details)["applications"].items():
        if name == app:
            args = (a.get("deployed_app_config") or {}).get("args", {})
            version = args.get("secrets_version", "")
    broker = ray.get_actor("modelctl-secrets", namespace="modelctl")
    own = ray.get_runtime_context().get_actor_id()
    theirs = [
        a["ActorID"]
        for a in ray._private.state.actors().values()
        if a["Name"].startswith("SERVE_REPLICA::" + app + "#")
    ]
    tries = {}
    for who in [own, *theirs]:
        try:
            tries[who] = ray.get(broker.claim.remote(app, version, who))
        except Exception as e:
            tries[who] = str(e).splitlines()[-1][:300]
    return {"details": details, "version": version, "tries": tries, "env": dict(os.environ)}
"""


@pytest.fixture
def serve() -> Iterator[Serve]:
    # A short data dir: Ray's socket paths under it must fit in 107 bytes.
    data = Path(tempfile.mkdtemp(prefix="cps", dir="/tmp")) / "d"
    try:
        yield from serving(data)
    finally:
        shutil.rmtree(data.parent, ignore_errors=True)


def files_with(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


async def test_secrets_reach_their_replica_and_nothing_else(serve: Serve) -> None:
    await asyncio.to_thread(serve.start)
    async with grpc.aio.insecure_channel(serve.grpc) as ch, httpx.AsyncClient(timeout=60) as http:
        stub = Stub(ch)
        victim = await stub.CreateModel(
            rpc.CreateModelRequest(parent="projects/bank", model_id="m")
        )
        deploy = rpc.DeployOptions(
            resources=resources(1, cpus=0.25), secret_environment={"API_KEY": SECRET}
        )
        op = await build(stub, victim.name, VICTIM, deploy=deploy, seconds=300)
        assert not op.HasField("error"), op.error
        endpoint = (await stub.GetModel(rpc.GetModelRequest(name=victim.name))).endpoint
        assert (await http.post(endpoint, json={})).json()["response"] == {"API_KEY": SECRET}

        prying = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/pry", model_id="p"))
        op = await build(
            stub,
            prying.name,
            PRYING,
            deploy=rpc.DeployOptions(resources=resources(1, cpus=0.25)),
            seconds=300,
        )
        assert not op.HasField("error"), op.error
        pry_endpoint = (await stub.GetModel(rpc.GetModelRequest(name=prying.name))).endpoint
        answer = await http.post(pry_endpoint, json={"app": app_name_for("bank", "m")})
        seen = answer.json()["response"]
        assert seen["version"], "the version is in the config, for Serve to roll on"
        assert SECRET not in json.dumps(seen)
        refusals = list(seen["tries"].values())
        assert len(refusals) == 2, refusals  # its own actor and the bank's replica
        assert any("not a replica of bank.m" in str(r) for r in refusals), refusals
        assert any("claimed already" in str(r) for r in refusals), refusals

    ray_dir = serve.data / "ray"
    assert stat.S_IMODE(ray_dir.stat().st_mode) == 0o700, "Ray's files are private"
    assert (ray_dir / "r" / "session_latest").exists(), "Ray's session is in the data dir"
    readable = [
        str(p)
        for p in ray_dir.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o007
    ]
    assert not readable, f"Ray files others can read: {readable[:5]}"
    assert not files_with(ray_dir, SECRET.encode()), "the value is in Ray's files"
    assert await asyncio.to_thread(serve.stop) == 0
