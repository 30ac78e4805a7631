"""kill -9 of the control plane at every step of a canary: the rollout resumes at the
same step with the same weights (they are records, not memory) and ends exactly once.

Real `modelctl serve` processes on the fake backend (whose simulated cluster outlives the
server, as a Ray cluster would), on SQLite and PostgreSQL. No gate needs figures here
(min_requests 0): each step passes when its bake is over, measured from the recorded
start of the step, so a restart neither restarts a step nor skips one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from controlplane.api.client import Client
from controlplane.domain.traffic import Gates, Phase, Strategy, StrategyKind
from controlplane.domain.types import DeployOptions, Operation, Resources
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, MODEL_V2, zip_bytes
from tests.helpers.servers import Cluster

pytestmark = pytest.mark.slow  # a server process killed and started again, three times

BAKE_S = 6.0


@pytest.fixture
async def cluster(tmp_path: Path, fresh_db: str) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path / "data", fresh_db, "traffic-crash")
    c.start()
    yield c
    c.kill()


@contextlib.asynccontextmanager
async def client(c: Cluster) -> AsyncIterator[Client]:
    async with Client(c.address) as cl:
        yield cl


async def built(cl: Client, model: str, source: str, function: str, deploy: bool) -> str:
    src = await cl.upload_source(model, zip_bytes({"model.py": source}))
    options = DeployOptions(Resources(replicas=1)) if deploy else None
    op = await cl.create_build(model, src.sha256, "model.py", function, deploy=options)
    op = await cl.wait(op.name, timeout_s=60)
    assert op.error is None, op.error
    return op.target


async def test_a_canary_resumes_at_its_step_after_kill_9_and_ends_once(cluster: Cluster) -> None:
    async with client(cluster) as cl:
        model = (await cl.create_model("projects/crash", "iris")).name
        await built(cl, model, MODEL_V1, "predict", deploy=True)
        v2 = await built(cl, model, MODEL_V2, "classify", deploy=False)
        strategy = Strategy(StrategyKind.CANARY, (10, 50, 100), BAKE_S, Gates(min_requests=0))
        op = await cl.create_deployment(model, v2, rollout=strategy, request_id="canary-1")

    for step, percent in enumerate(strategy.steps):
        async with client(cluster) as cl:

            async def at_step(cl: Client = cl, step: int = step) -> Operation:
                got = await cl.get_operation(op.name)
                assert got.rollout is not None and not got.done, got
                assert (got.rollout.phase, got.rollout.step) == (Phase.BAKING, step), got
                return got

            before = await eventually(f"step {step + 1}", at_step, 30)
            traffic = (await cl.get_model(model)).traffic
            assert traffic is not None and traffic.percent == percent
        cluster.kill()  # SIGKILL, mid-bake
        cluster.start()
        async with client(cluster) as cl:
            after = await cl.get_operation(op.name)
            assert after.rollout is not None and before.rollout is not None
            # The same step, begun at the same time: its bake goes on, not over.
            assert after.rollout.step == step, after
            assert after.rollout.step_start == before.rollout.step_start
            traffic = (await cl.get_model(model)).traffic
            assert traffic is not None and traffic.percent == percent

            await eventually(f"{percent}% sent after the restart", partial(sends, cluster, percent))

    async with client(cluster) as cl:
        done = await cl.wait(op.name, timeout_s=120)
        assert done.error is None, done.error
        retried = await cl.create_deployment(model, v2, rollout=strategy, request_id="canary-1")
        assert retried.name == op.name  # the retry is the same, finished operation
        m = await cl.get_model(model)
        assert m.traffic is None
        assert (await cl.get_deployment(m.active_deployment)).build == v2
        finished = [e for e in await events(cl, model) if e.name == op.name and e.done]
        assert len(finished) == 1, "the rollout ended more than once"
    apps = cluster.running_apps()
    assert len(apps) == 1 and not any(name.endswith(".candidate") for name in apps)
    assert next(iter(apps.values()))["spec"]["build_name"] == v2  # type: ignore[index]
    assert cluster.unfinished_jobs() == 0


def sends(cluster: Cluster, percent: int) -> bool:
    """Whether the model's own replicas send the other build ``percent``, as the cluster has
    it."""
    apps: dict[str, Any] = cluster.running_apps()
    main = next(a for name, a in apps.items() if not name.endswith(".candidate"))
    share = main["spec"]["share"]
    return bool(share) and int(share["percent"]) == percent


async def events(cl: Client, model: str) -> list[Operation]:
    """Every operation event of the model so far (a watch from the start, to its head)."""
    seen: list[Operation] = []

    async def head() -> int:
        async for e in cl.watch_model(model):
            if e.resource is None:  # the BOOKMARK that ends the snapshot
                return e.revision
        raise AssertionError("the watch ended before its snapshot")

    async def replay(until: int) -> None:
        async for e in cl.watch_model(model, since_revision=1):
            if isinstance(e.resource, Operation):
                seen.append(e.resource)
            if e.revision >= until:
                return

    await asyncio.wait_for(replay(await asyncio.wait_for(head(), 30)), 30)
    return seen
