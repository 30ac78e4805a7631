"""One real local Ray cluster (with Serve) for the whole session.

Small logical CPUs for this 2-core machine, and two *logical* GPUs so that
``num_gpus`` placement is exercised on machines without a GPU. The helpers these tests
call are in tests/helpers/ray_cluster.py and tests/helpers/servers.py.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.servers import free_port
from workers.backend import Backend

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests here that start a Ray cluster of their own (`modelctl serve` without
    --ray-address, the clients' suites, the benchmarks) run before the session's cluster
    starts: two clusters never share this machine's cores. Other tests keep their place."""
    here = [i for i, item in enumerate(items) if item.path.is_relative_to(HERE)]
    ours = sorted(
        (items[i] for i in here),
        key=lambda item: "ray_backend" in getattr(item, "fixturenames", ()),
    )
    for i, item in zip(here, ours, strict=True):
        items[i] = item


@pytest.fixture(scope="session")
async def ray_backend() -> AsyncIterator[Backend]:
    from workers.ray_backend import RayBackend

    # Ray's files in a folder of the session's own, as a server keeps them in its data
    # dir: a cluster someone else started on this machine is never joined by mistake.
    temp = Path(tempfile.mkdtemp(prefix="cpray", dir="/tmp"))
    backend = RayBackend(
        address=None,
        http_host="127.0.0.1",
        http_port=free_port(),
        num_cpus=4,
        num_gpus=2,
        temp_dir=temp,
    )
    await backend.start()
    yield backend
    await backend.close()
    shutil.rmtree(temp, ignore_errors=True)
