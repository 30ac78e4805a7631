"""ExportBuild: a build as an OCI image layout, checked with skopeo, then served.

Needs buildah and skopeo (the project's set-up installs them from Debian packages).
The base is ``scratch``, as nothing can be pulled here; the image's own files are then
run with this machine's Python standing in for a base image's, and answer over HTTP.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.api.client import Client, ClientError
from controlplane.cli.main import run as cli
from controlplane.server import Server
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, create_model, start_build, wait

pytestmark = [
    pytest.mark.skipif(
        shutil.which("buildah") is None or shutil.which("skopeo") is None,
        reason="buildah and skopeo are not installed (make setup installs them as root)",
    ),
    pytest.mark.slow,  # buildah, skopeo and an exported server process
]

MODEL = (
    "import helper\n"
    "def predict(body):\n"
    "    return {'double': [2 * x for x in body['x']], 'helper': helper.NAME}\n"
)


def inspect(layout: Path, tag: str = "latest") -> dict[str, Any]:
    done = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{tag}"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def unpack_layers(layout: Path, into: Path) -> list[str]:
    """The image's file system, from the layout's own index, manifest and layer blobs."""

    def blob(digest: str) -> bytes:
        algo, hexdigest = digest.split(":")
        return (layout / "blobs" / algo / hexdigest).read_bytes()

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    names: list[str] = []
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as tar:
            names += tar.getnames()
            tar.extractall(into, filter="data")
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def built_model(stub: Stub, project: str) -> str:
    """A built model whose code imports a module shipped beside it."""
    model = (await create_model(stub, project)).name
    files = {"model.py": MODEL, "helper.py": "NAME = 'helper'\n"}
    op = await wait(stub, await start_build(stub, model, files))
    assert not op.HasField("error"), op
    return str(op.target)


async def test_export_writes_a_valid_layout_that_holds_and_serves_the_model(
    server: Server, stub: Stub, tmp_path: Path, project: str
) -> None:
    build_name = await built_model(stub, project)
    b = await stub.GetBuild(rpc.GetBuildRequest(name=build_name))
    layout = tmp_path / "layout"
    async with Client(server.grpc_address) as c:
        digest = await c.export_build(build_name, layout, base_image="scratch", tag="v2")
    info = inspect(layout, "v2")
    assert info["Digest"] == digest
    assert info["Labels"]["io.modelctl.build"] == build_name
    assert info["Labels"]["io.modelctl.image"] == b.image
    assert info["Labels"]["io.modelctl.function"] == "model.py:predict"
    env = dict(e.split("=", 1) for e in info["Env"])
    assert env["CP_MODEL_FILE"] == "model.py" and env["CP_MODEL_FUNCTION"] == "predict"
    assert not list((server.settings.data_dir / "exports").iterdir()), "scratch removed"

    root = tmp_path / "rootfs"
    names = unpack_layers(layout, root)
    for name in ("opt/model/model.py", "opt/model/helper.py", "opt/model/.cp_serve.py"):
        assert name in names
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, killed in finally)
        [sys.executable, "-I", str(root / "opt/model/.cp_serve.py")],
        env={**env, "PATH": os.environ["PATH"], "PORT": str(port), "CP_HOST": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        reply = await _post(f"http://127.0.0.1:{port}/", {"x": [1, 2]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["response"] == {"double": [2, 4], "helper": "helper"}
        assert reply.json()["success"] is True and reply.json()["build"] == build_name
        bad = await _post(f"http://127.0.0.1:{port}/", {"y": 1})
        assert bad.status_code == 500 and "KeyError" in bad.json()["error"]
    finally:
        proc.kill()
        proc.wait()


async def _post(url: str, body: Any) -> httpx.Response:
    """POSTs ``body`` once the server listens (it may still be starting)."""
    async with httpx.AsyncClient(timeout=10) as http:

        async def answered() -> httpx.Response:
            try:
                return await http.post(url, json=body)
            except httpx.ConnectError as e:
                raise AssertionError(f"nothing listens yet: {e!r}") from e

        return await eventually(f"an answer from {url}", answered, 20)


async def test_export_errors(server: Server, stub: Stub, tmp_path: Path, project: str) -> None:
    build_name = await built_model(stub, project)
    model = build_name.rsplit("/builds/", 1)[0]
    async with Client(server.grpc_address) as c:
        missing = f"oci:{tmp_path / 'no-such-layout'}:1"
        with pytest.raises(ClientError) as e:  # a base image that cannot be had
            await c.export_build(build_name, tmp_path / "a", base_image=missing)
        assert (e.value.code, e.value.reason) == ("FAILED_PRECONDITION", "EXPORT_FAILED")
        assert "\n" not in e.value.message and "no-such-layout" in e.value.message
        failed = await wait(stub, await start_build(stub, model, {"model.py": MODEL}))
        assert failed.HasField("error"), "helper.py is missing: the import fails"
        with pytest.raises(ClientError) as e:
            await c.export_build(failed.target, tmp_path / "b", base_image="scratch")
        assert (e.value.code, e.value.reason) == ("FAILED_PRECONDITION", "BUILD_NOT_BUILT")
        with pytest.raises(ClientError) as e:
            await c.export_build(build_name, tmp_path / "c", base_image="scratch", tag="bad tag")
        assert e.value.code == "INVALID_ARGUMENT" and e.value.violations[0][0] == "tag"
        with pytest.raises(ClientError) as e:
            await c.export_build(f"{model}/builds/99", tmp_path / "d")
        assert e.value.code == "NOT_FOUND"
    assert not list((server.settings.data_dir / "exports").iterdir()), "scratch removed"


async def test_cli_build_export(
    server: Server, stub: Stub, tmp_path: Path, project: str, capsys: Any
) -> None:
    build_name = await built_model(stub, project)
    layout = tmp_path / "cli-layout"
    code = await cli(
        [
            f"--server={server.grpc_address}",
            f"--project={project.removeprefix('projects/')}",
            "build",
            "export",
            "iris",
            build_name.rsplit("/", 1)[1],
            "--oci",
            str(layout),
            "--base",
            "scratch",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    digest = inspect(layout)["Digest"]
    assert out.strip() == f"oci:{layout}:latest {digest}"
