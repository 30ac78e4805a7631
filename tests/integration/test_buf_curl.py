"""The README's `buf curl` examples work against a secured server: reflection with the
token on its own header, calls with the token, and a call without one refused."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.server import Server
from tests.helpers.api import fake_settings, running
from tests.helpers.servers import run

BUF = str(Path(sys.executable).with_name("buf"))
SERVICE = "modellifecycle.v1.ModelLifecycle"


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Server]:
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    async with running(fake_settings(url, tmp_path, insecure_no_auth=False)) as srv:
        yield srv


async def buf_curl(*args: str, token: str = "") -> tuple[int, str, str]:
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    reflect = ["--reflect-header", f"Authorization: Bearer {token}"] if token else []
    return await run(
        BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", *reflect, *auth, *args
    )


async def test_the_readme_buf_curl_examples_work_with_a_token(secured: Server) -> None:
    token = (secured.settings.data_dir / "admin.token").read_text().strip()
    base = f"http://{secured.grpc_address}"

    rc, out, err = await buf_curl("--list-methods", base, token=token)
    assert rc == 0, err
    assert f"{SERVICE}/WatchModel" in out.split() and f"{SERVICE}/CreateToken" in out.split()

    body = json.dumps({"parent": "projects/default", "model_id": "iris"})
    rc, out, err = await buf_curl("-d", body, f"{base}/{SERVICE}/CreateModel", token=token)
    assert rc == 0, err
    assert json.loads(out)["name"] == "projects/default/models/iris"

    body = json.dumps({"parent": "projects/default"})
    rc, out, err = await buf_curl("-d", body, f"{base}/{SERVICE}/ListModels", token=token)
    assert rc == 0, err
    assert [m["name"] for m in json.loads(out)["models"]] == ["projects/default/models/iris"]


async def test_buf_curl_without_a_token_is_refused(secured: Server) -> None:
    """buf words the reflection's UNAUTHENTICATED as its own registry's login failure
    (the README says so)."""
    rc, _, err = await buf_curl("--list-methods", f"http://{secured.grpc_address}")
    assert rc != 0 and "you are not authenticated" in err, err
