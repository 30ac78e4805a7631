"""For the tests on a real Ray cluster (tests/ray): a control plane on the session's
cluster, and a steady load on an endpoint while a change rolls out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx

from controlplane.config import Settings
from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from tests.helpers import eventually
from workers.backend import Backend

IRIS = {"features": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}


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


async def call(endpoint: str, body: Any = IRIS) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(endpoint, json=body)


async def under_load(
    endpoint: str, change: Awaitable[pb.Operation]
) -> tuple[pb.Operation, list[str], int]:
    """Runs a bounded steady load (127.0.0.1 only) while ``change`` rolls out: requests
    answered before it starts, all through it, and after it ends."""
    failures: list[str] = []
    total = 0
    done = asyncio.Event()

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal total
        for _ in range(5000):  # bounded
            if done.is_set():
                return
            total += 1
            try:
                r = await http.post(endpoint, json=IRIS)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                failures.append(repr(e))
            await asyncio.sleep(0.02)  # the load's pace, not a wait

    async with httpx.AsyncClient(timeout=30) as http:
        workers = [asyncio.create_task(worker(http)) for _ in range(4)]
        await eventually("the load under way before the change", lambda: total >= 8, 60)
        op = await change
        after = total
        await eventually("the load going on after the change", lambda: total >= after + 8, 60)
        done.set()
        await asyncio.gather(*workers)
    return op, failures, total
