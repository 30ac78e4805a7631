"""Invocation keys on real Ray Serve, checked by the replicas themselves: no key, a
revoked key and another model's key get 401; a live key of the model gets its answer;
two keys work at once (rotation); none of it restarts a replica."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.domain.types import DeployOptions, Resources
from tests.helpers import EXAMPLES, eventually
from tests.helpers.ray_cluster import ray_server
from workers.archive import zip_directory
from workers.backend import Backend

pytestmark = pytest.mark.ray
SETOSA = {"features": [[5.1, 3.5, 1.4, 0.2]]}


async def deploy(c: Client, project: str, model_id: str, tmp: Path) -> str:
    model = (await c.create_model(project, model_id)).name
    zip_directory(EXAMPLES / "iris-v1", tmp / f"{model_id}.zip")
    source = await c.upload_source(model, (tmp / f"{model_id}.zip").read_bytes())
    deploy = DeployOptions(Resources(replicas=1, cpus=0.1))
    op = await c.create_build(model, source.sha256, "model.py", "predict", deploy=deploy)
    op = await c.wait(op.name, timeout_s=240)
    assert op.error is None, op.error
    return model


async def status_becomes(
    http: httpx.AsyncClient, url: str, key: str, wanted: int, seconds: float = 20
) -> int:
    """POSTs until the answer is ``wanted`` (a key takes effect within seconds)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def status() -> int:
        got = (await http.post(url, json=SETOSA, headers=headers)).status_code
        assert got == wanted, f"status {got}"
        return got

    return await eventually(f"status {wanted} from {url}", status, seconds, 0.2)


async def test_endpoints_take_only_their_own_live_keys(
    ray_backend: Backend, tmp_path: Path
) -> None:
    async with ray_server(ray_backend, tmp_path / "data", insecure_no_auth=False) as server:
        admin = (tmp_path / "data" / "admin.token").read_text().strip()
        async with (
            Client(server.grpc_address, token=admin) as c,
            httpx.AsyncClient(timeout=30) as http,
        ):
            iris = await deploy(c, "projects/keys", "iris", tmp_path)
            other = await deploy(c, "projects/keys", "other", tmp_path)
            url = (await c.get_model(iris)).endpoint
            before = {
                r.id
                for r in (
                    await c.get_deployment((await c.get_model(iris)).active_deployment)
                ).replicas
            }

            answer = await http.post(url, json=SETOSA)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["success"] is False

            first, first_secret = await c.create_invocation_key(iris, "first")
            second, second_secret = await c.create_invocation_key(iris, "second")
            _, other_secret = await c.create_invocation_key(other, "the other model's")
            assert await status_becomes(http, url, first_secret, 200) == 200
            assert await status_becomes(http, url, second_secret, 200) == 200, "two at once"
            ok = await http.post(
                url, json=SETOSA, headers={"authorization": f"Bearer {first_secret}"}
            )
            assert ok.json()["response"] == {"classes": ["setosa"], "version": 1}
            for wrong in (other_secret, first_secret + "x", f"Basic {first_secret}"):
                headers = {"authorization": wrong if " " in wrong else f"Bearer {wrong}"}
                assert (await http.post(url, json=SETOSA, headers=headers)).status_code == 401
            other_url = (await c.get_model(other)).endpoint
            assert await status_becomes(http, other_url, other_secret, 200) == 200

            await c.revoke_invocation_key(first.name)
            assert await status_becomes(http, url, first_secret, 401) == 401, "revoked"
            assert await status_becomes(http, url, second_secret, 200) == 200, "rotated"
            keys = (await c.list_invocation_keys(iris)).items
            assert {(k.name, k.revoked) for k in keys} == {(first.name, True), (second.name, False)}
            after = {
                r.id
                for r in (
                    await c.get_deployment((await c.get_model(iris)).active_deployment)
                ).replicas
            }
            assert after == before, "keys change on the running replicas"


async def test_a_replica_reads_its_secret_environment(ray_backend: Backend, tmp_path: Path) -> None:
    folder = tmp_path / "env-model"
    folder.mkdir()
    (folder / "model.py").write_text(
        "import os\n\ndef predict(body):\n    return {n: os.environ.get(n) for n in body}\n"
    )
    zip_directory(folder, tmp_path / "env.zip")
    async with (
        ray_server(ray_backend, tmp_path / "data") as server,
        Client(server.grpc_address) as c,
        httpx.AsyncClient(timeout=30) as http,
    ):
        model = (await c.create_model("projects/secrets", "env")).name
        source = await c.upload_source(model, (tmp_path / "env.zip").read_bytes())
        deploy = DeployOptions(
            Resources(replicas=1, cpus=0.1),
            environment={"MODE": "fast"},
            secret_environment={"API_KEY": "s3cr3t"},
        )
        op = await c.create_build(model, source.sha256, "model.py", "predict", deploy=deploy)
        op = await c.wait(op.name, timeout_s=240)
        assert op.error is None, op.error
        answer = await http.post((await c.get_model(model)).endpoint, json=["MODE", "API_KEY"])
        assert answer.json()["response"] == {"MODE": "fast", "API_KEY": "s3cr3t"}
        dep = await c.get_deployment((await c.get_model(model)).active_deployment)
        assert dep.secret_environment_keys == ("API_KEY",) and "API_KEY" not in dep.environment
