"""One real local Ray cluster (with Serve) for the whole session.

Small logical CPUs for this 2-core machine, and two *logical* GPUs so that
``num_gpus`` placement is exercised on machines without a GPU.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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
