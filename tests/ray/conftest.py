"""One real local Ray cluster (with Serve) for the whole session.

Small logical CPUs for this 2-core machine, and two *logical* GPUs so that
``num_gpus`` placement is exercised on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import Settings
from controlplane.server import Server
from workers.backend import Backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
async def ray_backend(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Backend]:
    from workers.ray_backend import RayBackend

    data: Path = tmp_path_factory.mktemp("ray")
    backend = RayBackend(
        address=None,
        http_host="127.0.0.1",
        http_port=free_port(),
        num_cpus=4,
        num_gpus=2,
        data_dir=data,
    )
    await backend.start()
    yield backend
    await backend.close()


@contextlib.asynccontextmanager
async def ray_server(backend: Backend, data_dir: Path, **overrides: Any) -> AsyncIterator[Server]:
    """A control plane on the session's Ray cluster (which it does not own)."""
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "grpc_port": 0,
        "reconcile_interval_s": 0.25,
        "deploy_timeout_s": 120.0,
        "num_gpus": 2,
        "grace_s": 2.0,
        "insecure_no_auth": True,
    }
    server = Server(Settings(**{**base, **overrides}), backend=backend, owns_backend=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
